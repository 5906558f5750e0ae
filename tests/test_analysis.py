"""tuner.analysis on a hand-made records database with known numbers, and notebooks/analysis.ipynb
executed top to bottom (sim backend, no GPU, no nvcc)."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from etune.measurements.records import RecordsDB
from etune.tuner import analysis
from etune.tuner.report import report

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "analysis.ipynb"
SPEC = "softmax:8,8"
US, MJ = 1e-6, 1e-3


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    """Two sim runs and an nvml run of one workload, and a sim vendor reference.

    latency run (sim):     c1 5us, c2 3us, c3 4us, c4 2us, c5 6us, c6 failed; energy c4 10 mJ (final check)
    energy@0.05 run (sim): c1 5us, c2 3us, c7 2.05us, energy c2 8 mJ, c4 2us, c8 4us,
                           energy c7 6 mJ (pred 5), energy c8 4 mJ (pred 4.4), energy c4 7 mJ (final check)
    latency run (nvml):    c1 9us
    """
    path = tmp_path_factory.mktemp("analysis") / "hand.db"
    with RecordsDB.open(path) as db:
        wid = db.add_workload(SPEC, "softmax", {"rows": 8, "cols": 8})
        cid = {i: db.add_candidate(wid, f"h{i}", 0, "{}", features={"x": i}) for i in range(1, 9)}
        lat_run = db.start_run(wid, "latency", "sim", {"trials": 6})
        en_run = db.start_run(wid, "energy@0.05", "sim", {"trials": 5})
        nvml_run = db.start_run(wid, "latency", "nvml", {"trials": 1})

        def lat(run, c, value, generation, predicted=None, ok=True, backend="sim"):
            db.add_measurement(workload_id=wid, candidate_id=cid[c], run_id=run, kind="latency", backend=backend,
                               value=value if ok else None, ok=ok, error=None if ok else "sim failed",
                               device_name="sim:H100" if backend == "sim" else "NVIDIA H100",
                               details={"generation": generation, "predicted_latency_s": predicted})

        def energy(run, c, value, latency, generation, predicted=None, std=None, final=False):
            db.add_measurement(workload_id=wid, candidate_id=cid[c], run_id=run, kind="energy", backend="sim",
                               value=value, device_name="sim:H100",
                               details={"generation": generation, "final_check": final, "predicted_energy_j": predicted,
                                        "predicted_energy_std_j": std, "avg_power_w": value / latency})

        for i, (c, v) in enumerate([(1, 5), (2, 3), (3, 4), (4, 2), (5, 6)]):
            lat(lat_run, c, v * US, 1 + i // 3, predicted=None if i < 3 else 1.1 * v * US)
        lat(lat_run, 6, None, 2, ok=False)
        energy(lat_run, 4, 10 * MJ, 2 * US, 2, final=True)

        lat(en_run, 1, 5 * US, 1)
        lat(en_run, 2, 3 * US, 1)
        lat(en_run, 7, 2.05 * US, 1)
        energy(en_run, 2, 8 * MJ, 3 * US, 1)
        lat(en_run, 4, 2 * US, 2, predicted=2.2 * US)
        lat(en_run, 8, 4 * US, 2, predicted=4.0 * US)
        energy(en_run, 7, 6 * MJ, 2.05 * US, 2, predicted=5 * MJ, std=1 * MJ)
        energy(en_run, 8, 4 * MJ, 4 * US, 2, predicted=4.4 * MJ, std=0.5 * MJ)
        energy(en_run, 4, 7 * MJ, 2 * US, 2, final=True)

        lat(nvml_run, 1, 9 * US, 1, backend="nvml")

        for kind, value in (("latency", 2.5 * US), ("energy", 5 * MJ)):
            db.add_measurement(workload_id=wid, candidate_id=None, kind=kind, backend="sim", value=value,
                               device_name="sim:H100", details={"vendor": "torch.softmax"})
        for run in (lat_run, en_run, nvml_run):
            db.finish_run(run, "finished")
    return path


@pytest.fixture(scope="module")
def df(db_path):
    return analysis.records_frame(db_path)


def _cid(db_path, n):
    with RecordsDB.open(db_path) as db:
        return {c.structural_hash: c.id for c in db.candidates(1)}[f"h{n}"]


def test_records_frame(df, db_path):
    assert list(df.columns) == list(analysis.RECORD_COLUMNS)
    assert df.attrs["db_path"] == str(db_path)
    assert len(df) == 6 + 5 + 1  # candidates per run; the vendor rows are not candidates
    sim_lat = df[(df.backend == "sim") & (df.objective == "latency")]
    assert list(sim_lat["order"]) == [1, 2, 3, 4, 5, 6]
    assert list(sim_lat["generation"]) == [1, 1, 1, 2, 2, 2]
    assert list(sim_lat["latency_ok"]) == [True] * 5 + [False]
    assert np.allclose(sim_lat["latency_s"].iloc[:5], np.array([5, 3, 4, 2, 6]) * US)
    assert math.isnan(sim_lat["latency_s"].iloc[5])
    assert sim_lat["energy_measured"].sum() == 1
    c4 = sim_lat[sim_lat.candidate_id == _cid(db_path, 4)].iloc[0]
    assert c4.energy_j == pytest.approx(10 * MJ) and c4.avg_power_w == pytest.approx(5000.0)
    assert bool(c4.final_check) and c4.energy_order == 1
    assert c4.predicted_latency_s == pytest.approx(2.2 * US)

    en = df[df.objective == "energy@0.05"].set_index("candidate_id")
    assert list(en["order"]) == [1, 2, 3, 4, 5]
    c7, c8, c2 = (en.loc[_cid(db_path, n)] for n in (7, 8, 2))
    assert c7.energy_j == pytest.approx(6 * MJ) and c7.predicted_energy_j == pytest.approx(5 * MJ)
    assert c7.predicted_energy_std_j == pytest.approx(1 * MJ) and c7.energy_order == 2
    assert c8.predicted_energy_j == pytest.approx(4.4 * MJ) and c8.avg_power_w == pytest.approx(1000.0)
    assert math.isnan(c2.predicted_energy_j) and not bool(c2.final_check)
    assert math.isnan(en.loc[_cid(db_path, 1)].energy_j)
    assert not en.loc[_cid(db_path, 1)].energy_measured
    # the combined stream puts c2's energy between c7's latency and c4's latency
    assert (c2.energy_seq, en.loc[_cid(db_path, 4)].latency_seq) == (4, 5)

    nvml = df[df.backend == "nvml"]
    assert len(nvml) == 1 and nvml.iloc[0].device == "NVIDIA H100"


def test_vendor_frame(db_path):
    vendor = analysis.vendor_frame(db_path)
    assert len(vendor) == 1
    row = vendor.iloc[0]
    assert (row.workload, row.backend, row.vendor) == (SPEC, "sim", "torch.softmax")
    assert row.latency_s == pytest.approx(2.5 * US) and row.energy_j == pytest.approx(5 * MJ)
    assert row.avg_power_w == pytest.approx(2000.0)


def test_missing_database_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        analysis.records_frame(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_pareto_frame(df, db_path):
    front = analysis.pareto_frame(df)
    sim = front[front.backend == "sim"]
    # c4 (2us, median(10, 7) = 8.5 mJ), c7 (2.05us, 6 mJ), c8 (4us, 4 mJ); c2 (3us, 8 mJ) is dominated by c7
    assert list(sim["candidate_id"]) == [_cid(db_path, n) for n in (4, 7, 8)]
    assert list(sim["rank"]) == [1, 2, 3]
    assert np.allclose(sim["energy_j"], [8.5 * MJ, 6 * MJ, 4 * MJ])
    assert np.allclose(sim["latency_s"], [2 * US, 2.05 * US, 4 * US])
    assert (front.backend == "nvml").sum() == 0  # nothing energy-measured there
    with RecordsDB.open(db_path) as db:
        entry = next(e for e in report(db)["workloads"] if e["backend"] == "sim")
    assert [p["candidate_id"] for p in entry["pareto"]] == list(sim["candidate_id"])


def test_best_points_match_report(df, db_path):
    bests = analysis.best_points(df)
    sim = bests[bests.backend == "sim"].set_index("objective")
    assert sim.loc["latency", "candidate_id"] == _cid(db_path, 4)
    assert sim.loc["latency", "trials"] == 6 and sim.loc["latency", "energy_measurements"] == 1
    assert sim.loc["energy@0.05", "candidate_id"] == _cid(db_path, 7)  # c4 within 5 % but uses more energy
    assert sim.loc["energy@0.05", "energy_j"] == pytest.approx(6 * MJ)
    with RecordsDB.open(db_path) as db:
        entry = next(e for e in report(db)["workloads"] if e["backend"] == "sim")
    for objective, point in entry["best"].items():
        assert sim.loc[objective, "candidate_id"] == point["candidate_id"]


def test_tuning_curves(df, db_path):
    curves = analysis.tuning_curves(df)
    assert list(curves.columns) == list(analysis.CURVE_COLUMNS)
    for (_, _, run_id), g in curves.groupby(["workload", "backend", "run_id"]):
        assert list(g["step"]) == list(range(1, len(g) + 1))
        assert g["trials"].is_monotonic_increasing and g["energy_measurements"].is_monotonic_increasing
        for column in ("best_latency_s", "best_energy_j"):
            values = g[column].dropna().to_numpy()
            assert np.all(np.diff(values) <= 0), (run_id, column, values)

    lat = curves[(curves.backend == "sim") & (curves.objective == "latency")]
    assert len(lat) == 7 and lat["trials"].iloc[-1] == 6 and lat["energy_measurements"].iloc[-1] == 1
    assert np.allclose(lat["best_latency_s"].iloc[:6], np.array([5, 3, 3, 2, 2, 2]) * US)
    assert lat["best_latency_s"].iloc[-1] == pytest.approx(2 * US)  # the known minimum
    assert lat["objective_energy_j"].iloc[:6].isna().all()  # the winner's energy only at the end
    assert lat["objective_energy_j"].iloc[-1] == pytest.approx(10 * MJ)

    en = curves[curves.objective == "energy@0.05"]
    assert list(en["kind"]) == ["latency"] * 3 + ["energy"] + ["latency"] * 2 + ["energy"] * 3
    assert list(en["trials"]) == [1, 2, 3, 3, 4, 5, 5, 5, 5]
    assert list(en["energy_measurements"]) == [0, 0, 0, 1, 1, 1, 2, 3, 4]
    assert en["best_latency_s"].iloc[-1] == pytest.approx(2 * US)
    assert np.allclose(en["best_energy_j"].iloc[3:], np.array([8, 8, 8, 6, 4, 4]) * MJ)
    assert en["best_energy_j"].iloc[-1] == pytest.approx(4 * MJ)  # the least energy measured
    # under the objective: c2 alone, then c7 once measured (c8 is too slow, c4 uses more energy)
    ids = [None if pd.isna(x) else x for x in en["objective_candidate_id"]]
    assert ids[:3] == [None] * 3
    assert ids[3:] == [_cid(db_path, 2)] * 3 + [_cid(db_path, 7)] * 3
    assert en["objective_energy_j"].iloc[-1] == pytest.approx(6 * MJ)
    last = analysis.best_points(df).set_index("run_id")
    for run_id, g in curves.groupby("run_id"):
        assert g["objective_candidate_id"].iloc[-1] == last.loc[run_id, "candidate_id"]


def test_model_accuracy(df):
    acc = analysis.model_accuracy(df, by_run=True).set_index(["backend", "objective", "target"])
    energy = acc.loc[("sim", "energy@0.05", "energy")]
    assert energy.n == 2
    assert energy.mape == pytest.approx((1 / 6 + 0.1) / 2)
    assert energy.spearman == pytest.approx(1.0)
    latency = acc.loc[("sim", "energy@0.05", "latency")]
    assert latency.n == 2 and latency.mape == pytest.approx(0.05)
    assert acc.loc[("sim", "latency", "latency")].mape == pytest.approx(0.1)
    assert acc.loc[("sim", "latency", "energy")].n == 0
    pooled = analysis.model_accuracy(df).set_index(["backend", "target"])
    assert pooled.loc[("sim", "latency")].n == 4


def _text(fig) -> str:
    parts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        legend = ax.get_legend()
        if legend:
            parts += [t.get_text() for t in legend.get_texts()]
    return "\n".join(parts)


def test_figures(df, db_path, tmp_path):
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="several backends"):
        analysis.plot_pareto(df)
    fig = analysis.plot_pareto(df, backend="sim")
    assert isinstance(fig, Figure)
    text = _text(fig)
    assert "(sim)" in text and "latency per call (µs)" in text and "energy per call (mJ)" in text
    assert "vendor torch.softmax" in text and "Pareto front (3)" in text
    assert "best for energy@0.05" in text and "best for latency" in text
    # from a path too; nvml figures never say sim
    assert "(sim)" in _text(analysis.plot_pareto(db_path, backend="sim"))
    assert "(sim)" not in _text(analysis.plot_tuning_curves(df, backend="nvml"))

    fig = analysis.plot_tuning_curves(df, backend="sim")
    assert len(fig.axes) == 4 and "(sim)" in _text(fig)
    assert "trials (latency measurements)" in _text(fig) and "energy measurements used" in _text(fig)

    fig = analysis.plot_model_accuracy(df, backend="sim")
    text = _text(fig)
    assert "MAPE 13.3 %" in text and "Spearman 1.00" in text and "y = x" in text

    # drawing into given axes returns their figure
    own = Figure()
    ax = own.add_subplot()
    assert analysis.plot_pareto(df, backend="sim", ax=ax) is own
    own2 = Figure()
    axes = own2.subplots(1, 2)
    assert analysis.plot_model_accuracy(df, backend="sim", axes=axes) is own2

    fig.savefig(tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0


def test_empty_database(tmp_path):
    path = tmp_path / "empty.db"
    RecordsDB.open(path).close()
    df = analysis.records_frame(path)
    assert df.empty and list(df.columns) == list(analysis.RECORD_COLUMNS)
    assert analysis.pareto_frame(df).empty and analysis.tuning_curves(df).empty
    assert analysis.best_points(df).empty and analysis.model_accuracy(df).empty
    assert analysis.vendor_frame(path).empty
    with pytest.raises(ValueError, match="no records"):
        analysis.plot_pareto(df)


def test_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    markdown = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "not hardware measurements" in markdown


def test_notebook_executes(tmp_path, monkeypatch):
    """The notebook runs top to bottom in a python3 kernel on this interpreter (the venv), from the
    repository root, and writes its figures to $ETUNE_NOTEBOOK_OUT."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # A python3 kernelspec that names this interpreter, ahead of any other on the Jupyter path.
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (etune venv)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    out = tmp_path / "out"
    monkeypatch.setenv("ETUNE_NOTEBOOK_OUT", str(out))
    monkeypatch.delenv("ETUNE_NOTEBOOK_DB", raising=False)
    monkeypatch.setenv("ETUNE_NOTEBOOK_TRIALS", os.environ.get("ETUNE_NOTEBOOK_TRIALS", "16"))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()

    printed = "".join(o.get("text", "") for o in nb.cells[1].outputs if o.get("output_type") == "stream")
    assert f"python {sys.executable}" in printed
    assert f"repo   {ROOT}" in printed
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # the figures are shown inline, not only saved
    for name in ("pareto.png", "tuning_curves.png", "model_accuracy.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "analysis-sim.db").exists()
