#!/usr/bin/env bash
# README command 2: set up, check formatting and lint, then run the whole test suite.
# The store tests run a real redis-server, a 3-master Redis Cluster (redis-server in cluster mode joined by
# `redis-cli --cluster create`) and make TLS certificates with openssl (Debian packages: redis-server brings
# redis-tools, which holds redis-cli);
# they are installed here when missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/setup.sh
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing Debian's redis-server and openssl for the store tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null
  else
    echo "[test] redis-server/redis-cli/openssl missing: install them (e.g. sudo apt-get install redis-server openssl) to run the store tests" >&2
    exit 1
  fi
fi
echo "[test] ruff format --check and ruff check (the formatter and linter of the whole tree; pyproject.toml [tool.ruff])"
.venv/bin/ruff format --check --quiet . || { echo "[test] run: .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet . || { echo "[test] run: .venv/bin/ruff check --fix . (and fix what it cannot)" >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
