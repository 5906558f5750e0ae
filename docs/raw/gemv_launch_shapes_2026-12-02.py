"""Sim (model outputs): is the 2026-11-30 GEMV winner (one kernel, 64 blocks of 1024 threads) still
13.8 us, 5.26 mJ? 1600 `splitk` samples of gemm 1x4096x4096, the least energy per single-kernel
launch shape of up to 128 blocks, and how often the 64 x 1024 shape is drawn.

    .venv/bin/python docs/raw/gemv_launch_shapes_2026-12-02.py > docs/raw/gemv_launch_shapes_sim_2026-12-02.txt
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from etune.measurements.sim import SimBackend  # noqa: E402
from etune.search_space import ScheduleSpace, gpu_spec  # noqa: E402

space = ScheduleSpace("gemm:1,4096,4096", gpu_spec("h100"), rule_sets=["splitk"], seed=0)
sim = SimBackend("h100")
least, counts, fastest = {}, {}, float("inf")
for seed in range(4):
    for c in space.sample(400, seed=100 + seed):
        o = sim.outcome(c)
        fastest = min(fastest, o.latency_s)
        shape = tuple((k.blocks, k.threads_per_block) for k in c.launches)
        counts[shape] = counts.get(shape, 0) + 1
        if len(shape) == 1 and shape[0][0] <= 128 and (shape not in least or o.energy_j < least[shape][1]):
            least[shape] = (o.latency_s * 1e6, o.energy_j * 1e3, o.kernels[0].limiter,
                            {n: round(v * 1e6, 2) for n, v in o.kernels[0].times.items()})
print("fastest", fastest * 1e6)
for shape, v in sorted(least.items()):
    print(shape, "%.2f us %.3f mJ" % v[:2], v[2], v[3])
print("samples of (64,1024) alone:", counts.get(((64, 1024),), 0), "of", sum(counts.values()))
