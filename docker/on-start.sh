#!/usr/bin/env bash
# What every container start needs, on any platform; start.sh (the image's CMD) runs it first.
#
# VastAI: its SSH launch mode replaces the image's entrypoint, so put this in the template's on-start field:
#     bash /opt/nyx/docker/on-start.sh
#
#  1. the /workspace layout (a persistent volume mounted there hides whatever the image had at that path):
#     datasets/  models/  nyx/ (NYX_HOME: jobs, settings)  hf/ (HF_HOME: the Hugging Face cache)  output/
#  2. the container's environment saved for SSH logins (sshd gives each session a clean one): HF_TOKEN,
#     CIVITAI_TOKEN, NYX_HOME… set in the template reach `nyx` in your shell. The file is root's alone (0600).
#  3. SSH host keys of this container's own (the image ships none: a public image's private keys are public),
#     made only where missing
#  4. VastAI's own auto-tmux turned off (~/.no_auto_tmux), so an SSH login lands in Nyx's tmux session
#     instead; skipped when NYX_NO_TMUX is set (then you keep VastAI's, and `nyx-session` switches to Nyx's).
set -euo pipefail

workspace="${NYX_WORKSPACE:-/workspace}"
saved_env="${NYX_SAVED_ENV:-/etc/nyx/env.sh}"

make_layout() {
    local dir
    for dir in "$workspace/datasets" "$workspace/models" "$workspace/output" \
        "${NYX_HOME:-$workspace/nyx}" "${HF_HOME:-$workspace/hf}"; do
        mkdir -p "$dir"
    done
}

# Write the environment as shell lines that set a variable only where it is unset, so a login's own
# values (TERM, SSH_*, a variable given on the command line) always win. Values are single-quoted.
save_env() {
    local file="$1" tmp entry name value
    mkdir -p "$(dirname "$file")"
    tmp="$(mktemp "$file.XXXXXX")"
    chmod 600 "$tmp"
    {
        echo "# The container's environment at start, for SSH sessions: written by on-start.sh, read by nyx-env.sh."
        while IFS= read -r -d '' entry; do
            name="${entry%%=*}"
            value="${entry#*=}"
            [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
            case "$name" in
                HOME | PWD | OLDPWD | SHLVL | HOSTNAME | TERM | _ | USER | LOGNAME | SHELL | MAIL | PS1 | LS_COLORS) continue ;;
                TMUX | TMUX_PANE | SSH_* | PUBLIC_KEY | PATH | LANG | LC_*) continue ;;
            esac
            value="${value//\'/\'\\\'\'}"
            # shellcheck disable=SC2016  # the ${NAME+x} is for the reader of the file, not expanded here
            printf '[ -n "${%s+x}" ] || export %s='"'"'%s'"'"'\n' "$name" "$name" "$value"
        done < <(env -0)
    } >"$tmp"
    mv -f "$tmp" "$file"
}

make_layout
save_env "$saved_env"
if [ -z "${NYX_NO_HOST_KEYS:-}" ] && command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -A >/dev/null
fi
if [ -z "${NYX_NO_TMUX:-}" ]; then
    touch "${HOME:-/root}/.no_auto_tmux"
fi
echo "nyx: workspace ready in $workspace (NYX_HOME=${NYX_HOME:-$workspace/nyx}, HF_HOME=${HF_HOME:-$workspace/hf})"
