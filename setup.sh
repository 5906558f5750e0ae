#!/usr/bin/env bash
# Creates .venv (Python >= 3.10) and installs etune with its pinned dependencies. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# `bash setup.sh test` also installs what the test suite needs (the `test` extra).
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".$extra" >/dev/null
command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || [ -n "${CUDA_HOME:-}" ] \
  || echo "warning: nvcc not found; candidates cannot be built (install the CUDA toolkit)" >&2
