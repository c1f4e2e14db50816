#!/usr/bin/env bash
# Creates .venv at the repo root with the verified CPU stack and every workspace package
# editable. Idempotent: re-running only installs what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=".venv/.dv365-stack"
want="$(cat tools/requirements-cpu.txt tools/requirements-store.txt tools/requirements-gr.txt tools/setup.sh | sha1sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing torch 2.13.0 (CPU), torchrec 1.8.0 + fbgemm-gpu-cpu 1.8.0 (--no-deps), pinned deps (core, store)"
  "${pip[@]}" install torch==2.13.0
  "${pip[@]}" install --no-deps fbgemm-gpu-cpu==1.8.0 torchrec==1.8.0
  "${pip[@]}" install -r tools/requirements-cpu.txt
  "${pip[@]}" install -r tools/requirements-store.txt
  echo "$want" > "$stamp"
fi
# generative-recommenders (dv365-adapters' optional `gr` extra): from the vendored source tree when it is there
gr_tar="${DV365_GR_TARBALL:-$root/../shared/vendor/generative-recommenders-6135bc3.tar.gz}"
gr_dir=".venv/src/generative-recommenders-6135bc3"
if [ -f "$gr_tar" ]; then
  if [ ! -d "$gr_dir" ]; then
    echo "[setup] generative-recommenders 6135bc3: unpacking $gr_tar into $gr_dir (on the path via a .pth file)"
    "${pip[@]}" install -r tools/requirements-gr.txt
    mkdir -p .venv/src && tar -xzf "$gr_tar" -C .venv/src
  fi
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$root/$gr_dir" > "$site/generative_recommenders.pth"
else
  echo "[setup] generative-recommenders not found at $gr_tar (set DV365_GR_TARBALL): its adapter tests will skip"
fi
# Workspace packages and applications, editable, without letting the resolver touch torch/torchrec (see README).
pkgs=()
for p in packages/*/ experiments/ benchmarks/ examples/; do pkgs+=(-e "$p"); done
"${pip[@]}" install --no-deps --no-build-isolation "${pkgs[@]}"
.venv/bin/python tools/check_env.py
echo "[setup] ready: .venv/bin/dv365 --help"
