"""Tuning on a Ray cluster: builds on every CPU, measurements on every GPU, one search per workload.

docs/design.md, "On a cluster". Ray is the engine (an optional extra, ``etune[ray]``); this module is
the only one that imports it, and only when a cluster is asked for.

* Builds: ``RayBuildExecutor`` is the local Builder's executor with Ray tasks instead of worker
  processes. Each task runs the same ``_build_in_worker`` in a one-worker local build pool (the same
  time-out and worker isolation) and sends the artifacts' bytes back through the object store; the
  driver writes them into the Builder's artifact directory, so the cache by structural hash and the
  failure reporting are the local ones.
* Measurements: one ``MeasureActor`` per GPU (``num_gpus=1``) owns a local backend (nvml: that GPU's
  NVML handle, its lock and the isolated runner; sim in tests). ``ClusterBackend`` is the Backend the
  Tuner sees: it deals candidates to free actors and hands each result to ``progress`` in the
  driver's thread, so the records database keeps one writer per run.
* ``tune_workloads``: one Tuner per workload in driver threads, all sharing the actors.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from etune.measurements.backend import Backend, BackendError, DeviceInfo, MeasureResult, Progress, check_kind
from etune.search_space import interrupts
from etune.search_space.build import BuildResult, Builder, build_pool, default_timeout

CLUSTER_HELP = "ray (start or attach a local Ray), ray://HOST:PORT (a remote cluster's client port) or auto"


class ClusterError(RuntimeError):
    """Ray is missing or the cluster cannot be reached: one readable line."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--cluster needs Ray, which is not installed: pip install 'etune[ray]'") from None
    return ray


def connect(address: str = "ray"):
    """Attach this process to a Ray cluster (once) and return the ray module.

    ``ray``: the cluster ``ray start`` runs on this host, else a new local one; ``ray://HOST:PORT``:
    a remote cluster through Ray Client; ``auto``: the cluster ``ray start`` runs on this host."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address == "ray":
        options = {}
    elif address == "auto" or address.startswith("ray://"):
        options = {"address": address}
    else:
        raise ClusterError(f"unknown cluster {address!r} (choose {CLUSTER_HELP})")
    try:
        ray.init(include_dashboard=False, logging_level="ERROR", **options)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ImportError, ...
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason}") from None
    return ray


# -- builds -----------------------------------------------------------------------------------------
def _build_task(fn, args: tuple, timeout_s: float):
    """Runs as a Ray task: ``fn(*args, artifact_dir)`` in a one-worker local pool with the time-out,
    then the artifacts' bytes."""
    with tempfile.TemporaryDirectory(prefix="etune-build-") as directory:
        pool = build_pool(1, timeout_s)
        try:
            data = pool.submit(fn, *args, directory).result()
        except (concurrent.futures.TimeoutError, TimeoutError):
            return None, {}  # the driver reports it as the local Builder does
        finally:
            pool.shutdown(wait=False)
        files = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
    return data, files


@functools.cache
def _remote_build_task():
    # max_retries: a worker or node that dies mid-build costs one retry elsewhere, then a failed build.
    return _ray().remote(num_cpus=1, max_retries=1)(_build_task)


class RayBuildExecutor:
    """The Builder's executor on Ray: ``submit(fn, *args, artifact_dir)`` runs ``fn`` on a cluster CPU
    and writes what it made into ``artifact_dir`` here before the future resolves."""

    def __init__(self, jobs: int, timeout_s: float):
        self.timeout_s = timeout_s  # jobs: Ray schedules by the cluster's free CPUs instead
        self._refs = []

    def submit(self, fn, *args) -> concurrent.futures.Future:
        *args, artifact_dir = args
        ref = _remote_build_task().remote(fn, tuple(args), self.timeout_s)
        self._refs.append(ref)
        done = concurrent.futures.Future()

        def unpack(remote: concurrent.futures.Future) -> None:
            try:
                data, files = remote.result()
                if data is None:
                    raise TimeoutError(f"build timed out after {self.timeout_s:.0f} s")
                out = Path(artifact_dir)
                out.mkdir(parents=True, exist_ok=True)
                for name, content in files.items():
                    (out / name).write_bytes(content)
                done.set_result(data)
            except BaseException as exc:  # noqa: BLE001 - the Builder reports it per candidate
                done.set_exception(exc)

        ref.future().add_done_callback(unpack)
        return done

    def shutdown(self, wait: bool = False) -> None:
        ray = _ray()
        for ref in self._refs:  # builds nobody waits for any more (an interrupted run)
            ray.cancel(ref)
        self._refs = []


