#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup.sh
exec .venv/bin/python -m pytest "$@"
