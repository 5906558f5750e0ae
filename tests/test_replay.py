"""Recorded datasets (measurements.dataset), the replay backend and the pool space it offers."""
import gzip
import json
import random
import types

import pytest

from etune.kernels import parse_spec
from etune.measurements import make_backend
from etune.measurements.backend import BackendError, MeasureResult, model_output
from etune.measurements.dataset import DatasetError, DatasetWriter, load_dataset, make_header
from etune.measurements.replay import ReplayBackend

SPEC = "softmax:256,256"


def _candidate(h, spec=SPEC):
    return types.SimpleNamespace(structural_hash=h, workload=parse_spec(spec))


def _write(path, rows, backend="nvml"):
    with DatasetWriter(path, make_header(backend, "NVIDIA H200", "580.1", target="h200")) as writer:
        for row in rows:
            writer.write(row)


def _measurement(h, kind, value, spread=0.01, ok=True, **details):
    return {"type": "measurement", "spec": SPEC, "structural_hash": h, "vendor": None, "kind": kind, "ok": ok,
            "value": value if ok else None, "spread": spread, "error": None if ok else "wrong output (rel err 1)",
            "sm_clock_mhz": 1980.0, "temperature_c": 40.0, "details": details}


@pytest.fixture
def recorded(tmp_path):
    path = tmp_path / "session.jsonl"
    _write(path, [
        {"type": "candidate", "spec": SPEC, "family": "softmax", "design_space": 0, "trace": "[]",
         "structural_hash": "aa", "features": {"x": 1.0}, "build": None, "selected_by": "random"},
        _measurement("aa", "latency", 10e-6, spread=0.02),
        _measurement("aa", "energy", 2e-3, spread=0.0, latency_s=10e-6, idle_power_w=70.0),
        _measurement("bb", "latency", None, ok=False),
        {**_measurement(None, "energy", 1e-3, spread=0.0, latency_s=8e-6), "vendor": "torch.softmax"},
    ])
    return path


def test_writer_and_reader_round_trip_with_nan_as_missing(tmp_path):
    path = tmp_path / "d.jsonl"
    result = MeasureResult("aa", "latency", True, 1e-5, float("nan"), details={"median_s": 1e-5})
    with DatasetWriter(path, make_header("sim", "NVIDIA H200", None)) as writer:
        writer.measurement(SPEC, result, phase="survey")
    dataset = load_dataset(path)
    assert dataset.backend == "sim" and dataset.gpu == "NVIDIA H200" and not dataset.truncated
    (row,) = dataset.rows
    assert row["value"] == 1e-5 and row["spread"] is None and row["phase"] == "survey"
    assert dataset.header["versions"]["tvm"]  # what measured is recorded


def test_a_torn_last_line_is_dropped_and_said(recorded):
    with open(recorded, "a") as f:
        f.write('{"type": "measurement", "spec": "soft')  # the call was killed mid-line
    dataset = load_dataset(recorded)
    assert dataset.truncated and len(dataset.rows) == 5


def test_gzipped_datasets_read_the_same(recorded, tmp_path):
    gz = tmp_path / "session.jsonl.gz"
    gz.write_bytes(gzip.compress(recorded.read_bytes()))
    assert load_dataset(gz).rows == load_dataset(recorded).rows


@pytest.mark.parametrize("content, message", [
    ("", "not an etune dataset"),
    ('{"type": "measurement"}\n', "not an etune dataset"),
    ('{"type": "header", "format": "etune-dataset", "version": 99}\n', "version 99"),
    ('{"type": "header", "format": "etune-dataset", "version": 1}\nnot json\n{}\n', "is not a JSON line"),
])
def test_files_that_are_not_datasets_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_replay_answers_recorded_values_with_recorded_spread(recorded):
    backend = make_backend(f"replay:{recorded}")
    assert backend.name == "replay" and backend.target == "h200"
    values = [backend.measure([_candidate("aa")], "latency")[0].value for _ in range(200)]
    assert all(v > 0 for v in values)
    mean = sum(values) / len(values)
    cv = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5 / mean
    assert mean == pytest.approx(10e-6, rel=0.01) and cv == pytest.approx(0.02, rel=0.25)
    energy = backend.measure([_candidate("aa")], "energy")[0]
    assert energy.ok and energy.value == 2e-3  # no spread recorded: the value itself
    assert energy.details["avg_power_w"] == pytest.approx(200.0)
    assert energy.details["energy_above_idle_j"] == pytest.approx(2e-3 - 70.0 * 10e-6)
    again = ReplayBackend(recorded).measure([_candidate("aa")], "latency")[0].value
    assert again == values[0]  # seeded: a run repeats


