"""benchmarks/sim_calibration.py: sim's errors against a recorded dataset, and its constants fitted.

The datasets are written here by the sim backend itself, noise-free, from a few sampled schedules of
two cheap workloads (a GEMV and a softmax): once with sim's default constants, once with known
perturbed ones (the "hardware" to calibrate to). The fit then has a truth to find.
"""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from etune.measurements.dataset import KINDS, DatasetWriter, load_dataset, make_header
from etune.measurements.sim import SimBackend, params_for
from etune.search_space import ScheduleSpace
from etune.search_space.targets import gpu_spec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import sim_calibration  # noqa: E402

SPECS = ("gemm:1,4096,4096", "softmax:4096,4096")
GPU = gpu_spec("h200")
DEFAULTS = params_for(GPU)
# The "hardware": DRAM bytes and active SMs cost more, HBM streams worse, fewer loads in flight per
# thread (slower latency-bound schedules), a higher idle power.
TRUTH = dataclasses.replace(DEFAULTS, dram_byte_j=1.6 * DEFAULTS.dram_byte_j, sm_active_w=2.0 * DEFAULTS.sm_active_w,
                            dram_efficiency=0.75, loads_in_flight_per_thread=2.0)
TRUE_IDLE_W = 90.0


def write_dataset(path: Path, candidates: dict, params, idle_w: float, record_idle: bool = True) -> Path:
    """What a sim dry run would record for ``candidates`` (spec -> list) and their vendor kernels."""
    backend = SimBackend(dataclasses.replace(GPU, idle_w=idle_w), noise=0.0, params=params)
    with DatasetWriter(path, make_header("sim", GPU.name, None, target="h200")) as writer:
        for spec, pool in candidates.items():
            for candidate in pool:
                writer.candidate(candidate, features=None, selected_by="random")
            for kind in KINDS:
                for result in [*backend.measure(pool, kind), backend.measure_vendor(pool[0].workload, kind)]:
                    if not record_idle:
                        result = dataclasses.replace(
                            result, details={k: v for k, v in result.details.items() if k != "idle_power_w"})
                    writer.measurement(spec, result, vendor="vendor" if result.structural_hash is None else None)
    return path


