"""benchmarks/device_check.sh --dry-run (every phase on sim, on this CPU machine), and the tuner on
the dataset it writes through the replay backend: what a GPU session's dataset will feed in CI."""
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etune.kernels import hopper_tma, parse_spec
from etune.kernels.attention_mma import mma_prefill_funcs
from etune.kernels.gemm_mma import gemm_mma_funcs
from etune.kernels.gemm_tma import gemm_tma_funcs
from etune.kernels.gemm_wgmma import gemm_wgmma_funcs
from etune.measurements.dataset import load_dataset
from etune.search_space import gpu_spec
from etune.tuner.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
sys.path.insert(0, str(REPO / "benchmarks"))
import device_check  # noqa: E402

WORKLOADS = len(device_check.SURVEY)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dry_run")
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_the_dry_run_prints_its_plan_and_runs_every_phase(dry_run):
    out, stdout = dry_run
    assert "Planned seconds per phase on the GPU" in stdout
    for phase in ("facts", "correctness", "tma", "acceptance", "survey", "vendor"):
        assert f"| {phase} | ok |" in stdout
    dataset = load_dataset(out / "dataset.jsonl")
    assert dataset.backend == "sim" and dataset.header["target"] == "h200" and dataset.header["dry_run"]
    assert [r["phase"] for r in dataset.of_type("phase")] == ["facts", "correctness", "tma", "acceptance", "survey",
                                                              "vendor"]
    tma = {r["check"]: r for r in dataset.of_type("check") if r["check"].startswith("tma:")}
    assert len(tma) == len(hopper_tma.CHECKS) and all(r["passed"] is None and r["note"] == "sim runs no code" for r in tma.values())
    assert all(r["status"] == "ok" for r in dataset.of_type("phase"))
    (isolation,) = [r for r in dataset.of_type("check") if r["check"] == "isolation"]
    assert isolation["passed"] and "SIGABRT" in isolation["errors"][1]
    (acceptance,) = dataset.of_type("acceptance")
    assert acceptance["passed"] and len(acceptance["repeats"]) == 5
    assert (out / "report.md").read_text().startswith("# Device check: NVIDIA H200 (sim (model outputs")


def test_the_dry_run_dataset_has_every_family_measured(dry_run):
    out, _ = dry_run
    dataset = load_dataset(out / "dataset.jsonl")
    records = dataset.records()
    candidates = [r for r in records.values() if r.candidate is not None]
    assert {r.spec.split(":")[0] for r in candidates} == {"gemm", "softmax", "attention"}
    assert len(dataset.specs()) == WORKLOADS
    for spec in dataset.specs():
        mine = [r for r in candidates if r.spec == spec]
        # every single-point design space (thread-level templates: prefill, GEMM and skinny GEMM) is
        # in the pool once
        workload, gpu = parse_spec(spec), gpu_spec(device_check.TARGET)
        templates = {**mma_prefill_funcs(workload, gpu), **gemm_mma_funcs(workload, gpu),
                     **gemm_wgmma_funcs(workload, gpu), **gemm_tma_funcs(workload, gpu)}
        points = [r for r in mine if not any(i[0].startswith("Sample") for i in json.loads(r.candidate["trace"])[0])]
        assert len(points) == len(templates)
        assert bool(templates) == (spec in [device_check.SURVEY[name] for name in ("attention-prefill", "gemm",
                                                                                   "gemm-skinny")])
        drawn = [r for r in mine if r.candidate["selected_by"] != "template"]
        assert len(drawn) == 6 and {r.candidate["selected_by"] for r in drawn} == {"random", "sim-best"}
        # the TMA templates wait for the tma phase to pass their GEMM checks, which sim cannot run
        tma = [r for r in mine if (r.candidate["template"] or "").startswith("gemm_tma")]
        assert len(tma) == len(gemm_tma_funcs(workload, gpu)) and bool(tma) == (spec == device_check.SURVEY["gemm"])
        assert all(r.measured("latency") for r in mine if r not in tma)
        assert not any(r.measured("latency") or r.measured("energy") for r in tma)
        assert sum(bool(r.measured("energy")) for r in mine) == min(len(mine) - len(tma),
                                                                    device_check.ENERGY_PER_WORKLOAD)
        row = mine[0].candidate
        assert row["trace"] and row["features"]["blocks_log2"] >= 0
        energy = next(r.measured("energy") for r in mine if r.measured("energy"))
        assert energy["details"]["avg_power_w"] > energy["details"]["idle_power_w"] > 0
    vendors = [r for r in records.values() if r.vendor]
    assert len(vendors) == 11 and all(r.measured("latency") and r.measured("energy") for r in vendors)