def test_replay_misses_are_explicit_failures_never_numbers(recorded):
    backend = ReplayBackend(recorded)
    unknown, unmetered, failed = (backend.measure([_candidate(h)], kind)[0]
                                  for h, kind in (("cc", "latency"), ("bb", "energy"), ("bb", "latency")))
    assert not unknown.ok and unknown.value is None and "not in the replay dataset" in unknown.error
    assert not unmetered.ok and "no energy measurement in the replay dataset" in unmetered.error
    assert not failed.ok and failed.error == "wrong output (rel err 1)"
    vendor = backend.measure_vendor(parse_spec(SPEC), "energy")
    assert vendor.ok and vendor.value == 1e-3 and vendor.details["vendor"] == "torch.softmax"
    assert not backend.measure_vendor(parse_spec("softmax:512,512"), "latency").ok


def test_replay_refuses_a_workload_or_file_it_does_not_have(recorded, tmp_path):
    backend = ReplayBackend(recorded)
    with pytest.raises(BackendError, match=r"has no candidates of softmax:512,512 \(it has: softmax:256,256\)"):
        backend.recorded_pool("softmax:512,512")
    with pytest.raises(BackendError, match="no dataset at"):
        make_backend(f"replay:{tmp_path / 'missing.jsonl'}")


def test_a_replay_of_a_sim_dataset_is_still_a_model_output(recorded, tmp_path):
    assert not model_output("replay", ReplayBackend(recorded).device().name)
    sim_made = tmp_path / "sim.jsonl"
    _write(sim_made, [], backend="sim")
    assert model_output("replay", ReplayBackend(sim_made).device().name)
    assert model_output("sim", "sim:NVIDIA H200")


def test_pool_space_only_offers_pool_schedules():
    from etune.search_space import ScheduleSpace
    from etune.search_space.pool import PoolSpace

    space = ScheduleSpace("gemm:1,1024,1024", "h200")
    everything = space.sample(12, seed=3)
    pool = everything[:6]
    pooled = PoolSpace(space, [(c.design_space, c.trace_json(), c.structural_hash) for c in pool]
                       + [(0, "[]", "0000")])  # a trace that does not replay to its hash
    hashes = {c.structural_hash for c in pool}
    assert set(pooled.members) == hashes and [h for h, _ in pooled.unreplayable] == ["0000"]
    assert {c.structural_hash for c in pooled.sample(10, seed=1)} == hashes
    assert len(pooled.sample(10, seed=1, exclude={pool[0].structural_hash})) == 5
    rng = random.Random(0)
    for parent in pool:
        child = pooled.mutate(parent, rng)
        assert child is None or (child.structural_hash in hashes and child.structural_hash != parent.structural_hash)
    same_space = [c for c in pool if c.design_space == pool[0].design_space]
    if len(same_space) >= 3:
        child = pooled.crossover(same_space[0], same_space[1], rng)
        assert child.structural_hash in hashes - {same_space[0].structural_hash, same_space[1].structural_hash}


def test_h200_preset_and_nvml_name():
    from etune.search_space.targets import PRESETS, gpu_spec

    h200 = gpu_spec("h200")
    assert (h200.arch, h200.sm_count, h200.memory_bandwidth, h200.memory_bytes, h200.tdp_w) == \
        ("sm_90", 132, 4.8e12, 141 * 10**9, 700.0)
    assert h200.memory_bandwidth > PRESETS["h100"].memory_bandwidth


def test_local_finds_the_h200_preset_by_nvml_name(monkeypatch):
    import pynvml

    from etune.search_space.targets import local_gpu

    for name, value in {"nvmlInit": lambda: None, "nvmlShutdown": lambda: None,
                        "nvmlDeviceGetHandleByIndex": lambda i: object(),
                        "nvmlDeviceGetName": lambda h: "NVIDIA H200",
                        "nvmlDeviceGetCudaComputeCapability": lambda h: (9, 0)}.items():
        monkeypatch.setattr(pynvml, name, value)
    found = local_gpu()
    assert found.name == "NVIDIA H200" and found.memory_bandwidth == 4.8e12


def test_recorded_builds_carry_the_recorded_resources(tmp_path):
    path = tmp_path / "d.jsonl"
    kernels = [{"name": "k0", "registers": 40, "shared_bytes": 0, "stack_bytes": 0,
                "spill_store_bytes": 0, "spill_load_bytes": 0}]
    _write(path, [{"type": "candidate", "spec": SPEC, "family": "softmax", "design_space": 0, "trace": "[]",
                   "structural_hash": "aa", "features": {}, "selected_by": "random",
                   "build": {"status": "ok", "seconds": 2.0, "error": None, "kernels": kernels}}])
    pool = ReplayBackend(path).recorded_pool(SPEC)
    built, missing = pool.build([_candidate("aa"), _candidate("zz")])
    assert built.ok and built.kernels[0].registers == 40 and not built.runnable
    assert not missing.ok and "not in the replay dataset" in missing.error
    assert json.loads(json.dumps(pool.entries)) == [[0, "[]", "aa"]]
