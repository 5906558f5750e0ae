import sys
from pathlib import Path

import pytest

# The repo root on the path, so tests run the same from a fresh clone with or without an install.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _nvml_gpu() -> bool:
    from etune.measurements.nvml_energy import nvml_available

    return nvml_available()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``nvml`` tests need a GPU that NVML sees (vendor kernels run through PyTorch); ``gpu`` tests
    also need TVM to run CUDA kernels. Without a GPU both skip; on a GPU host whose TVM cannot run
    CUDA (libcudart missing, say) the ``gpu`` tests fail with that reason: a GPU session must not
    pass by skipping everything.

    Under pytest-xdist (``-n auto``, ``--dist loadgroup``), the tests of a module with a
    module-scoped fixture (a dry run, a trained model, sampled spaces) run on one worker, so the
    fixture is made once; the rest spread over all workers."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    wanted = [item for item in items if "gpu" in item.keywords or "nvml" in item.keywords]
    if not wanted:
        return
    if not _nvml_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML finds none)")
        for item in wanted:
            item.add_marker(skip)
        return
    from etune.measurements.tvm_runner import cuda_runtime_problem

    config.stash[_PROBLEM] = cuda_runtime_problem()


_PROBLEM = pytest.StashKey[object]()


def pytest_runtest_setup(item):
    problem = item.config.stash.get(_PROBLEM, None)
    if problem is not None and "gpu" in item.keywords:
        pytest.fail(f"NVML sees a GPU but TVM cannot run CUDA kernels: {problem}", pytrace=False)


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("builds")


@pytest.fixture
def built_templates(tmp_path):
    """Build the one-point templates (thread-level rule sets) of design spaces with etune's builder:
    ``built_templates(spaces, keep=...)`` -> [(template name, BuildResult)]."""
    from etune.search_space import Builder

    def build(spaces, keep=lambda template: True):
        built = []
        for space in spaces:
            points = [c for c in space.fixed_points() if keep(space.design_spaces[c.design_space].template)]
            results = Builder(space.gpu, workdir=tmp_path / str(len(built)), jobs=2).build(points)
            built += [(space.design_spaces[c.design_space].template, r) for c, r in zip(points, results)]
        return built

    return build


@pytest.fixture
def templates_match_on_gpu(built_templates):
    """``templates_match_on_gpu(rule_set, specs)``: every template of ``rule_set`` for each spec, built
    for this machine's GPU and run against the reference (``gpu`` tests only)."""
    from etune.measurements.tvm_runner import run_and_check
    from etune.search_space import ScheduleSpace

    def check(rule_set, specs) -> None:
        for spec in specs:
            local = ScheduleSpace(spec, "local", rule_sets=[rule_set])
            built = built_templates([local])
            assert len(built) == len(local.design_spaces)
            for i, (template, build) in enumerate(built):
                assert build.ok, (template, build.error)
                ok, error = run_and_check(local.workload, build.library, seed=i)
                assert ok, f"{spec} {template}: relative error {error}"

    return check


@pytest.fixture
def no_spills():
    """``no_spills(built)``: every build ok, one kernel each, within 255 registers, no spills."""
    def check(built) -> None:
        for template, result in built:
            assert result.ok, (template, result.error)
            (resources,) = result.kernels
            assert 0 < resources.registers <= 255, template
            assert resources.spill_store_bytes == resources.spill_load_bytes == 0, template

    return check


def _unusable_databases(root: Path) -> dict:
    """Files a user could point --db at by mistake, by name (other, empty, text, dir, newer,
    truncated), and ``good``: an etune database with one latency run of 200 candidates."""
    import sqlite3

    from etune.measurements.records import SCHEMA_VERSION, RecordsDB

    raw = sqlite3.connect(root / "other.db")
    raw.execute("CREATE TABLE users (name TEXT)")
    raw.execute("INSERT INTO users VALUES ('ada')")
    raw.commit()
    raw.close()
    (root / "empty.db").write_bytes(b"")
    (root / "text.db").write_text("name,value\na,1\n")
    (root / "dir.db").mkdir()
    good = root / "good.db"
    with RecordsDB.open(good) as db:
        wid = db.add_workload("softmax:8,8", "softmax", {"rows": 8, "cols": 8})
        run = db.start_run(wid, "latency", "sim", {})
        for i in range(200):
            cid = db.add_candidate(wid, f"h{i}", 0, "trace " * 100)
            db.add_measurement(workload_id=wid, candidate_id=cid, kind="latency", backend="sim", value=1e-6 * (i + 1),
                               run_id=run)
        db.finish_run(run, "finished")
    data = good.read_bytes()
    (root / "truncated.db").write_bytes(data[: len(data) // 2])
    (root / "newer.db").write_bytes(data)
    raw = sqlite3.connect(root / "newer.db")
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.execute("PRAGMA journal_mode = DELETE")  # so that nothing but a write would make a -wal file
    raw.close()
    return {p.stem: p for p in root.iterdir()}


@pytest.fixture(scope="session")
def unusable_databases():
    """``unusable_databases(folder)`` writes the files into the folder and returns them by name."""
    return _unusable_databases


def _latency_counts(db) -> dict:
    """Latency measurements per candidate in a records database (empty until it has any: a run being
    started by another process may not have made it yet)."""
    from collections import Counter

    from etune.measurements.records import RecordsDB

    try:
        with RecordsDB.open(db, readonly=True) as records:
            return Counter(m.candidate_id for m in records.measurements(kind="latency"))
    except Exception:  # noqa: BLE001 - not created yet
        return Counter()


@pytest.fixture(scope="session")
def latency_counts():
    """``latency_counts(db)``: latency measurements per candidate, as a Counter."""
    return _latency_counts