def test_the_tuner_runs_on_the_replayed_dataset_and_reports(dry_run, tmp_path):
    out, _ = dry_run
    dataset = out / "dataset.jsonl"
    db = tmp_path / "replay.db"
    for objective in ("latency", "energy"):
        result = runner.invoke(app, ["tune", "gemm:1,4096,4096", "--backend", f"replay:{dataset}", "--objective",
                                     objective, "--trials", "6", "--db", str(db)])
        assert result.exit_code == 0, result.output
        assert "backend: replay of" in result.output and "stopped by" in result.output
    report = runner.invoke(app, ["report", "--db", str(db)])
    assert report.exit_code == 0, report.output
    text = " ".join(report.output.split())
    assert "best latency" in text and "best energy@0.05" in text
    assert "on replay (replay:sim:NVIDIA H200): model outputs, not hardware" in text
    # The winner's numbers are the recorded ones (within the recorded noise), not invented.
    recorded = {r.structural_hash: r for r in load_dataset(dataset).records().values() if r.candidate}
    from etune.measurements.records import RecordsDB

    with RecordsDB.open(db) as records:
        rows = {c.id: c.structural_hash for c in records.candidates(records.workloads()[0].id)}
        for m in records.measurements():
            if m.ok and m.candidate_id is not None:
                truth = recorded[rows[m.candidate_id]].measured(m.kind)["value"]
                assert m.value == pytest.approx(truth, rel=0.05)


