#!/usr/bin/env bash
# /start.sh, the image's CMD (RunPod's convention: its templates start `/start.sh`).
#
#   1. on-start.sh: the /workspace layout and the environment for SSH logins
#   2. sshd, when PUBLIC_KEY (RunPod puts your account's keys there) or SSH_PUBLIC_KEY is set
#   3. stay up: the container must outlive this script (jobs run detached; nothing here supervises them)
#
# Plain Docker: docker run --gpus all -e PUBLIC_KEY="$(cat ~/.ssh/id_ed25519.pub)" -p 2222:22 IMAGE
# or skip SSH and: docker exec -it CONTAINER nyx-session
set -euo pipefail

docker_dir="${NYX_DOCKER_DIR:-/opt/nyx/docker}"

# One key per line: an account's keys can arrive joined on one line, and sshd reads one key a line
# (the first key's comment would swallow the rest). Keys already in the file are not added again.
write_authorized_keys() {
    local file="$1" keys="$2" key
    mkdir -p "$(dirname "$file")"
    chmod 700 "$(dirname "$file")"
    touch "$file"
    chmod 600 "$file"
    while IFS= read -r key; do
        key="${key#"${key%%[![:space:]]*}"}"
        key="${key%"${key##*[![:space:]]}"}"
        [ -n "$key" ] || continue
        grep -qxF -- "$key" "$file" || printf '%s\n' "$key" >>"$file"
    done < <(printf '%s\n' "$keys" | sed -E 's/[[:space:]]+((ssh-|ecdsa-sha2-|sk-ssh-|sk-ecdsa-)[A-Za-z0-9@.-]+ )/\n\1/g')
}

start_sshd() {
    write_authorized_keys "${HOME:-/root}/.ssh/authorized_keys" "${PUBLIC_KEY:-}
${SSH_PUBLIC_KEY:-}"
    mkdir -p /run/sshd
    ssh-keygen -A >/dev/null
    /usr/sbin/sshd
    echo "nyx: sshd started (port 22)"
}

main() {
    "$docker_dir/on-start.sh"
    if [ -n "${PUBLIC_KEY:-}${SSH_PUBLIC_KEY:-}" ]; then
        start_sshd
    else
        echo "nyx: no PUBLIC_KEY, so no sshd; open Nyx with: docker exec -it CONTAINER nyx-session"
    fi
    exec sleep infinity
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
