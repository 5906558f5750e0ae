"""Every template of the gemm_wgmma rule set (cp.async and TMA) once on sim, for the two big GEMMs:
latency, energy, energy vs sim's vendor stand-in, the cap's stretch and the kernel's time limits (us).
Model outputs, not hardware. Run: .venv/bin/python docs/raw/gemm_tma_templates_2026-12-02.py"""
from etune.measurements.sim import SimBackend, vendor_outcome
from etune.search_space import ScheduleSpace

sim = SimBackend(gpu="h100", seed=0, noise=0.0)
for spec in ("gemm:4096,4096,4096", "gemm:2048,11008,4096"):
    space = ScheduleSpace(spec, "h100", rule_sets=["gemm_wgmma"])
    vendor = vendor_outcome(space.workload, "h100")
    print(f"{spec}: vendor stand-in {vendor.latency_s * 1e6:.1f} us {vendor.energy_j * 1e3:.2f} mJ (sim)")
    rows = []
    for candidate in space.fixed_points():
        o = sim.outcome(candidate)
        (kernel,) = o.kernels
        limits = " ".join(f"{k} {v * 1e6:.0f}" for k, v in sorted(kernel.times.items(), key=lambda kv: -kv[1])[:4])
        rows.append((o.energy_j, f"  {space.design_spaces[candidate.design_space].template:32s} {o.latency_s * 1e6:6.1f} us "
                     f"{o.energy_j * 1e3:7.2f} mJ {o.energy_j / vendor.energy_j:5.3f}x  stretch "
                     f"{o.breakdown['throttle_stretch']:.3f}  {kernel.blocks_per_sm} block/SM, {kernel.rounds} rounds; {limits}"))
    for _, line in sorted(rows)[:14]:
        print(line)
