#!/usr/bin/env bash
# Set up .venv and train the demo LoRA on the CPU (no download, no GPU). Extra arguments go to `nyx demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/nyx demo --headless "$@"
