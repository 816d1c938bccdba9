#!/usr/bin/env bash
# Make (or refresh) .venv with Nyx installed in editable mode, its test tools, and the pinned torch.
# Usage: bash scripts/setup.sh [EXTRAS]   (EXTRAS defaults to "test")
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "Nyx needs Python 3.11 or newer; $("$python" --version 2>&1) found. Set PYTHON=/path/to/python3.11." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c scripts/constraints.txt -e ".[${extras}]"
