import math
import random

import pytest

from etune.search_space import Builder, ScheduleSpace, gpu_spec, launch_problem
from etune.search_space.analysis import KernelLaunch
from etune.search_space.build import parse_ptxas_report
from etune.search_space.targets import TargetError


def test_target_presets():
    h100 = gpu_spec("h100")
    assert h100.arch == "sm_90" and h100.sm_count == 132
    assert gpu_spec("a100").arch == "sm_80"
    assert '"arch":"sm_90"' in str(h100.tvm_target()).replace(" ", "")
    with pytest.raises(TargetError, match="unknown GPU target"):
        gpu_spec("b9000")


# MetaSchedule's spaces (sampling decisions to mutate and cross over); the thread-level templates
# (one point each, `gemm_mma`) are tested in tests/test_gemm_mma.py.
SAMPLED_RULE_SETS = ("tensorcore", "mma", "simt")


@pytest.fixture(scope="module")
def gemm_space():
    return ScheduleSpace("gemm:256,256,256", rule_sets=SAMPLED_RULE_SETS)


def test_sampling_gives_distinct_valid_candidates(gemm_space):
    candidates = gemm_space.sample(6, seed=1)
    assert len(candidates) == 6
    assert len({c.structural_hash for c in candidates}) == 6
    for c in candidates:
        assert c.launches and launch_problem(c.launches, gemm_space.gpu) is None
    # Every rule set contributes: wmma, pipelined mma.sync and SIMT candidates.
    assert {gemm_space.design_spaces[c.design_space].rule_set for c in gemm_space.sample(12, seed=2)} == {
        "tensorcore", "mma", "simt"}


def test_exclude_and_seed(gemm_space):
    first = gemm_space.sample(3, seed=7)
    again = gemm_space.sample(3, seed=7)
    assert [c.structural_hash for c in first] == [c.structural_hash for c in again]
    others = gemm_space.sample(3, seed=7, exclude={c.structural_hash for c in first})
    assert not {c.structural_hash for c in others} & {c.structural_hash for c in first}


def test_mutation_and_crossover_give_new_valid_schedules(gemm_space):
    rng = random.Random(0)
    parents = gemm_space.sample(10, seed=3)
    pairs = [(p, m) for p, m in ((p, gemm_space.mutate(p, rng)) for p in parents) if m is not None]
    assert len(pairs) >= 5
    assert sum(m.structural_hash != p.structural_hash for p, m in pairs) >= 3
    by_space = {}
    for p in parents:
        by_space.setdefault(p.design_space, []).append(p)
    a, b = next(ps for ps in by_space.values() if len(ps) >= 2)[:2]
    children = [c for c in (gemm_space.crossover(a, b, rng) for _ in range(8)) if c is not None]
    assert children and all(c.design_space == a.design_space for c in children)
    with pytest.raises(ValueError):
        other = next(p for p in parents if p.design_space != a.design_space)
        gemm_space.crossover(a, other, rng)


def test_a_seed_gives_the_same_mutants_in_another_space(gemm_space):
    """TVM's MutateTileSize picks its site in object-address order; etune's visits the trace in order,
    so a tuning run repeats with its seed (in another process too)."""
    other = ScheduleSpace("gemm:256,256,256", rule_sets=SAMPLED_RULE_SETS)
    parents = gemm_space.sample(8, seed=5)
    twins = other.sample(8, seed=5)

    def mutants(space, candidates):
        rng = random.Random(1)
        return [(m.structural_hash if m else None) for m in (space.mutate(c, rng) for c in candidates for _ in range(3))]

    ours = mutants(gemm_space, parents)
    assert sum(h is not None for h in ours) >= 12
    assert ours == mutants(other, twins)


def test_tile_mutation_changes_one_decision_and_keeps_extents_and_the_innermost_limit(gemm_space):
    from etune.search_space.space import mutate_tile_size

    rng = random.Random(2)
    tiles_moved = 0
    for candidate in gemm_space.sample(6, seed=6):
        trace = candidate.trace.simplified(remove_postproc=True)
        for _ in range(5):
            mutated = mutate_tile_size(trace, rng)
            changed = [inst for inst in trace.insts if trace.get_decision(inst) is not None
                       and str(mutated.get_decision(inst)) != str(trace.get_decision(inst))]
            assert len(changed) == 1
            inst = changed[0]
            if inst.kind.name == "SamplePerfectTile":
                before = [int(t) for t in trace.get_decision(inst)]
                after = [int(t) for t in mutated.get_decision(inst)]
                assert math.prod(after) == math.prod(before)
                assert after[-1] <= max(int(inst.attrs[1]), before[-1])
                tiles_moved += 1
            else:  # a cooperative-fetch vector length, redrawn among the others
                assert inst.kind.name == "SampleCategorical"
    assert tiles_moved >= 8


