"""Every TMA template of the two big suite GEMMs built for sm_90a through etune's builder (CPU, no GPU):
ok, registers, spills, build seconds. Run: .venv/bin/python docs/raw/gemm_tma_builds_2026-12-02.py"""
import tempfile
from pathlib import Path

from etune.search_space import Builder, ScheduleSpace

for spec in ("gemm:4096,4096,4096", "gemm:2048,11008,4096"):
    space = ScheduleSpace(spec, "h100", rule_sets=["gemm_wgmma"])
    points = [c for c in space.fixed_points() if space.design_spaces[c.design_space].template.startswith("gemm_tma")]
    with tempfile.TemporaryDirectory() as tmp:
        results = Builder(space.gpu, workdir=Path(tmp), jobs=2).build(points)
    ok = [r for r in results if r.ok]
    print(f"{spec}: {len(ok)} of {len(points)} TMA templates built")
    for c, r in zip(points, results):
        k = r.kernels[0] if r.kernels else None
        print(f"  {space.design_spaces[c.design_space].template:30s} {r.status:6s} "
              + (f"{k.registers} registers, spills {k.spill_store_bytes}/{k.spill_load_bytes} B, {r.seconds:.1f} s"
                 if k else (r.error or "")[:200]))
