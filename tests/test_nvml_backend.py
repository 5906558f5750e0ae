"""The nvml backend and ``etune measure``.

Without a GPU: the backend's refusals (NVML missing, no GPU) through a monkeypatched NVML, its
handling of candidates that cannot run, the per-call arithmetic of batched energy launches, and the
CLI's one-line errors. With a GPU (marked ``gpu``): a faulting kernel is a failed result and the next
candidate measures fine; a vendor matmul energy measurement converges.
"""
from __future__ import annotations

import math
import time
import types

import pynvml
import pytest
import typer
from typer.testing import CliRunner

from etune.measurements import nvml_backend
from etune.measurements import make_backend
from etune.measurements.backend import BackendError
from etune.measurements.nvml_backend import NvmlBackend
from etune.measurements.nvml_energy import EnergyResult, EnergyWindow
from etune.measurements.records import RecordsDB
from etune.measurements.tvm_runner import faulting_candidate
from etune.search_space import BuildResult


# -- a fake NVML ----------------------------------------------------------------------------------
def _nvml_error(code):
    def raise_(*_args, **_kwargs):
        raise pynvml.NVMLError(code)

    return raise_


@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlInit", _nvml_error(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))


@pytest.fixture
def fake_nvml(monkeypatch, tmp_path):
    """NVML that answers for one GPU (no kernels can run: nothing here launches any)."""
    monkeypatch.setenv("ETUNE_LOCK_DIR", str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = {"init": 0, "shutdown": 0}

    def init():
        calls["init"] += 1

    def shutdown():
        calls["shutdown"] += 1

    for name, value in {
        "nvmlInit": init,
        "nvmlShutdown": shutdown,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda i: f"handle{i}",
        "nvmlDeviceGetName": lambda h: "Fake H100",
        "nvmlSystemGetDriverVersion": lambda: "580.0",
        "nvmlDeviceGetEnforcedPowerLimit": lambda h: 700_000,
        "nvmlDeviceGetMaxClockInfo": lambda h, c: 1980,
        "nvmlDeviceGetClockInfo": lambda h, c: 1755,
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(total=80 << 30),
        "nvmlDeviceGetUUID": lambda h: "GPU-1234-abcd",
    }.items():
        monkeypatch.setattr(pynvml, name, value)
    return calls


# -- refusals -------------------------------------------------------------------------------------
def test_without_nvml_the_backend_refuses_in_one_line(no_nvml):
    with pytest.raises(BackendError) as info:
        NvmlBackend()
    message = str(info.value)
    assert "NVML is not available" in message and "--backend sim" in message
    assert "\n" not in message


def test_make_backend_nvml_without_nvml(no_nvml):
    with pytest.raises(BackendError, match="NVML is not available"):
        make_backend("nvml")


def test_no_gpu_and_bad_index_are_refused(fake_nvml, monkeypatch):
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 0)
    with pytest.raises(BackendError, match="found no NVIDIA GPU"):
        NvmlBackend()
    monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: 1)
    with pytest.raises(BackendError, match="no GPU 3 .NVML sees 1."):
        NvmlBackend(device_index=3)
    assert fake_nvml["init"] == fake_nvml["shutdown"] == 2  # NVML released after each refusal


def test_device_info(fake_nvml):
    with NvmlBackend() as backend:
        info = backend.device()
    assert info.backend == "nvml" and info.name == "Fake H100" and info.driver == "580.0"
    assert info.details["power_limit_w"] == 700.0 and info.details["max_sm_clock_mhz"] == 1980
    assert "idle_power_w" not in info.details  # not measured yet
    assert fake_nvml["init"] == fake_nvml["shutdown"] == 1


