"""The Python front door: ``import etune``."""
import pytest

import etune


def test_tune_returns_a_run_with_best_pareto_and_frame(tmp_path):
    storage = tmp_path / "api.db"
    run = etune.tune("softmax:1024,1024", objective="energy@0.05", backend="sim", storage=storage, trials=8,
                     batch=4, build=False, seed=1)
    assert (run.spec, run.objective, run.backend, run.trials) == ("softmax:1024,1024", "energy@0.05", "sim", 8)
    best = run.best
    assert best is not None and best.energy_measured and best.latency_s > 0 and best.energy_j > 0
    # The same winner etune report names for that run.
    (entry,) = etune.report(storage)["workloads"]
    assert entry["best"]["energy@0.05"]["latency_s"] == pytest.approx(best.latency_s)
    front = run.pareto()
    assert front and all(a.latency_s <= b.latency_s and a.energy_j >= b.energy_j for a, b in zip(front, front[1:]))
    frame = run.frame()
    assert len(frame) == 8 and set(frame["run_id"]) == {run.run_id}
    # The same call with a larger budget resumes the run.
    more = etune.tune("softmax:1024,1024", objective="energy@0.05", backend="sim", storage=storage, trials=12,
                      batch=4, build=False, seed=1)
    assert more.run_id == run.run_id and more.trials == 12 and len(more.frame()) == 12


def test_suite_and_load_library_are_the_packages():
    suite = etune.suite()
    assert suite["gemv-4096"].spec == "gemm:1,4096,4096" and len(suite) == 11
    from etune.kernels import LibraryError

    with pytest.raises(LibraryError, match="no kernel library at"):
        etune.load_library("/nonexistent/library")
