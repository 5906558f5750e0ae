#!/usr/bin/env bash
# The device check (benchmarks/device_check.py says what each phase measures). One GPU call:
#
#   here, first (CPU, ~15 min, no device time):  bash benchmarks/device_check.sh prepare
#   then one device call:  carry [".carry_hw"], timeout_s 450, command
#                          bash benchmarks/device_check.sh run
#   back here:             bash benchmarks/device_check.sh import /work/.device/<files_at>
#                          (gzips the dataset into data/hw/ and adds the results to docs/results.md)
#   anywhere, no GPU:      bash benchmarks/device_check.sh --dry-run   (every phase on sim; CI runs it)
#
# On the GPU host nothing is installed: the pack holds a runtime-only TVM for its Python 3.12 and
# libcudart.so.13, and the host's python3 already has PyTorch, NVML bindings, numpy and cloudpickle.
# The GPU is measured as found: nothing here changes clocks, power limits, persistence, ECC or MIG.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
shift || true
case "$mode" in
prepare)
    exec .venv/bin/python benchmarks/device_check.py prepare "$@"
    ;;
--dry-run|dry-run)
    exec "${PYTHON:-.venv/bin/python}" benchmarks/device_check.py dry-run "$@"
    ;;
import)
    exec .venv/bin/python benchmarks/device_check.py import "$@"
    ;;
run)
    : "${OUT:?OUT must name the folder whose files come back}"
    test -f .carry_hw/manifest.json || { echo "no .carry_hw: run 'bash benchmarks/device_check.sh prepare' here first, and carry it"; exit 2; }
    rt=/tmp/etune-runtime
    mkdir -p "$rt" && tar -xJf .carry_hw/runtime.tar.xz -C "$rt" || exit 3
    # PyTorch's own CUDA 13 runtime when the host has one, else the carried copy.
    cudart=$(python3 -c "import glob, os, site; print(next((os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/**/libcudart.so.13', recursive=True)), ''))" 2>/dev/null)
    export LD_LIBRARY_PATH="${cudart:-$rt/lib}:$rt/lib:${LD_LIBRARY_PATH:-}"
    export PYTHONPATH="$rt/py:$PWD" PYTHONUNBUFFERED=1 TVM_USE_RUNTIME_LIB=1
    timeout "${DEVICE_CHECK_TIMEOUT_S:-420}" python3 benchmarks/device_check.py run --out "$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
    ;;
*)
    echo "usage: bash benchmarks/device_check.sh [prepare|run|import DIR|--dry-run]" >&2
    exit 2
    ;;
esac
