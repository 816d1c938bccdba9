# shellcheck shell=sh
# /etc/profile.d/zz-nyx.sh in the Docker image: every login shell gets Nyx's environment, and an interactive
# SSH login lands in the tmux session `nyx` running Nyx (nyx-session.sh), re-entered on every reconnect.
#
# It does nothing to: shells already inside tmux ($TMUX: a tmux window, VastAI's auto-tmux, nested logins);
# non-interactive logins (scp, rsync, `ssh HOST cmd`); logins without a terminal; and anyone who opted out
# with NYX_NO_TMUX=1 (template variable, or `ssh -o SetEnv=NYX_NO_TMUX=1 HOST`) or `touch ~/.no_nyx_tmux`.
# If the session cannot be opened, the login goes on as a plain shell: a broken tmux never locks you out.
# Sourced by sh as well as bash: POSIX only. Prints nothing unless it opens the session.

_nyx_dir="${NYX_DOCKER_DIR:-/opt/nyx/docker}"
if [ -r "$_nyx_dir/nyx-env.sh" ]; then
    # shellcheck source=docker/nyx-env.sh
    . "$_nyx_dir/nyx-env.sh"
fi

case $- in
    *i*)
        if [ -n "${SSH_TTY:-}" ] && [ -z "${TMUX:-}" ] && [ -z "${NYX_NO_TMUX:-}" ] \
            && [ ! -e "${HOME:-/root}/.no_nyx_tmux" ] && [ -t 0 ] && [ -t 1 ] \
            && [ -x "$_nyx_dir/nyx-session.sh" ] && command -v tmux >/dev/null 2>&1; then
            if "$_nyx_dir/nyx-session.sh"; then
                # detached (ctrl-b d) or the session ended: the SSH login ends with it, as with a plain `exec tmux`
                exit 0
            fi
            echo "nyx: the tmux session could not be opened (see above); this is a plain shell. Try again: nyx-session" >&2
        fi
        ;;
esac
unset _nyx_dir
