#!/usr/bin/env bash
# nyx-session: Nyx in the tmux session `nyx` — created the first time, re-entered every time after.
#
# Over SSH a TUI lives only as long as the connection. Inside tmux it does not depend on it: drop the
# connection, reconnect, and you are back on the same screen (the jobs never depended on it anyway).
# The login hook (profile-nyx.sh) runs this for interactive SSH logins; run it yourself any time.
#
#   not inside tmux        attach to the session (there is only ever one `nyx` session)
#   inside tmux already    create it on that tmux server and switch to it: no tmux inside tmux
#                          (VastAI's auto-tmux session, or any session of yours)
#   not a terminal         create it and say how to attach (`ssh -t HOST nyx-session`)
#
# The window runs `nyx`; when Nyx exits (ctrl+q) the window keeps a shell, so the session never vanishes
# under you. Environment:
#   NYX_SESSION_NAME       session name (default: nyx)
#   NYX_SESSION_COMMAND    what the window runs (default: nyx)
#   NYX_SESSION_DIR        the window's working folder (default: /workspace if it exists, else here)
#   NYX_SESSION_DETACHED=1 create the session if needed, never attach (scripts, tests)
#   NYX_TMUX_CONF          config for a tmux server this starts (default: tmux's own, /etc/tmux.conf in the image)
set -euo pipefail

session="${NYX_SESSION_NAME:-nyx}"
self="$(readlink -f "${BASH_SOURCE[0]}")"

if [ "${1:-}" = "--window" ]; then
    # Inside the new window: run Nyx, then leave a shell in its place.
    command="${NYX_SESSION_COMMAND:-nyx}"
    set +e
    bash -c "$command"
    status=$?
    set -e
    printf '\n%s exited (status %s). This shell stays in tmux session "%s":\n' "$command" "$status" "$session"
    printf '  %-10s opens it again\n  %-10s detaches (jobs keep running either way)\n\n' "$command" "ctrl-b d"
    exec "${NYX_SESSION_SHELL:-${SHELL:-/bin/bash}}" -l
fi

if ! command -v tmux >/dev/null 2>&1; then
    echo "nyx-session: tmux is not installed (apt-get install tmux); run nyx directly meanwhile" >&2
    exit 2
fi

tmux_cmd=(tmux)
if [ -n "${NYX_TMUX_CONF:-}" ]; then
    tmux_cmd+=(-f "$NYX_TMUX_CONF")
fi

workdir="${NYX_SESSION_DIR:-}"
if [ -z "$workdir" ]; then
    if [ -d /workspace ]; then workdir=/workspace; else workdir="$PWD"; fi
fi

if ! "${tmux_cmd[@]}" has-session -t "=$session" 2>/dev/null; then
    new=("${tmux_cmd[@]}" new-session -d -s "$session" -n nyx -c "$workdir"
        -e "NYX_SESSION_COMMAND=${NYX_SESSION_COMMAND:-nyx}" -e "NYX_SESSION_NAME=$session")
    if [ -n "${NYX_SESSION_SHELL:-}" ]; then
        new+=(-e "NYX_SESSION_SHELL=$NYX_SESSION_SHELL")
    fi
    # Two logins at once may both get here; the loser's new-session fails, and the session exists: fine.
    if ! "${new[@]}" "bash $(printf '%q' "$self") --window" 2>/dev/null; then
        if ! "${tmux_cmd[@]}" has-session -t "=$session" 2>/dev/null; then
            echo "nyx-session: could not start tmux session \"$session\"; run nyx directly" >&2
            exit 1
        fi
    fi
fi

if [ "${NYX_SESSION_DETACHED:-}" = 1 ]; then
    exit 0
fi
if [ -n "${TMUX:-}" ]; then
    exec "${tmux_cmd[@]}" switch-client -t "=$session"
fi
if [ ! -t 0 ] || [ ! -t 1 ]; then
    echo "nyx-session: not a terminal; tmux session \"$session\" is running. Attach with: ssh -t HOST nyx-session" >&2
    exit 0
fi
exec "${tmux_cmd[@]}" attach-session -t "=$session"
