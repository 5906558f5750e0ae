"""Tuning on a Ray cluster (tuner.cluster): one local cluster for the module, with 4 fake GPUs.

Sim actors take a scaled share of each measurement's simulated GPU time as wall time, so parallel
measurement shows as it would on GPUs."""
import os
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from benchmarks.cluster_scaling import energy_heavy_run, sample_candidates, start_local_cluster  # noqa: E402
from etune.measurements.records import RecordsDB  # noqa: E402
from etune.tuner.cluster import cluster_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL = "softmax:1024,1024"
# One generation of 16 candidates, each measured for latency and energy (~3.35 s of simulated GPU
# time each, of which SCALE is taken as wall time).
TRIALS = 16
SCALE = 0.8  # ~2.7 s per energy measurement: the driver's own ~2 s per run (more on a busy CI host) stays a small share


@pytest.fixture(scope="module")
def cluster():
    """A local cluster for this module. Ray leaves its marks on the process (PYTHONPATH for its
    workers, its own SIGINT/SIGTERM handlers at the C level, which children inherit): put them back,
    so the tests that come after it on this worker see a process like any other."""
    import os
    import signal

    pythonpath = os.environ.get("PYTHONPATH")
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield start_local_cluster(gpus=4)
    ray.shutdown()
    for signum, handler in handlers.items():
        signal.signal(signum, handler)  # sigaction again, over whatever Ray installed
    if pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = pythonpath


@pytest.fixture(scope="module")
def sampled():
    """The run's candidates, sampled once: TVM's sampling is not what the cluster speeds up."""
    return sample_candidates(TRIALS, SMALL)


def _records(db_path):
    with RecordsDB.open(db_path, readonly=True) as db:
        return db.measurements()


def test_four_actors_measure_an_energy_heavy_run_3x_faster_with_the_same_records(cluster, sampled, tmp_path):
    one, one_s, _ = energy_heavy_run(tmp_path / "one.db", sampled, 1, SCALE)
    four, four_s, _ = energy_heavy_run(tmp_path / "four.db", sampled, 4, SCALE)
    print(f"1 actor: {one_s:.1f} s, 4 actors: {four_s:.1f} s ({one_s / four_s:.2f}x)")
    assert one_s >= 3 * four_s
    assert one.trials == four.trials == TRIALS and one.energy_measurements == four.energy_measurements == TRIALS
    for name, status in (("one.db", one), ("four.db", four)):
        records = _records(tmp_path / name)
        per_kind = Counter((m.candidate_id, m.kind) for m in records)
        assert set(per_kind.values()) == {1}  # nothing measured twice
        assert sum(m.kind == "latency" for m in records) == TRIALS
        assert sum(m.kind == "energy" for m in records) == status.energy_measurements
        assert all(m.ok for m in records)
    actors_used = {m.details["actor"] for m in _records(tmp_path / "four.db") if m.kind == "energy"}
    assert len(actors_used) == 4  # each record says which actor (and GPU) measured it


def test_an_actor_killed_mid_run_costs_at_most_its_task(cluster, sampled, tmp_path):
    def kill_one(backend):
        time.sleep(1.0)  # inside the energy measurements (4 rounds of ~0.5 s)
        ray.kill(backend.actors[0])

    status, _, left = energy_heavy_run(tmp_path / "k.db", sampled, 4, 0.15, during=kill_one)
    records = _records(tmp_path / "k.db")
    assert left == 3 and status.trials == TRIALS and status.stopped_by == "trials"
    assert set(Counter((m.candidate_id, m.kind) for m in records).values()) == {1}
    assert sum(m.kind == "energy" for m in records) == status.energy_measurements
    assert sum(not m.ok for m in records) <= 1  # the task in flight is retried on another actor


def test_a_build_through_ray_is_the_local_build(cluster, sampled, tmp_path):
    from etune.search_space import Builder, gpu_spec

    candidate, gpu = sampled[0], gpu_spec("h100")
    workload = candidate.workload
    (local,) = Builder(gpu, workdir=tmp_path / "local", jobs=1).build([candidate])
    builder = cluster_builder(gpu, workload, workdir=tmp_path / "ray")
    (remote,) = builder.build([candidate])
    assert remote.ok, remote.error
    assert (remote.status, remote.runnable, remote.kernels) == (local.status, local.runnable, local.kernels)
    assert sorted(os.listdir(remote.artifact_dir)) == sorted(os.listdir(local.artifact_dir))
    (again,) = builder.build([candidate])
    assert again.cached and again.kernels == remote.kernels  # the structural-hash cache, as locally


def test_the_cli_tunes_several_workloads_at_once_on_the_cluster(cluster, tmp_path):
    from typer.testing import CliRunner

    from etune.tuner.cli import app

    db = tmp_path / "cli.db"
    args = ["tune", SMALL, "softmax:512,1024", "--backend", "sim", "--no-build", "--trials", "4", "--batch", "4",
            "--db", str(db), "--cluster", "ray"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "on 4 measurement actors of the Ray cluster" in " ".join(result.output.split())
    with RecordsDB.open(db, readonly=True) as records:
        assert sorted(w.spec for w in records.workloads()) == sorted([SMALL, "softmax:512,1024"])
        assert all(r.status == "finished" for r in records.runs())
        assert sum(m.kind == "latency" for m in records.measurements()) == 8


def test_without_ray_a_cluster_is_one_line_error(monkeypatch):
    import sys

    from etune.tuner.cluster import ClusterError, connect

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ClusterError, match=r"^--cluster needs Ray, which is not installed: pip install 'etune\[ray\]'$"):
        connect("ray")


def test_a_sigkilled_cluster_run_resumes_from_the_drivers_database(tmp_path, latency_counts):
    """The search and the records stay in the driver: SIGKILL it mid-run (its local Ray goes with it),
    and the same command measures the rest, nothing twice."""
    import signal
    import subprocess
    import sys

    import psutil

    db = tmp_path / "k.db"
    # The child is the CLI on its own local cluster with two fake GPUs (a GPU-less host has none to give).
    driver = ("import sys, ray; ray.init(address='local', num_cpus=1, num_gpus=2, include_dashboard=False, "
              "logging_level='ERROR'); from etune.tuner.cli import app; app(sys.argv[1:], prog_name='etune')")
    command = [sys.executable, "-c", driver, "tune", "softmax:256,256", "--backend", "sim", "--no-build",
               "--objective", "latency", "--trials", "24", "--batch", "4", "--db", str(db), "--cluster", "ray"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and sum(latency_counts(db).values()) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        ray_processes = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()
    killed_at = sum(latency_counts(db).values())
    assert 6 <= killed_at < 24
    # The driver's local Ray does not outlive it: its GCS, raylet and workers go at once (Ray's two
    # agents poll for the raylet and follow a few minutes later).
    core = [p for p in ray_processes if not p.name().endswith("Agent")]
    gone, alive = psutil.wait_procs(core, timeout=60)
    assert core and not alive, [p.name() for p in alive]
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "ended without finishing (killed?); resuming" in " ".join(rerun.stdout.split())
    counts = latency_counts(db)
    assert len(counts) == 24 and set(counts.values()) == {1}
