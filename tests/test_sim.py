"""The sim backend: the analytic H100 of measurements.sim (all figures here are sim figures)."""
import dataclasses
import itertools
import time
from types import SimpleNamespace

import pytest

from etune.kernels import parse_spec
from etune.measurements import make_backend
from etune.measurements.sim import SimBackend, SimParams, simulate, vendor_outcome
from etune.search_space.analysis import estimate_registers
from etune.search_space import BuildResult, ScheduleSpace, gpu_spec
from etune.search_space.analysis import MAX_WARP_ILP, KernelLaunch, Traffic

H100 = gpu_spec("h100")
GEMM_4096 = parse_spec("gemm:4096,4096,4096")


def launch(grid=1024, block=256, shared=0, local=0, tensor_cores=False, lanes=1, **traffic) -> KernelLaunch:
    return KernelLaunch("k", (grid, 1, 1), (block, 1, 1), shared, local, tensor_cores, lanes,
                        traffic=Traffic(**traffic))


def stream(bytes_, access_bytes=4, grid=1024, block=256, **extra) -> KernelLaunch:
    """A kernel reading ``bytes_`` with accesses of ``access_bytes`` and writing a tenth of that."""
    return launch(grid, block, lanes=max(1, access_bytes // 4), global_load_bytes=bytes_,
                  global_load_instructions=bytes_ / access_bytes, global_store_bytes=bytes_ / 10,
                  global_store_instructions=bytes_ / 10 / access_bytes, arithmetic_ops=bytes_ / 2, **extra)


def tensor_core_gemm(scale=1.0) -> KernelLaunch:
    """A big tensor-core kernel (the shape of a 4096^3 GEMM with 128x128 tiles)."""
    return launch(1024, 256, shared=32768, tensor_cores=True, lanes=8,
                  tensor_core_flops=1.4e11 * scale, global_load_bytes=2.1e9 * scale,
                  global_load_instructions=2.1e9 * scale / 16, global_store_bytes=3.4e7 * scale,
                  global_store_instructions=3.4e7 * scale / 16, shared_load_bytes=4e9 * scale,
                  shared_store_bytes=2.1e9 * scale)


def fake_candidate(index: int, launches, workload=None):
    return SimpleNamespace(structural_hash=f"{index:016x}", launches=launches, workload=workload)


# -- the pure model ---------------------------------------------------------------------------------
def test_simulate_is_a_pure_function():
    k = stream(64e6)
    a, b = simulate([k]), simulate([k], None, H100)
    assert a.latency_s == b.latency_s and a.energy_j == b.energy_j
    assert a.avg_power_w == pytest.approx(a.energy_j / a.latency_s)
    with pytest.raises(ValueError):
        simulate([])


def test_more_work_costs_more_time_and_energy():
    small = simulate([stream(64e6)])
    double = simulate([stream(128e6, grid=2048)])
    assert double.latency_s > 1.6 * small.latency_s
    assert double.energy_j > 1.6 * small.energy_j
    # Each kernel of a module adds its time and a launch gap.
    two = simulate([stream(64e6), stream(64e6)])
    assert two.latency_s == pytest.approx(2 * small.latency_s)
    assert two.breakdown["kernels"] == 2


def test_independent_accumulators_hide_latency_like_warps():
    # One 256-thread block per SM (shared memory): 8 warps. Warps with one accumulator chain leave
    # the SM short of independent instructions; two chains each make up for it, as 16 warps would.
    def gemm(block, tiles):
        k = tensor_core_gemm()
        # big tiles: a tenth of the global traffic, so that the SM side sets the time
        traffic = dataclasses.replace(k.traffic, global_load_bytes=2.1e8, global_load_instructions=2.1e8 / 16)
        return dataclasses.replace(k, block=(block, 1, 1), shared_bytes=160 * 1024, accumulator_tiles=tiles,
                                   traffic=traffic)
    one_chain, two_chains, many = (simulate([gemm(256, t)]).latency_s for t in (0.0, 2.0, 32.0))
    assert one_chain > 1.3 * two_chains
    assert many == two_chains  # counted up to two chains per warp
    assert simulate([gemm(512, 0.0)]).latency_s == pytest.approx(two_chains, rel=0.02)
    assert gemm(256, 0.0).warp_ilp() == 1.0 and gemm(256, 3.0).warp_ilp() == 2.0
    assert SimParams().max_warp_ilp == MAX_WARP_ILP  # the features' cap is sim's
    # the model before it counted ILP: warps only
    assert simulate([gemm(256, 32.0)], params=SimParams(max_warp_ilp=1.0)).latency_s == pytest.approx(one_chain)


def test_power_capped_kernel_sits_at_the_cap():
    capped = simulate([tensor_core_gemm()], GEMM_4096)
    assert capped.avg_power_w == pytest.approx(H100.tdp_w, rel=1e-9)
    assert capped.breakdown["throttle_stretch"] > 1.02
    # The same kernel on a board with a higher cap runs faster and draws more than 700 W.
    free = simulate([tensor_core_gemm()], GEMM_4096, dataclasses.replace(H100, tdp_w=2000.0))
    assert free.breakdown["throttle_stretch"] == 1.0
    assert free.latency_s < capped.latency_s / 1.02
    assert free.avg_power_w > H100.tdp_w
    # Lower voltage under the cap makes each tensor-core flop a little cheaper; static energy grows with time.
    capped_j, free_j = capped.breakdown["energy_by_component_j"], free.breakdown["energy_by_component_j"]
    assert 0.8 * free_j["tensor"] < capped_j["tensor"] < 0.99 * free_j["tensor"]
    assert capped_j["sm_active"] > free_j["sm_active"]


def test_energy_includes_idle_power():
    cases = (([stream(1e5, grid=4)], None), ([stream(64e6)], None), ([tensor_core_gemm()], GEMM_4096))
    for launches, workload in cases:
        outcome = simulate(launches, workload)
        assert outcome.energy_j >= H100.idle_w * outcome.latency_s
        assert outcome.energy_above_idle_j == pytest.approx(outcome.energy_j - H100.idle_w * outcome.latency_s)
        assert H100.idle_w < outcome.avg_power_w <= H100.tdp_w + 1e-9


def test_same_parallelism_on_fewer_sms_is_as_fast_and_cheaper():
    """Energy is not a function of latency: 132 blocks of 256 threads vs 33 blocks of 1024 threads
    keep the same bytes in flight, but the second leaves 99 SMs idle."""
    wide = simulate([stream(8e6, grid=132, block=256)])
    narrow = simulate([stream(8e6, grid=33, block=1024)])
    assert narrow.latency_s == pytest.approx(wide.latency_s, rel=0.02)
    assert narrow.energy_j < 0.95 * wide.energy_j


def test_vector_accesses_save_instructions():
    scalar = simulate([stream(256e6, access_bytes=2)])
    vector = simulate([stream(256e6, access_bytes=16)])
    assert vector.latency_s <= scalar.latency_s
    assert vector.energy_j < 0.9 * scalar.energy_j
    assert (vector.breakdown["energy_by_component_j"]["instructions"]
            < 0.5 * scalar.breakdown["energy_by_component_j"]["instructions"])


def test_wave_quantisation():
    """1024-thread blocks fit two per SM: 264 blocks are one round, 265 need a second on one SM."""
    def compute_bound(grid):
        return launch(grid, 1024, arithmetic_ops=grid * 1024 * 2e4, global_load_bytes=grid * 4096.0,
                      global_load_instructions=grid * 1024.0)

    full, one_more = simulate([compute_bound(264)]), simulate([compute_bound(265)])
    assert one_more.kernels[0].rounds == 2 and full.kernels[0].rounds == 1
    assert one_more.latency_s > 1.4 * full.latency_s
    # In the tail only one SM works, so energy grows much less than time.
    assert one_more.energy_j / full.energy_j < 0.8 * one_more.latency_s / full.latency_s


def test_registers_follow_launch_bounds():
    assert estimate_registers(0, 256, H100) == (32, 0)
    assert estimate_registers(512, 128, H100) == (160, 0)
    # 1024 threads can have at most 64 registers each: the rest of the local array spills.
    assert estimate_registers(512, 1024, H100) == (64, 384)


def test_spills_cost_in_proportion_to_the_uses_of_what_spilled():
    """A spilled accumulator costs local-memory traffic every time the code touches it: the same
    spill with 10x the local accesses costs far more; without a spill, local accesses are free."""
    base = tensor_core_gemm(scale=0.1)

    def gemm_like(local, local_access_bytes):
        return dataclasses.replace(base, block=(512, 1, 1), local_bytes_per_thread=local,
                                   traffic=dataclasses.replace(base.traffic, local_access_bytes=local_access_bytes))

    fits, spills = 256, 1216  # 512 threads leave 128 registers: 1216 B of local arrays spill ~50 %
    assert estimate_registers(fits, 512, H100)[1] == 0 and estimate_registers(spills, 512, H100)[1] > 0
    accesses = 512 * 1024 * 4000.0  # threads x ~4 KB each
    assert simulate([gemm_like(fits, 10 * accesses)]).latency_s == simulate([gemm_like(fits, 0)]).latency_s
    few, many = simulate([gemm_like(spills, accesses)]), simulate([gemm_like(spills, 10 * accesses)])
    assert many.latency_s > 1.5 * few.latency_s and many.energy_j > 1.3 * few.energy_j


def test_vendor_kernels_match_the_table_roughly():
    table = {"gemm:4096,4096,4096": (213e-6, "torch.matmul"), "softmax:4096,4096": (56e-6, "torch.softmax"),
             "attention:8,32,1,4096,128": (180e-6, "sdpa")}
    for spec, (latency, name) in table.items():
        outcome = vendor_outcome(parse_spec(spec))
        assert 0.75 < outcome.latency_s / latency < 1.3, spec
        assert outcome.breakdown["vendor"] == name
    gemm = vendor_outcome(parse_spec("gemm:4096,4096,4096"))
    assert gemm.avg_power_w == pytest.approx(H100.tdp_w)  # a big GEMM runs at the cap
    assert vendor_outcome(parse_spec("gemm:1,4096,4096")).avg_power_w < 0.7 * H100.tdp_w


# -- sampled candidates ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampled():
    # MetaSchedule's own softmax spaces: the row-softmax template's candidates all stream the rows at
    # full speed, and 16 of them need not hold a faster-but-hungrier pair
    softmax = ScheduleSpace("softmax:1024,1024", rule_sets=["tensorcore", "simt"]).sample(16, seed=0)
    # and the GEMM spaces the property was set on (the mma space's pipelines are tested in test_mma_space)
    gemm = ScheduleSpace("gemm:256,256,256", rule_sets=["tensorcore", "simt"]).sample(10, seed=0)
    return {"softmax": softmax, "gemm": gemm}


def test_sampled_candidates_trade_latency_for_energy(sampled):
    for family, candidates in sampled.items():
        outcomes = [simulate(c.launches, c.workload) for c in candidates]
        for o in outcomes:
            assert o.energy_j >= H100.idle_w * o.latency_s
        faster_but_hungrier = [(a, b) for a, b in itertools.permutations(outcomes, 2)
                               if a.latency_s < 0.98 * b.latency_s and a.energy_j > 1.02 * b.energy_j]
        assert faster_but_hungrier, family
    assert any(k.uses_tensor_cores for c in sampled["gemm"] for k in c.launches)


def test_backend_measures_sampled_candidates(sampled):
    candidates = sampled["softmax"][:6]
    backend = SimBackend(seed=3)
    seen = []
    latency = backend.measure(candidates, "latency", progress=seen.append)
    energy = backend.measure(candidates, "energy")
    assert seen == latency and len(latency) == len(energy) == 6
    for c, lat, en in zip(candidates, latency, energy):
        assert lat.ok and en.ok and lat.structural_hash == c.structural_hash
        exact = backend.outcome(c)
        assert lat.value == pytest.approx(exact.latency_s, rel=0.03)
        assert lat.details["median_s"] == lat.value and lat.details["min_s"] <= lat.value
        assert lat.details["checked"] is False and "sim" in lat.details["note"]
        assert en.value == pytest.approx(exact.energy_j, rel=0.03)
        d = en.details
        assert d["method"] == "sim" and d["converged"] is True and d["windows"] >= 1
        assert d["idle_power_w"] == H100.idle_w
        assert d["energy_above_idle_j"] == pytest.approx(en.value - H100.idle_w * d["latency_s"])
        assert d["avg_power_w"] == pytest.approx(en.value / d["latency_s"])
        assert 3.0 < d["simulated_cost_s"] < 4.0  # warm-up plus three ~1 s windows
        assert 0 <= en.spread < 0.02


def test_measurements_are_reproducible_and_repeats_differ_slightly():
    candidates = [fake_candidate(i, [stream(32e6 * (i + 1))]) for i in range(3)]
    first = SimBackend(seed=7).measure(candidates, "energy")
    again = SimBackend(seed=7)
    assert [r.value for r in again.measure(candidates, "energy")] == [r.value for r in first]
    repeat = again.measure(candidates, "energy")
    for a, b in zip(first, repeat):
        assert a.value != b.value
        assert abs(a.value / b.value - 1) < 0.03
    other_seed = SimBackend(seed=8).measure(candidates, "energy")
    assert [r.value for r in other_seed] != [r.value for r in first]
    exact = SimBackend(noise=0.0).measure(candidates, "latency")
    assert [r.value for r in exact] == [simulate(c.launches).latency_s for c in candidates]
    assert all(r.spread == 0.0 for r in exact)


def test_failures_are_results_not_exceptions():
    good = fake_candidate(1, [stream(1e6)])
    broken = fake_candidate(2, [stream(1e6)])
    slow = fake_candidate(3, [stream(1e6)])
    empty = fake_candidate(4, [])
    builds = [BuildResult(good.structural_hash, "ok", 1.0), BuildResult(broken.structural_hash, "error", 1.0,
                                                                        error="nvcc: syntax error"),
              BuildResult(slow.structural_hash, "timeout", 300.0, error="timed out after 300 s"),
              BuildResult(empty.structural_hash, "ok", 1.0)]
    seen = []
    results = SimBackend().measure([good, broken, slow, empty], "latency", builds=builds, progress=seen.append)
    assert [r.ok for r in results] == [True, False, False, False]
    assert results[1].error == "not built: error: nvcc: syntax error"
    assert results[2].error.startswith("not built: timeout")
    assert "no kernel launches" in results[3].error
    assert len(seen) == 4
    # A build of another candidate is not this candidate's build.
    mismatched = SimBackend().measure([good], "energy", builds=[BuildResult("ffff", "ok", 1.0)])
    assert not mismatched[0].ok and mismatched[0].error.startswith("not built")


def test_unknown_kind_raises():
    backend = SimBackend()
    with pytest.raises(ValueError, match="kind"):
        backend.measure([fake_candidate(1, [stream(1e6)])], "power")
    with pytest.raises(ValueError, match="kind"):
        backend.measure_vendor(parse_spec("gemm:64,64,64"), "watts")


def test_vendor_measurements():
    backend = SimBackend()
    workload = parse_spec("softmax:4096,4096")
    latency = backend.measure_vendor(workload, "latency")
    energy = backend.measure_vendor(workload, "energy")
    assert latency.ok and energy.ok and latency.structural_hash is None
    assert latency.details["vendor"] == energy.details["vendor"] == "torch.softmax"
    assert energy.value == pytest.approx(vendor_outcome(workload).energy_j, rel=0.03)
    assert backend.measure_vendor(parse_spec("attention:1,32,2048,2048,128"), "latency").details["vendor"] == "sdpa"


def test_device_and_factory():
    backend = make_backend("sim", gpu="a100", seed=2)
    assert isinstance(backend, SimBackend)
    info = backend.device()
    assert info.backend == "sim" and info.name == "sim:NVIDIA A100-SXM4-80GB"
    assert info.details["idle_power_w"] == gpu_spec("a100").idle_w and info.details["seed"] == 2
    assert "not hardware" in info.details["note"]


def test_a_thousand_measurements_take_well_under_a_second():
    candidates = [fake_candidate(i, [stream(1e6 * (1 + i % 97), grid=64 + i)]) for i in range(1000)]
    backend = SimBackend()
    started = time.process_time()
    results = backend.measure(candidates, "energy")
    elapsed = time.process_time() - started
    assert all(r.ok for r in results)
    assert elapsed < 0.8, f"{elapsed:.2f} s of CPU for 1000 measurements"