def test_replay_refuses_a_workload_outside_its_pool_in_one_line(dry_run, tmp_path):
    out, _ = dry_run
    proc = subprocess.run([sys.executable, "-m", "etune.tuner.cli", "tune", "softmax:1024,1024", "--backend",
                           f"replay:{out / 'dataset.jsonl'}", "--db", str(tmp_path / "x.db")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "has no candidates of softmax:1024,1024" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


class FakeGpuBackend:
    """A stand-in for the NVML backend: records the settings each measurement ran with."""

    name = "nvml"

    def __init__(self):
        self.min_window_s, self.max_windows, self.integrate_power = 1.0, 10, False
        self.target_cv, self.vendor_graph_batch_s = 0.01, None
        self.calls = []

    def device(self):
        from etune.measurements.backend import DeviceInfo

        return DeviceInfo("nvml", "Fake H200", "580.0", {"power_limit_w": 700.0})

    def _result(self, structural_hash, kind, value):
        from etune.measurements.backend import MeasureResult

        self.calls.append((structural_hash, kind, self.min_window_s, self.integrate_power))
        if structural_hash == "faulting":
            return MeasureResult(structural_hash, kind, False, error="CUDA: an illegal memory access")
        details = {"latency_s": 1e-5, "idle_power_w": 70.0, "avg_power_w": value / 1e-5,
                   "windows": [{"sampled_joules_per_call": value * 1.001}]} if kind == "energy" else {}
        return MeasureResult(structural_hash, kind, True, value, 0.001, details=details)

    def measure(self, candidates, kind, builds=None, progress=None):
        assert builds is not None and all(b.runnable and b.library.endswith("lib.so") for b in builds)
        results = [self._result(c.structural_hash, kind, 1e-5 if kind == "latency" else 2e-3) for c in candidates]
        for r in results:
            progress and progress(r)
        return results

    def measure_vendor(self, workload, kind):
        result = self._result(None, kind, 1e-5 if kind == "latency" else 2e-3)
        result.details["vendor"] = "torch"
        return result

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_the_gpu_run_orchestrates_every_phase_from_a_pack(dry_run, tmp_path):
    """``device_check.py run`` on a pack (made from the dry run's candidates), with a stand-in for
    the GPU: what the lent machine will execute, except the measuring itself."""
    import json
    import types

    out, _ = dry_run
    rows = list(load_dataset(out / "dataset.jsonl").of_type("candidate"))
    pack = tmp_path / "pack"
    pack.mkdir()
    candidates = [{**{k: r[k] for k in ("spec", "family", "design_space", "trace", "structural_hash", "features",
                                        "build", "selected_by", "template")}, "library": f"libs/{r['structural_hash']}/lib.so"}
                  for r in rows]
    # TMA check libraries that are not there: each check's worker must fail it in one line, and the
    # phase go on (no GPU here either way)
    manifest = {"target": "h200", "survey": device_check.SURVEY, "candidates": candidates,
                "faulting": {"spec": "softmax:256,256", "library": "libs/faulting/lib.so"},
                "tma_checks": {"tile_copy": "libs/tma_tile_copy/lib.so", "ring": "libs/tma_ring/lib.so"}}
    (pack / "manifest.json").write_text(json.dumps(manifest))
    backend = FakeGpuBackend()
    args = types.SimpleNamespace(pack=pack, out=tmp_path / "out", budget_s=300.0)
    args.out.mkdir()
    device_check.run(args, backend=backend)
    dataset = load_dataset(args.out / "dataset.jsonl")
    assert dataset.backend == "nvml" and dataset.gpu == "Fake H200" and backend.closed
    assert all(r["status"] == "ok" for r in dataset.of_type("phase")), list(dataset.of_type("phase"))
    tma = {r["check"]: r for r in dataset.of_type("check") if r["check"].startswith("tma:")}
    assert {name: r["passed"] for name, r in tma.items()} == {
        "tma:tile_copy": False, "tma:tile_copy_swizzle128": None, "tma:wgmma_swizzle128": None,
        "tma:wgmma_mn_major_swizzle128": None, "tma:multicast": None,
        "tma:ring": False, "tma:gemm_cluster2": None, "tma:gemm_cluster4": None}
    assert tma["tma:ring"]["errors"][0].startswith("error: RuntimeError")
    checks = {(r["check"], r.get("spec")): r["passed"] for r in dataset.of_type("check") if r["check"] not in tma}
    assert checks[("isolation", None)] and all(checks.values()) and len(checks) == 1 + WORKLOADS
    (acceptance,) = dataset.of_type("acceptance")
    assert acceptance["passed"] and acceptance["difference_sampled_power"] == pytest.approx(1 / 1.001 - 1)
    energy_calls = [c for c in backend.calls if c[1] == "energy"]
    assert [c[2:] for c in energy_calls if c[0] is None][:6] == [(1.0, False)] * 5 + [(10.0, True)]
    survey_energy = [c for c in energy_calls if c[0] is not None]
    pools = collections.Counter(r["spec"] for r in rows)  # 6 drawn, and the one-point templates
    assert len(survey_energy) == sum(min(device_check.ENERGY_PER_WORKLOAD, n) for n in pools.values())
    assert {c[2] for c in survey_energy} == {device_check.SURVEY_WINDOW_S}
    assert backend.min_window_s == 1.0 and not backend.integrate_power  # settings restored
    assert "| survey | ok |" in (args.out / "report.md").read_text()


def test_the_survey_runs_tma_templates_after_their_checks_and_stops_at_the_first_failure(monkeypatch):
    """A TMA template that hangs costs the backend's whole time-out: the survey measures them only
    once the tma phase passed the GEMM checks, one at a time, and none after one fails."""
    import time
    import types

    def member(template=None):
        return device_check.Member(None, None, "template" if template else "random", template)

    pool = {"a": member(), "b": member(), "t1": member("gemm_tma_128x256_g2x1_s4_c2"),
            "t2": member("gemm_tma_128x256_g2x1_s4_c4"), "w": member("gemm_wgmma_128x256_g2x1_s3")}
    calls = []

    def measure(session, spec, hashes, kind, **extra):
        calls.append((kind, tuple(hashes)))
        results = [types.SimpleNamespace(ok=not h.startswith("t"), structural_hash=h) for h in hashes]
        for h, r in zip(hashes, results):
            if kind == "latency":
                session.measured.add((spec, h, "latency"))
                session.latency[(spec, h)] = 1.0 if r.ok else None
        return results

    monkeypatch.setattr(device_check, "_measure", measure)
    for passed, tma_calls in ((False, []), (True, [("latency", ("t1",))])):
        calls.clear()
        session = types.SimpleNamespace(pool={"gemm": dict(pool)}, measured=set(), latency={}, backend=object(),
                                        tma_gemm_passed=passed)
        device_check._survey(session, time.monotonic() + 100)
        latency = [c for c in calls if c[0] == "latency"]
        assert latency[0] == ("latency", ("a", "b", "w")) and latency[1:] == tma_calls
        assert {h for kind, hs in calls if kind == "energy" for h in hs} == {"a", "b", "w"}


def test_measure_on_replay_answers_recorded_candidates_and_refuses_others(dry_run, tmp_path):
    out, _ = dry_run
    dataset = out / "dataset.jsonl"
    pool = {r.structural_hash for r in load_dataset(dataset).records().values() if r.candidate}
    db = tmp_path / "m.db"
    tuned = runner.invoke(app, ["tune", "gemm:1,4096,4096", "--backend", "sim", "--no-build", "--trials", "4",
                                "--seed", "7", "--objective", "latency", "--db", str(db)])
    assert tuned.exit_code == 0, tuned.output
    from etune.measurements.records import RecordsDB

    with RecordsDB.open(db) as records:
        outside = [c.id for c in records.candidates(records.workloads()[0].id) if c.structural_hash not in pool]
    assert outside
    proc = subprocess.run([sys.executable, "-m", "etune.tuner.cli", "measure", "--backend", f"replay:{dataset}",
                           "--db", str(db), "--candidate", str(outside[0]), "--kind", "latency"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "is not in the replay dataset" in proc.stderr, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_prepare_packs_the_tma_checks_as_runnable_libraries(tmp_path, monkeypatch):
    """What `prepare` carries for the tma phase: every check built with TVM's CUDA runtime enabled
    (the stand-in driver), so the library holds a cubin the GPU host can load."""
    import types

    stub = device_check.cuda_stub(tmp_path / "stub")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"{stub.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
    pack = tmp_path / "pack"
    (pack / "libs").mkdir(parents=True)
    libraries = device_check._build_tma_checks(pack, gpu_spec("h200"),
                                               types.SimpleNamespace(workdir=tmp_path / "builds", jobs=2))
    assert set(libraries) == set(hopper_tma.CHECKS)
    assert all((pack / path).stat().st_size > 10_000 for path in libraries.values())