def cluster_builder(gpu, workload, workdir=None) -> Builder:
    """A Builder whose builds run as Ray tasks, one per cluster CPU at a time."""
    jobs = max(1, int(_ray().cluster_resources().get("CPU", 1)))
    # Each task holds a whole CPU: the time-out needs no allowance for oversubscription.
    return Builder(gpu, workdir=workdir, jobs=jobs, timeout_s=default_timeout(workload, 1), executor=RayBuildExecutor)


# -- measurements -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShippedCandidate:
    """What a measurement actor needs of a candidate (a TVM Schedule does not travel)."""

    structural_hash: str
    workload: object  # kernels.Workload
    launches: tuple  # search_space.analysis.KernelLaunch, read by sim

    @classmethod
    def of(cls, candidate) -> "ShippedCandidate":
        return cls(candidate.structural_hash, candidate.workload, tuple(getattr(candidate, "launches", ()) or ()))


class MeasureActor:
    """Owns one GPU's backend; Ray runs one per GPU (``num_gpus=1``) and one call at a time."""

    def __init__(self, backend: str, options: dict):
        from etune.measurements import make_backend
        from etune.measurements.nvml_energy import nvml_available

        ray = _ray()
        gpu_ids = ray.get_gpu_ids()
        if backend == "auto":  # decided where the GPU is, not on the driver
            backend = "nvml" if nvml_available() else "sim"
        if backend == "nvml":  # Ray's GPU id is the node's index, as NVML numbers it under PCI bus order
            options = {"device_index": int(gpu_ids[0]), **options}
            options.pop("gpu", None)
        self.backend = make_backend(backend, **options)
        self.builds = Path(tempfile.mkdtemp(prefix="etune-actor-builds-"))
        self.identity = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id()[:12],
                         "gpu_ids": [str(g) for g in gpu_ids]}

    def describe(self) -> tuple[DeviceInfo, dict]:
        return self.backend.device(), self.identity

    def measure(self, candidate: ShippedCandidate, kind: str, build: dict | None, files: dict) -> MeasureResult:
        builds = None
        if build is not None:
            result = BuildResult.from_json(build)
            if files:  # the backend runs this build: its library must be on this node
                directory = self.builds / candidate.structural_hash
                directory.mkdir(parents=True, exist_ok=True)
                for name, content in files.items():
                    (directory / name).write_bytes(content)
                result.artifact_dir = str(directory)
            builds = [result]
        return self.backend.measure([candidate], kind, builds=builds)[0]

    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        return self.backend.measure_vendor(workload, kind)

    def close(self) -> None:
        self.backend.close()


@dataclasses.dataclass(eq=False)
class _Actor:
    handle: object
    label: str  # actor index, host and GPU: in each result's details


