#!/usr/bin/env bash
# Set up .venv and run the whole test suite (lint, types, tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/ruff check nyx_tui tests bench
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