def test_cuda_index_follows_cuda_visible_devices(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert nvml_backend._cuda_index(0, "h") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert nvml_backend._cuda_index(5, "h") == 0  # matched by UUID prefix
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(BackendError, match="not in CUDA_VISIBLE_DEVICES"):
        nvml_backend._cuda_index(0, "h")


# -- candidates that cannot run ------------------------------------------------------------------
def _candidate(h):
    return types.SimpleNamespace(structural_hash=h, workload=types.SimpleNamespace(spec="softmax:64,64"))


def test_candidates_without_a_runnable_build_fail_without_running_anything(fake_nvml, tmp_path):
    builds = [
        None,
        BuildResult("b", "error", 1.0, error="nvcc: error: boom"),
        BuildResult("c", "timeout", 60.0, error="build timed out after 60 s"),
        BuildResult("d", "ok", 1.0, artifact_dir=str(tmp_path), runnable=False),
        BuildResult("e", "ok", 1.0, artifact_dir=str(tmp_path / "gone"), runnable=True),
    ]
    seen = []
    with NvmlBackend() as backend:
        results = backend.measure([_candidate(h) for h in "abcde"], "latency", builds=builds,
                                  progress=seen.append)
        assert backend._runner is None  # no worker was started
    assert [r.structural_hash for r in results] == list("abcde") and seen == results
    assert not any(r.ok for r in results) and all(r.kind == "latency" for r in results)
    errors = [r.error for r in results]
    assert errors[0].startswith("not built")
    assert errors[1] == "build error: nvcc: error: boom"
    assert errors[2] == "build timeout: build timed out after 60 s"
    assert "without a CUDA-enabled TVM runtime" in errors[3]
    assert errors[4].startswith("built library missing")


def test_measure_needs_builds_and_a_known_kind(fake_nvml):
    with NvmlBackend() as backend:
        with pytest.raises(ValueError, match="builds"):
            backend.measure([_candidate("a")], "latency")
        with pytest.raises(ValueError, match="kind"):
            backend.measure([_candidate("a")], "power", builds=[None])


def test_a_held_gpu_lock_is_a_backend_error_when_not_waiting(fake_nvml):
    from etune.measurements.gpu_lock import GpuLock

    with GpuLock(0), NvmlBackend(lock_wait=False) as backend:
        with pytest.raises(BackendError, match="GPU 0 is busy"):
            backend.measure([_candidate("a")], "latency", builds=[None])


# -- energy arithmetic ----------------------------------------------------------------------------
def test_energy_record_divides_batched_launches_into_calls():
    calls = 101  # time_evaluator(number=100): 100 timed calls + 1 warm-up per launch
    window = EnergyWindow(launches=200, seconds=1.0, joules=500.0, joules_per_call=2.5, seconds_per_call=0.005,
                          avg_power_w=500.0, t_start=0.0, t_end=1.0, temperature_c=50.0, sm_clock_mhz=1755.0,
                          power_w=520.0)
    result = EnergyResult(energy_per_call_j=2.5, latency_per_call_s=0.005, cv=0.004, windows=[window] * 3,
                          idle_power_w=70.0, energy_above_idle_per_call_j=2.5 - 70.0 * 0.005,
                          method="counter", converged=True)
    record = nvml_backend.energy_record(result, calls, {"launch": "test"})
    d = record["details"]
    assert record["ok"] and math.isclose(record["value"], 2.5 / calls)
    assert math.isclose(d["latency_s"], 0.005 / calls) and math.isclose(d["avg_power_w"], 500.0)
    assert math.isclose(d["energy_above_idle_j"], (2.5 - 0.35) / calls)
    assert d["idle_power_w"] == 70.0 and d["converged"] and d["method"] == "counter"
    assert d["windows"][0]["calls"] == 200 * calls and d["calls_per_launch"] == calls
    assert math.isclose(d["windows"][0]["joules_per_call"], 2.5 / calls)
    assert record["spread"] == 0.004 and record["temperature_c"] == 50.0 and record["sm_clock_mhz"] == 1755.0
    assert d["launch"] == "test"
    one = EnergyResult(2.5, 0.005, None, [window], None, None, "power-integration", False)
    assert nvml_backend.energy_record(one, 1)["spread"] is None


def test_vendor_names():
    from etune.kernels import parse_spec
    from etune.measurements.vendor import VendorError, vendor_name

    assert vendor_name(parse_spec("gemm:64,64,64")) == "torch.matmul"
    assert vendor_name(parse_spec("softmax:4,8")) == "torch.softmax"
    assert vendor_name(parse_spec("attention:1,2,4,8,16,causal")).endswith("scaled_dot_product_attention")
    with pytest.raises(VendorError):
        vendor_name(types.SimpleNamespace(family="conv"))


# -- the worker's code on the CPU: an llvm library and a fake energy meter -----------------------
class WallClockMeter:
    """A device drawing ``watts`` all the time, its counter publishing every ``step_s``."""

    def __init__(self, watts=100.0, step_s=0.02):
        self.watts, self.step_s, self.t0 = watts, step_s, time.perf_counter()

    def total_energy_mj(self):
        steps = int((time.perf_counter() - self.t0) / self.step_s)
        return int(steps * self.step_s * self.watts * 1000)

    def power_w(self):
        return self.watts

    def temperature_c(self):
        return 40.0

    def sm_clock_mhz(self):
        return 1000.0

    def device_name(self):
        return "meter"

    def driver_version(self):
        return "0"


SPEC = "softmax:64,256"


@pytest.fixture(scope="module")
def llvm_libraries(tmp_path_factory):
    """A correct and a wrong (copying) llvm library with the signature of SPEC."""
    import tvm
    from tvm import te

    from etune.kernels import parse_spec

    directory = tmp_path_factory.mktemp("llvm")
    workload = parse_spec(SPEC)
    x = te.placeholder((64, 256), "float16", name="X")
    copy = te.create_prim_func([x, te.compute((64, 256), lambda i, j: x[i, j], name="Y")])
    paths = {}
    for name, func in (("good", workload.prim_func), ("wrong", copy)):
        path = directory / f"{name}.so"
        tvm.compile(tvm.IRModule({"main": func}), target="llvm").export_library(str(path))
        paths[name] = str(path)
    return paths


def _cpu_options(**overrides):
    options = {"seed": 0, "nvml_index": 0, "cuda_index": 0, "device_type": "cpu",
               "energy_source": WallClockMeter(), "latency_repeats": 5, "latency_repeat_s": 1e-3,
               "latency_warmup_s": 0.01, "latency_budget_s": 0.5, "energy_batch_s": 0.002,
               "min_window_s": 0.2, "max_windows": 3, "target_cv": 0.05, "idle_power_w": 20.0}
    options.update(overrides)
    return options


def test_candidate_task_latency_on_cpu(llvm_libraries):
    record = nvml_backend.candidate_task(SPEC, llvm_libraries["good"], "latency", _cpu_options())
    assert record["ok"], record
    d = record["details"]
    assert d["checked"] and d["rel_err"] < 2e-3
    assert 0 < d["min_s"] <= record["value"] == d["median_s"] < 0.1
    assert d["repeats"] >= 3 and d["number"] >= 1
    assert record["temperature_c"] == 40.0 and record["sm_clock_mhz"] == 1000.0


def test_candidate_task_wrong_output(llvm_libraries):
    record = nvml_backend.candidate_task(SPEC, llvm_libraries["wrong"], "latency", _cpu_options())
    assert not record["ok"] and record["error"].startswith("wrong output (rel err ")
    assert record["details"]["rel_err"] > 0.1


def test_candidate_task_energy_divides_batches_into_calls(llvm_libraries):
    record = nvml_backend.candidate_task(SPEC, llvm_libraries["good"], "energy", _cpu_options())
    assert record["ok"], record
    d = record["details"]
    assert d["method"] == "counter" and d["calls_per_launch"] >= 2 and len(d["windows"]) >= 1
    # The meter draws 100 W all the time, so energy per call is 100 W x wall time per call.
    assert math.isclose(record["value"], 100.0 * d["latency_s"], rel_tol=0.05)
    assert math.isclose(d["energy_above_idle_j"], 80.0 * d["latency_s"], rel_tol=0.1)
    assert 0 < d["busy_fraction"] <= 1.0  # CPU timings on a shared machine: only sane
    assert all(w["calls"] % d["calls_per_launch"] == 0 for w in d["windows"])


def test_candidate_task_through_the_runner(llvm_libraries):
    from etune.measurements.runner import IsolatedRunner

    with IsolatedRunner(timeout_s=60) as runner:
        prepared = runner.run(nvml_backend.prepare_task, (SPEC, 0))
        assert prepared.ok, prepared
        result = runner.run(nvml_backend.candidate_task, (SPEC, llvm_libraries["good"], "latency", _cpu_options()))
    assert result.ok and result.value["ok"], result


@pytest.mark.parametrize("spec", ["gemm:32,48,64", "softmax:16,300", "attention:2,3,8,8,16",
                                  "attention:2,3,8,8,16,causal", "attention:2,3,5,12,16,causal",
                                  "attention:1,2,1,40,16,causal"])
def test_vendor_calls_match_the_references(spec):
    """The torch call per family (on the CPU, in fp32): layouts and the bottom-right causal mask."""
    torch = pytest.importorskip("torch")
    from etune.kernels import parse_spec
    from etune.measurements import vendor

    workload = parse_spec(spec)
    inputs = workload.random_inputs(1)
    tensors = [t.float() for t in vendor._inputs_on_device(torch, workload, inputs, torch.device("cpu"))]
    call, notes = vendor._call(torch, workload, tensors, torch.device("cpu"))
    ok, err = workload.check([call().numpy().astype("float16")], workload.reference(inputs))
    assert ok, (err, notes)


# -- etune measure: user mistakes -----------------------------------------------------------------
def _cli():
    from etune.tuner.measure_cmd import measure_command

    app = typer.Typer()
    app.command("measure")(measure_command)

    @app.callback()
    def _root() -> None:  # keeps "measure" a subcommand, as in the real CLI
        pass

    return app


def _invoke(*args):
    result = CliRunner().invoke(_cli(), ["measure", *args])
    return result, (result.stderr if hasattr(result, "stderr") else result.output)


def _one_line_error(result, stderr, code=2):
    assert result.exit_code == code, (result.output, stderr)
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_measure_missing_database(tmp_path):
    line = _one_line_error(*_invoke("--db", str(tmp_path / "nope.db"), "--candidate", "1", "--backend", "sim"))
    assert "no records database at" in line
    assert not (tmp_path / "nope.db").exists()  # not created by asking


def test_measure_unknown_candidate(tmp_path):
    path = tmp_path / "runs.db"
    with RecordsDB.open(path) as db:
        wid = db.add_workload("softmax:64,64", "softmax", {"rows": 64, "cols": 64})
        db.add_candidate(wid, "00ff", 0, "[]")
    line = _one_line_error(*_invoke("--db", str(path), "--candidate", "42", "--backend", "sim"))
    assert f"no candidate 42 in {path}" in line


@pytest.mark.parametrize("args, expected", [
    (["--vendor", "gemm:1,2"], "gemm needs 3 sizes"),
    (["--vendor", "conv:1,2"], "unknown kernel family"),
    (["--vendor", "softmax:4,4", "--kind", "power"], "--kind must be one of"),
    (["--vendor", "softmax:4,4", "--backend", "rocm"], "unknown backend"),
    ([], "exactly one of --candidate"),
    (["--vendor", "softmax:4,4", "--candidate", "1", "--db", "x.db"], "exactly one of --candidate"),
    (["--candidate", "1"], "--candidate needs --db"),
])
def test_measure_user_mistakes(args, expected):
    assert expected in _one_line_error(*_invoke(*args))


def test_measure_nvml_without_a_gpu(no_nvml):
    line = _one_line_error(*_invoke("--vendor", "softmax:64,64", "--backend", "nvml"))
    assert "NVML is not available" in line


def _sim_available() -> bool:
    try:
        from etune.measurements.sim import SimBackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _sim_available(), reason="measurements.sim.SimBackend not written yet")
