#!/usr/bin/env bash
# Installs nvcc 13.0 from PyPI into a virtual environment (no CUDA toolkit needed) and
# prints the directory to put on PATH. Pinned to 13.0: its PTX (ISA 9.0) loads on CUDA 13.0
# drivers; a newer nvcc writes PTX that such a driver refuses.
# Usage: export PATH="$(scripts/install-nvcc.sh):$PATH"
set -euo pipefail
venv="${BNTRAIN_NVCC_VENV:-/opt/nvcc}"
bin="$venv/lib/python3.11/site-packages/nvidia/cu13/bin"
if [ ! -x "$bin/nvcc" ] || ! "$bin/nvcc" --version | grep -q "release 13.0"; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
# The site-packages path depends on the venv's Python version.
found=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13/bin | head -n 1)
"$found/nvcc" --version | tail -n 2 >&2
echo "$found"