class ClusterBackend(Backend):
    """Measures on every GPU of the Ray cluster through one MeasureActor per GPU.

    Latency measurements spread over all actors, energy measurements run in parallel on different
    GPUs (each has its own counter). Only actors whose device name is the run's are used: a run
    measures one GPU model. An actor that dies costs the task it was running, which is retried once
    on another actor and otherwise recorded as failed with the reason. Thread-safe: the Tuners of
    several workloads share the actors."""

    def __init__(self, backend: str = "auto", *, actors: int | None = None, device_name: str | None = None,
                 log: Callable[[str], None] | None = None, **options):
        ray = _ray()
        if not ray.is_initialized():
            raise ClusterError("not connected to a Ray cluster (tuner.cluster.connect first)")
        if backend.startswith("replay:"):
            raise BackendError("replay needs no cluster: run it without --cluster")
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = gpus if actors is None else actors
        if count < 1 or count > gpus:
            raise BackendError(f"the Ray cluster has {gpus} GPUs, so {count} measurement actors cannot run "
                               "(start workers with `ray start --address=HEAD:6379 --num-gpus=N`)")
        # num_cpus=0: the actors wait on their GPU; the cluster's CPUs stay for builds.
        actor_class = ray.remote(num_gpus=1, num_cpus=0, max_restarts=0)(MeasureActor)
        handles = [actor_class.remote(backend, options) for _ in range(count)]
        try:
            described = ray.get([h.describe.remote() for h in handles])
        except Exception as exc:  # noqa: BLE001 - a backend that cannot start (no NVML, ...)
            for handle in handles:
                ray.kill(handle)
            cause = getattr(exc, "cause", None) or exc
            raise BackendError(f"a measurement actor could not start: {str(cause).strip().splitlines()[-1]}") from None
        names = [device.name for device, _ in described]
        self._device = next(d for d, _ in described if d.name == (device_name or collections.Counter(names).most_common(1)[0][0]))
        self.name = self._device.backend
        self._actors: list[_Actor] = []
        for index, (handle, (device, identity)) in enumerate(zip(handles, described)):
            if device.name != self._device.name:
                (log or (lambda m: None))(f"actor {index} on {identity['host']} measures {device.name}, not "
                                          f"{self._device.name}: not used")
                ray.kill(handle)
                continue
            self._actors.append(_Actor(handle, f"{index}@{identity['host']}:gpu{','.join(identity['gpu_ids'])}"))
        self._free = list(self._actors)
        self._freed = threading.Condition()
        # A backend that runs code gets the build's files; sim reads only the candidate.
        self._ships_files = self.name != "sim"

    @property
    def actors(self) -> list:
        """The live actors' handles (tests kill one)."""
        return [a.handle for a in self._actors]

    def device(self) -> DeviceInfo:
        details = {**self._device.details, "cluster": {"actors": [a.label for a in self._actors]}}
        return dataclasses.replace(self._device, details=details)

    # -- dealing work to actors --------------------------------------------------------------------
    def _take(self) -> _Actor | None:
        with self._freed:
            return self._free.pop(0) if self._free else None

    def _give_back(self, actor: _Actor) -> None:
        with self._freed:
            if actor in self._actors:
                self._free.append(actor)
            self._freed.notify_all()

    def _drop(self, actor: _Actor) -> None:
        with self._freed:
            if actor in self._actors:
                self._actors.remove(actor)
            self._freed.notify_all()

    def _submit(self, actor: _Actor, candidate, kind: str, build):
        build_json = files = None
        if build is not None:
            build_json = build.to_json()
            files = {}
            if self._ships_files and build.ok and build.artifact_dir:
                files = {p.name: p.read_bytes() for p in Path(build.artifact_dir).iterdir() if p.is_file()}
        return actor.handle.measure.remote(ShippedCandidate.of(candidate), kind, build_json, files or {})

    def measure(self, candidates: Sequence, kind: str, builds: Sequence | None = None,
                progress: Progress | None = None) -> list[MeasureResult]:
        from ray.exceptions import RayActorError

        ray = _ray()
        check_kind(kind)
        if builds is not None and len(builds) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(builds)} builds")
        results: list[MeasureResult | None] = [None] * len(candidates)
        waiting = collections.deque((i, 0) for i in range(len(candidates)))  # (index, attempt)
        running: dict = {}  # object ref -> (index, attempt, actor)

        def finish(i: int, result: MeasureResult, actor: _Actor | None) -> None:
            if actor is not None:
                result.details = {**(result.details or {}), "actor": actor.label}
            results[i] = result
            if progress is not None:
                progress(result)

        while waiting or running:
            while waiting and (actor := self._take()) is not None:
                i, attempt = waiting.popleft()
                ref = self._submit(actor, candidates[i], kind, builds[i] if builds is not None else None)
                running[ref] = (i, attempt, actor)
            if not running:
                if not self._actors:
                    break  # every actor died
                with self._freed:  # every actor is measuring another workload's candidates
                    self._freed.wait(0.2)
                interrupts.check()
                continue
            done, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            interrupts.check()  # a Ctrl-C noted on the main thread stops this workload's run
            for ref in done:
                i, attempt, actor = running.pop(ref)
                hash_ = candidates[i].structural_hash
                try:
                    result = ray.get(ref)
                except RayActorError as exc:
                    self._drop(actor)
                    if attempt == 0 and self._actors:
                        waiting.appendleft((i, 1))  # once more, on another actor
                        continue
                    why = (str(exc).strip().splitlines() or ["actor died"])[0][:300]
                    result = MeasureResult(hash_, kind, False, error=f"measurement actor died ({why})"
                                           + ("; retried once" if attempt else ""))
                except Exception as exc:  # noqa: BLE001 - the backend raised: one failed measurement
                    self._give_back(actor)
                    cause = getattr(exc, "cause", None) or exc
                    result = MeasureResult(hash_, kind, False, error=f"{type(cause).__name__}: {cause}"[:500])
                else:
                    self._give_back(actor)
                finish(i, result, actor)
        for i, result in enumerate(results):
            if result is None:
                finish(i, MeasureResult(candidates[i].structural_hash, kind, False,
                                        error="no measurement actor left on the cluster"), None)
        return results  # type: ignore[return-value]

    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        ray = _ray()
        check_kind(kind)
        if not self._actors:
            return MeasureResult(None, kind, False, error="no measurement actor left on the cluster")
        return ray.get(self._actors[0].handle.measure_vendor.remote(workload, kind))

    def close(self) -> None:
        ray = _ray()
        for actor in self._actors:
            try:
                ray.get(actor.handle.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - it is going anyway
                pass
            ray.kill(actor.handle)
        self._actors, self._free = [], []


# -- several workloads at once ----------------------------------------------------------------------
def tune_workloads(specs: Sequence[str], objective, backend: ClusterBackend, db, settings, *,
                   on_status=None, log=None, give_up_after_interrupt_s: float = 10.0) -> list:
    """Tune every workload at once, one Tuner per workload in a driver thread with its own records
    connection, all measuring on ``backend``'s actors and building on the cluster. Returns their
    Status in order (an interrupted one says so). Ctrl-C is taken on the main thread: the Tuners see
    it at their next step; one still building after ``give_up_after_interrupt_s`` is left (its
    records are committed; the same call resumes it)."""
    from etune.kernels import as_workload
    from etune.measurements.records import RecordsDB
    from etune.search_space import gpu_spec

    from .search import Tuner

    RecordsDB.open(db).close()  # the schema, made once before the threads write
    statuses: list = [None] * len(specs)
    failures: list[BaseException] = []
    # One Tuner made at a time: making design spaces imports TVM modules lazily, and two threads
    # importing one module at once see it half made.
    making = threading.Lock()

    def run(index: int, spec: str) -> None:
        try:
            builder = None
            if settings.build:
                builder = cluster_builder(gpu_spec(backend.target or settings.target), as_workload(spec),
                                          settings.workdir)
            with RecordsDB.open(db) as records:
                with making:
                    tuner = Tuner(spec, objective, backend, records, settings, builder=builder, on_status=on_status,
                                  log=None if log is None else (lambda m: log(f"{spec}: {m}")))
                statuses[index] = tuner.run()
        except BaseException as exc:  # noqa: BLE001 - raised again on the main thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(i, spec), name=f"etune-tune-{spec}", daemon=True)
               for i, spec in enumerate(specs)]
    with interrupts.stop_on(signal.SIGINT):
        for thread in threads:
            thread.start()
        interrupted_at = None
        while any(t.is_alive() for t in threads):
            try:
                for thread in threads:
                    thread.join(0.2)  # short waits: the main thread must run the signal handler
            except KeyboardInterrupt:
                interrupted_at = interrupted_at or time.monotonic()
            if interrupted_at is not None and time.monotonic() - interrupted_at > give_up_after_interrupt_s:
                break
        if interrupted_at is not None:
            raise KeyboardInterrupt
    for failure in failures:
        raise failure
    return statuses


def tune_on_cluster(specs: Sequence[str], objective="energy", backend: str = "auto", db="etune.db", *,
                    cluster: str = "ray", actors: int | None = None, on_status=None, log=None, **settings) -> list:
    """``tuner.search.tune`` for several workloads at once on a Ray cluster: their Status in order.
    ``settings``: the fields of ``TuneSettings``; ``backend`` is made on each GPU's actor."""
    from .objectives import Objective
    from .search import TuneSettings

    objective = objective if isinstance(objective, Objective) else Objective.parse(objective)
    settings = TuneSettings(**settings)
    connect(cluster)
    measuring = ClusterBackend(backend, actors=actors, gpu=settings.target if settings.target != "local" else "h100",
                               log=log)
    try:
        return tune_workloads(specs, objective, measuring, db, settings, on_status=on_status, log=log)
    finally:
        measuring.close()