def test_measure_vendor_and_candidate_on_sim_are_recorded(tmp_path):
    from etune.search_space import ScheduleSpace

    path = tmp_path / "runs.db"
    result, stderr = _invoke("--vendor", "softmax:256,256", "--backend", "sim", "--db", str(path))
    assert result.exit_code == 0, (result.output, stderr)
    assert "sim" in result.output and "torch.softmax" in result.output
    space = ScheduleSpace("softmax:256,256", "h100")
    (candidate,) = space.sample(1, seed=3)
    with RecordsDB.open(path) as db:
        (workload,) = db.workloads()
        vendor_rows = db.measurements(workload.id)
        assert {m.kind for m in vendor_rows} == {"latency", "energy"}
        assert all(m.candidate_id is None and m.backend == "sim" for m in vendor_rows)
        assert all(m.details["vendor"] == "torch.softmax" for m in vendor_rows)
        cid = db.add_candidate(workload.id, candidate.structural_hash, candidate.design_space,
                               candidate.trace_json())
    result, stderr = _invoke("--db", str(path), "--candidate", str(cid), "--backend", "sim", "--kind", "latency")
    assert result.exit_code in (0, 1), (result.output, stderr)
    with RecordsDB.open(path) as db:
        (row,) = db.measurements(candidate_id=cid)
    assert row.kind == "latency" and row.backend == "sim"
    assert "sim" in result.output