def test_trace_json_round_trip(gemm_space):
    c = gemm_space.sample(1, seed=4)[0]
    back = gemm_space.from_trace_json(c.trace_json(), c.design_space)
    assert back.structural_hash == c.structural_hash


def test_launch_problems():
    gpu = gpu_spec("h100")
    ok = KernelLaunch("k", (128, 1, 1), (256, 1, 1), 16384, 64, True, 8)
    assert launch_problem([ok], gpu) is None
    too_many_threads = KernelLaunch("k", (1, 1, 1), (64, 32, 1), 0, 0, False, 1)
    assert "threads per block" in launch_problem([too_many_threads], gpu)
    huge_local = KernelLaunch("k", (4, 1, 1), (32, 1, 1), 0, 512 * 1024, False, 1)
    assert "local memory" in launch_problem([huge_local], gpu)
    wide_gather = KernelLaunch("k", (4, 1, 1), (32, 1, 1), 0, 0, False, 8, max_gather_lanes=8)
    assert "gather" in launch_problem([wide_gather], gpu)
    assert launch_problem([], gpu) == "no device kernel"


def test_ptxas_report_parsing():
    report = """ptxas info    : Compiling entry function 'main_kernel' for 'sm_90'
ptxas info    : Function properties for main_kernel
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 20480 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'main_kernel_1' for 'sm_90'
ptxas info    : Used 32 registers, used 0 barriers, 400 bytes cmem[0]
"""
    first, second = parse_ptxas_report(report)
    assert (first.name, first.registers, first.shared_bytes, first.stack_bytes) == ("main_kernel", 168, 20480, 16)
    assert (first.spill_store_bytes, first.spill_load_bytes) == (8, 4)
    assert (second.name, second.registers, second.shared_bytes) == ("main_kernel_1", 32, 0)


# One small workload of each family, sampled and built to sm_90 cubins with nvcc: the GPU-less
# build check (the full 32-per-suite-workload run is benchmarks/check_builds.py).
@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, samples",
    [("gemm:512,512,512", 8), ("gemm:1,1024,1024", 6), ("softmax:1024,1024", 8), ("attention:1,4,128,128,64,causal", 4)],
)
def test_sampled_schedules_build_to_cuda(spec, samples, build_dir):
    space = ScheduleSpace(spec)
    candidates = space.sample(samples, seed=11)
    assert len(candidates) == samples
    results = Builder(space.gpu, workdir=build_dir, jobs=2).build(candidates)
    built = [r for r in results if r.ok]
    assert len(built) / len(results) >= 0.9, [r.error for r in results if not r.ok]
    for r in built:
        assert r.kernels and all(k.registers > 0 for k in r.kernels)
    # A second build of the same candidates comes from the cache.
    again = Builder(space.gpu, workdir=build_dir, jobs=2).build(candidates)
    assert all(r.cached for r in again if r.ok)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["gemm:512,512,512", "softmax:1024,1024", "attention:1,4,128,128,64,causal"])
def test_built_candidates_match_reference_on_gpu(spec, build_dir):
    from etune.measurements.tvm_runner import run_and_check

    space = ScheduleSpace(spec, "local")
    results = Builder(space.gpu, workdir=build_dir).build(space.sample(4, seed=5))
    for i, r in enumerate(x for x in results if x.ok):
        ok, err = run_and_check(space.workload, r.library, seed=i)
        assert ok, f"relative error {err}"


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as in a fresh process: an earlier test on the same xdist worker can
    leave another one (in one full-suite run the signal was ignored and TVM's call returned normally)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_inside_a_tvm_callback_stops_sampling(gemm_space, monkeypatch, python_sigint):
    """TVM hands a KeyboardInterrupt raised in a callback back as a RuntimeError, which sampling
    takes for an invalid candidate; the note the signal handler leaves stops it all the same."""
    import os
    import signal
    import time

    import tvm_ffi

    from etune.search_space import interrupts
    from etune.search_space import space as space_module

    def press_ctrl_c(*_):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs here, inside the callback

    tvm_ffi.register_global_func("etune.test.press_ctrl_c", press_ctrl_c, override=True)
    through_tvm = tvm_ffi.get_global_func("etune.test.press_ctrl_c")
    with pytest.raises(RuntimeError):  # what TVM makes of it
        through_tvm()
    monkeypatch.setattr(space_module, "kernel_launches", lambda *_: through_tvm())
    started = time.monotonic()
    with interrupts.stop_on(signal.SIGINT), pytest.raises(KeyboardInterrupt):
        gemm_space.sample(4, seed=0)
    assert time.monotonic() - started < 5 and interrupts.received() is None  # and the note is gone after