@pytest.fixture(scope="module")
def candidates():
    # the TE-chain spaces the fit's tolerances were set on (the template rule sets change the draw)
    return {spec: ScheduleSpace(spec, "h200", rule_sets=["tensorcore", "simt", "splitk"]).sample(6, seed=0)
            for spec in SPECS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("calibration")


@pytest.fixture(scope="module")
def perturbed(candidates, folder):
    return sim_calibration.load_samples(write_dataset(folder / "perturbed.jsonl", candidates, TRUTH, TRUE_IDLE_W))


@pytest.fixture(scope="module")
def fitted(perturbed):
    return sim_calibration.fit(perturbed)


def test_default_constants_reproduce_a_dataset_they_made(candidates, folder):
    samples = sim_calibration.load_samples(write_dataset(folder / "default.jsonl", candidates, DEFAULTS, GPU.idle_w))
    assert len(samples.candidates) == 12 and len(samples.items) == 14  # and one vendor kernel per workload
    groups = sim_calibration.compare(samples)["groups"]
    assert set(groups) == {"gemm", "softmax", "candidates", "vendor"}
    for name, group in groups.items():
        for kind in ("latency", "energy", "power"):
            assert group[f"{kind}_mape"] < 1e-9, (name, kind)
    for name in ("gemm", "softmax", "candidates"):
        assert groups[name]["latency_spearman"] == pytest.approx(1.0)
        assert groups[name]["energy_spearman"] == pytest.approx(1.0)


def test_perturbed_constants_show_as_large_errors(perturbed):
    assert perturbed.idle_recorded and perturbed.gpu.idle_w == TRUE_IDLE_W
    groups = sim_calibration.compare(perturbed)["groups"]
    for name in ("gemm", "softmax"):
        assert groups[name]["latency_mape"] > 0.1, name
        assert groups[name]["energy_mape"] > 0.1, name
        assert groups[name]["power_mape"] > 0.05, name
    assert groups["vendor"]["energy_mape"] > 0.1


def test_fit_finds_the_constants_that_made_the_dataset(perturbed, fitted):
    params, idle_w, report = fitted
    after = sim_calibration.compare(perturbed, params, idle_w)["groups"]
    for name in ("gemm", "softmax", "candidates"):
        assert after[name]["latency_mape"] < 0.01, name
        assert after[name]["energy_mape"] < 0.01, name
        assert after[name]["latency_spearman"] == pytest.approx(1.0)
        assert after[name]["energy_spearman"] == pytest.approx(1.0)
    # Vendor kernels are not fitted, but share the power constants: they improve too.
    assert after["vendor"]["energy_mape"] < 0.02
    assert idle_w == TRUE_IDLE_W and report["idle_w"]["recorded"]
    # The constants that set these schedules' figures land near the truth ...
    assert params.loads_in_flight_per_thread == pytest.approx(TRUTH.loads_in_flight_per_thread, rel=0.03)
    assert params.sm_active_w == pytest.approx(TRUTH.sm_active_w, rel=0.03)
    assert params.dram_byte_j == pytest.approx(TRUTH.dram_byte_j, rel=0.1)
    assert params.uncore_active_w == pytest.approx(TRUTH.uncore_active_w, rel=0.03)
    # ... HBM efficiency matters to few of them (most are latency-bound) but still moves toward it.
    assert abs(params.dram_efficiency - 0.75) < 0.5 * abs(DEFAULTS.dram_efficiency - 0.75)
    # No tensor cores here: the data says nothing, and the constant stays at its default.
    assert report["constants"]["tensor_core_efficiency"]["weakly_identified"]
    assert params.tensor_core_efficiency == pytest.approx(DEFAULTS.tensor_core_efficiency, rel=1e-3)
    for name, constant in report["constants"].items():
        lower, upper = constant["bounds"]
        assert lower <= constant["fitted"] <= upper, name
        assert constant["default"] == getattr(DEFAULTS, name), name


def test_idle_power_is_fitted_when_the_dataset_lacks_it(candidates, folder):
    path = write_dataset(folder / "no-idle.jsonl", candidates, TRUTH, TRUE_IDLE_W, record_idle=False)
    samples = sim_calibration.load_samples(path)
    assert not samples.idle_recorded and samples.gpu.idle_w == GPU.idle_w
    params, idle_w, report = sim_calibration.fit(samples)
    # Idle and uncore power are both watts over the whole call; idle is fitted in uncore's place.
    assert "uncore_active_w" not in report["constants"] and params.uncore_active_w == DEFAULTS.uncore_active_w
    assert idle_w == pytest.approx(TRUE_IDLE_W, abs=1.0)
    assert report["idle_w"] == {"value": idle_w, "recorded": False, "preset": GPU.idle_w}
    assert sim_calibration.compare(samples, params, idle_w)["groups"]["candidates"]["energy_mape"] < 0.01


def test_report_files_and_the_sim_made_warning(perturbed, folder, capsys):
    out = folder / "report"
    assert sim_calibration.main([str(perturbed.dataset.path), "--out", str(out), "--families", "softmax"]) == 0
    printed = capsys.readouterr().out
    assert "not a calibration of sim against hardware" in printed
    assert (out / "sim_calibration.md").read_text() == printed.rstrip("\n") + "\n"
    document = json.loads((out / "sim_calibration.json").read_text())
    assert document["sim_made"] and document["header"]["backend"] == "sim"
    assert document["dataset"] == str(perturbed.dataset.path)
    assert set(document["before"]["groups"]) == {"softmax", "candidates", "vendor"}  # --families softmax
    assert document["before"]["groups"]["softmax"]["energy_mape"] > 0.1
    assert document["after"]["groups"]["softmax"]["energy_mape"] < 0.01
    assert math.isclose(document["fit"]["constants"]["sm_active_w"]["default"], DEFAULTS.sm_active_w)
    # A dataset measured on a GPU does not get the warning.
    assert "not a calibration" not in sim_calibration.markdown({**document, "sim_made": False})


@pytest.mark.parametrize("content", [None, "not a dataset\n", '{"type": "candidate"}\n'])
def test_cli_rejects_what_is_not_a_dataset(tmp_path, content):
    path = tmp_path / "thing.jsonl"
    if content is not None:
        path.write_text(content)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_calibration.py"), str(path),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith("sim_calibration: ")
    assert str(path) in run.stderr and not (tmp_path / "out").exists()


def test_a_dataset_without_measured_records_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    DatasetWriter(path, make_header("nvml", "NVIDIA H200", "570", target="h200")).close()
    with pytest.raises(sim_calibration.DatasetError, match="no measured record"):
        sim_calibration.load_samples(load_dataset(path))