# -- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_faulting_kernel_fails_and_the_next_candidate_measures(tmp_path, monkeypatch):
    from etune.search_space import Builder, ScheduleSpace

    monkeypatch.setenv("ETUNE_LOCK_DIR", str(tmp_path))
    good = ScheduleSpace("softmax:256,256", "local").sample(2, seed=1)
    bad = faulting_candidate()
    bad.structural_hash = f"fault{time.time_ns():x}"
    candidates = [good[0], bad, good[1]]
    builds = Builder("local", workdir=tmp_path / "builds", jobs=2).build(candidates)
    assert all(b.ok and b.runnable for b in builds), builds
    with NvmlBackend(timeout_s=120) as backend:
        results = backend.measure(candidates, "latency", builds=builds)
        assert results[0].ok, results[0]
        assert not results[1].ok and results[1].value is None
        assert results[1].error and ("illegal" in results[1].error.lower() or "crashed" in results[1].error
                                     or "CUDA" in results[1].error), results[1].error
        assert results[2].ok, results[2]
        for r in (results[0], results[2]):
            assert 0 < r.value < 1e-3 and r.details["checked"] and r.details["rel_err"] < 2e-3
            assert r.details["min_s"] <= r.details["median_s"] and r.details["repeats"] >= 3
        energy = backend.measure([good[0]], "energy", builds=[builds[0]])[0]
        assert energy.ok, energy
        assert energy.details["idle_power_w"] and energy.details["windows"]
        assert energy.details["calls_per_launch"] > 1 and 0.5 < energy.details["busy_fraction"] <= 1.0


@pytest.mark.nvml
def test_vendor_matmul_energy_converges(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from etune.kernels import gemm

    monkeypatch.setenv("ETUNE_LOCK_DIR", str(tmp_path))
    with NvmlBackend() as backend:
        latency = backend.measure_vendor(gemm(4096, 4096, 4096), "latency")
        energy = backend.measure_vendor(gemm(4096, 4096, 4096), "energy")
        info = backend.device()
    assert latency.ok and energy.ok, (latency, energy)
    assert latency.details["vendor"] == "torch.matmul" and latency.details["rel_err"] < 2e-3
    d = energy.details
    assert d["converged"], d
    assert d["method"] == "counter" and d["batching"] == "cuda-graph"
    assert 0 < d["energy_above_idle_j"] < energy.value
    # 2 * 4096^3 flops per call: between 10 and 1000 TFLOP/s, and within the board's power.
    assert 1.4e-4 < d["latency_s"] < 1.4e-2
    assert d["avg_power_w"] < 1.2 * info.details.get("power_limit_w", 1000)
    assert info.details["idle_power_w"] > 0
