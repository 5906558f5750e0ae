#!/usr/bin/env bash
# The hardware figures the open issues still need, in steps that each fit one ten-minute call of the
# lent GPU machine. Results go to $OUT/<step>.tgz (the device tool returns at most 8 files a call);
# the records databases live in /tmp/etune-gpu, which survives while the machine stays warm.
#
#   first call:  carry [".carry_a"]  bash .carry_a/boot.sh
#   next call:   carry [".carry_b"]  source .carry_b/boot.sh && bash benchmarks/gpu_session.sh check acceptance
#   later calls: export PYTHONPATH=/tmp/tvmsite/py:$PWD && bash benchmarks/gpu_session.sh tradeoff-gemm
#
# Steps (in the order to run them; times are estimates for an H100 host with 16 cores):
#   check          device facts, TVM/CUDA, and the gpu-marked tests                          (~3 min)
#   acceptance     issue 3: torch.matmul 4096^3, 5 x etune protocol vs one 10 s window       (~1 min)
#   cost           issue 3: seconds per latency vs per energy measurement, nvml row            (~2 min)
#   tradeoff-gemm  issue 5: gemm 4096^3, latency vs energy@0.05, same trial budget            (~8 min)
#   tradeoff-softmax  issue 5: softmax 4096x4096, the same                                    (~6 min)
#   suite          issue 7: benchmarks/suite.py, resumable; run again until it says complete  (9 min each)
# The GPU is measured as found: nothing here changes clocks, power limits, persistence or ECC.
set -uo pipefail
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONPATH=${PYTHONPATH:-/tmp/tvmsite/py:$PWD} PYTHONUNBUFFERED=1
state=/tmp/etune-gpu
mkdir -p "$state"
python=${PYTHON:-python3}

pack() {  # pack <step>: everything the step wrote, as one file
    tar -C "$state" -czf "$OUT/$1.tgz" "$1" && echo "== $1 packed into \$OUT/$1.tgz"
}

for step in "$@"; do
    dir="$state/$step"
    mkdir -p "$dir"
    echo "== $step ($(date -Is))"
    case "$step" in
    check)
        nvidia-smi -q > "$dir/nvidia-smi.txt" 2>&1
        nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,temperature.gpu --format=csv | tee "$dir/gpu.csv"
        $python -c "import tvm, torch; print('tvm', tvm.__version__, 'cuda', tvm.cuda(0).exist, 'torch', torch.__version__)" | tee "$dir/versions.txt"
        $python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$dir/gpu_tests.log"
        ;;
    acceptance)
        $python benchmarks/energy_acceptance.py --out "$dir" 2>&1 | tee "$dir/log.txt"
        ;;
    cost)
        $python benchmarks/measurement_cost.py --backends nvml --samples 8 --out "$dir" --workdir "$state/builds" 2>&1 | tee "$dir/log.txt"
        ;;
    tradeoff-gemm)
        $python benchmarks/objective_tradeoff.py --spec gemm:4096,4096,4096 --trials 64 --seeds 0 --backend nvml --out "$dir" 2>&1 | tee "$dir/log.txt"
        ;;
    tradeoff-softmax)
        $python benchmarks/objective_tradeoff.py --spec softmax:4096,4096 --trials 64 --seeds 0 --backend nvml --out "$dir" 2>&1 | tee "$dir/log.txt"
        ;;
    suite)
        $python benchmarks/suite.py --backend nvml --trials 64 --db "$state/suite.db" --time-budget 500 \
            --workloads gemm-4096 softmax-4096x4096 attention-decode-4096 attention-prefill-2048 --out "$dir" 2>&1 | tee -a "$dir/log.txt"
        cp "$state/suite.db" "$dir/" 2>/dev/null
        ;;
    *)
        echo "unknown step $step (check, acceptance, cost, tradeoff-gemm, tradeoff-softmax, suite)" >&2
        exit 2
        ;;
    esac
    pack "$step"
done
