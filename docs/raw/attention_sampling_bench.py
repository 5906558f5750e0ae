"""Sampling time per valid candidate, new sampler vs the one before kernel-by-kernel repair.

    git show 20ea24a:search_space/space.py > /tmp/space_orig.py
    for impl in new old; do .venv/bin/python docs/raw/attention_sampling_bench.py $impl attention:1,32,2048,2048,128 32; done

Prints one JSON line: CPU and wall seconds of ``ScheduleSpace.sample(n, seed=0)`` and the replays it took.
"""
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

which, spec, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
replays = [0]
if which == "old":
    import search_space  # noqa: F401  (the package, for the old module's relative imports)

    path = os.environ.get("OLD_SPACE", "/tmp/space_orig.py")
    loader = importlib.util.spec_from_file_location("search_space.space_orig", path)
    module = importlib.util.module_from_spec(loader)
    sys.modules["search_space.space_orig"] = module
    loader.loader.exec_module(module)
    Space = module.ScheduleSpace
    replay = Space._replay

    def counting(self, *args, **kwargs):
        replays[0] += 1
        return replay(self, *args, **kwargs)

    Space._replay = counting
else:
    from search_space.space import ScheduleSpace as Space

started = time.time()
space = Space(spec)
init = time.time() - started
started, cpu = time.time(), time.process_time()
candidates = space.sample(n, seed=0)
wall, cpu = time.time() - started, time.process_time() - cpu
print(json.dumps({"impl": which, "spec": spec, "asked": n, "found": len(candidates), "init_s": round(init, 1),
                  "sample_wall_s": round(wall, 1), "sample_cpu_s": round(cpu, 1),
                  "cpu_s_per_candidate": round(cpu / max(1, len(candidates)), 2),
                  "spaces": [c.design_space for c in candidates], "kernels": sorted({len(c.launches) for c in candidates}),
                  "stats": getattr(space, "last_sample", None) or {"replays": replays[0]}}))
