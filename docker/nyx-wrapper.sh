#!/bin/sh
# /usr/local/bin/nyx in the Docker image: Nyx with the container's environment wherever it is started from.
# `ssh HOST nyx jobs` runs without a login shell, so neither the image's ENV nor the template's variables are
# there; without this, that command would read an empty ~/.local/share/nyx instead of $NYX_HOME.
# shellcheck source=docker/nyx-env.sh
. "${NYX_DOCKER_DIR:-/opt/nyx/docker}/nyx-env.sh"
exec "${NYX_VENV:-/opt/nyx/venv}/bin/nyx" "$@"
