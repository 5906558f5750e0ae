"""High-level kernel features of a candidate: cheap, static, no GPU.

Everything here comes from what ``search_space`` already knows about a candidate: its lowered kernels
(launch geometry, on-chip memory, dynamic traffic counts; ``search_space.analysis``), its schedule
trace (unroll decisions), the workload (FLOPs, minimum bytes) and the target GPU's limits and peaks.
A ``BuildResult`` adds ptxas' registers, stack and spills per kernel; without one those features are
NaN (XGBoost learns a direction for missing values).

Multi-kernel modules (softmax: 3 kernels, attention: 4 to 7) are aggregated so the vector length is
fixed: amounts of work (FLOPs, bytes, instructions, roofline time) are *summed*; per-kernel shape
features (threads, occupancy, waves, registers, vector width ...) are given twice, as a mean weighted
by each kernel's estimated time (the kernels that dominate the runtime dominate the feature) and as
the worst case over kernels (max threads, min occupancy, ...). A tiny normalisation kernel of an
attention module then neither hides nor dominates the big GEMM-like ones.

``candidate_features(candidate, gpu, build=None)`` -> dict; ``FEATURE_NAMES`` is the fixed order and
``to_matrix`` turns a list of dicts into the model's input matrix (missing names -> NaN).

Besides counts and launch shape, a few analytic estimates: the roofline time, ``est_time_s`` (roofline
stretched by SM fill and the last partial wave), and ``bottleneck_time_s`` (the slowest of tensor/SIMT
compute, HBM, shared memory, instruction issue, L1<->L2 and a Little's-law memory-parallelism time,
with SM fill, waves and latency hiding; per-SM rates are NVIDIA's public ones). Two helpers build model
inputs from these: ``rate_features`` (what a measured latency implies: achieved rates, for power
models) and ``relative_features`` (amounts per unit of the workload, for transfer across shapes).

Optional (``per_store=True``): MetaSchedule's own ``PerStoreFeature`` vector (164 numbers per buffer
store) summed and maxed over stores, appended under ``ms_*`` names. It needs TVM and a TuneContext per
call, costs ~10-50 ms per candidate, and did not improve accuracy on sim (see the benchmark), so the
default model does not use it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping, Sequence

import numpy as np

# Launch overhead charged per kernel in the analytic time estimate (a few microseconds on H100).
KERNEL_LAUNCH_S = 2.5e-6
# Register allocation granularity: registers are given to warps in units of 256 (8 per thread).
_REG_ALLOC_UNIT = 256
# Shared memory the driver reserves per resident block (sm_80 and later).
_SHARED_RESERVED_PER_BLOCK = 1024

FAMILIES = ("gemm", "softmax", "attention")
# Memory latency (a mix of L2 hits, ~250 ns, and HBM, ~500-600 ns) and independent loads a thread
# keeps in flight, for the Little's-law time.
MEMORY_LATENCY_S = 400e-9
LOADS_IN_FLIGHT = 2
# L2 and DRAM move 32-byte sectors.
_SECTOR_BYTES = 32

# Fixed order of the feature vector. Names ending in _log2 are log2(1 + x) of an amount.
FEATURE_NAMES: tuple[str, ...] = (
    # the workload (constant within one tuning task; what transfers across shapes)
    "family_gemm", "family_softmax", "family_attention",
    "workload_flops_log2", "workload_min_bytes_log2", "workload_intensity", "workload_roofline_s",
    # amounts of work, summed over kernels (dynamic counts from the lowered code)
    "n_kernels",
    "flops_log2", "tensor_core_flops_log2", "arithmetic_ops_log2", "tensor_core_fraction",
    "global_load_bytes_log2", "global_store_bytes_log2", "global_bytes_log2",
    "global_load_instructions_log2", "global_store_instructions_log2",
    "shared_bytes_moved_log2",
    "arithmetic_intensity",          # dynamic flops / dynamic global bytes
    "traffic_ratio",                 # dynamic global bytes / workload minimum bytes
    "redundant_compute_ratio",       # dynamic flops / workload flops
    "bytes_per_load_instruction",    # coalescing / vector-width proxy
    "bytes_per_store_instruction",
    "shared_per_global_bytes",
    "memory_instructions_log2",      # global accesses + shared accesses (4 B each)
    "issued_instructions_log2",      # arithmetic + one per tensor-core mma per thread + memory accesses
    "warp_instructions_log2",        # the same per warp: a warp of 4 busy lanes issues as much as one of 32
    "l2_sector_bytes_log2",          # global traffic in 32-byte sectors: narrow warp accesses move whole ones
    # time
    "roofline_s",                    # sum over kernels of max(flops/peak, bytes/bandwidth)
    "est_time_s",                    # roofline with SM fill and wave quantisation + launch overhead
    "est_over_workload_roofline",
    "compute_bound_fraction",        # time-weighted share of kernels whose roofline is compute-bound
    "shared_time_s", "issue_time_s", "lsu_time_s",  # other per-SM pipes at their peak rates
    "memory_parallelism_time_s",     # Little's law: global bytes / (bytes in flight / memory latency)
    "bottleneck_time_s",             # max over all pipes and memory, with SM fill, waves and launches
    "est_warps_hiding",              # resident warps x ILP per SM scheduler (latency hiding), time-weighted
    # launch shape: time-weighted mean over kernels ...
    "threads_per_block", "blocks_log2", "total_threads_log2", "waves", "wave_efficiency", "sm_fill",
    "busy_sm_fraction",              # share of SM-time holding blocks when blocks are dealt round-robin
    "busy_thread_fraction",          # ... times the threads those SMs hold: occupancy-aware static power
    "occupancy", "occupancy_with_registers", "shared_bytes_per_block", "local_bytes_per_thread",
    "vector_lanes", "registers_per_thread",
    "est_registers_per_thread",      # static estimate: 32 + local bytes / 4 within launch bounds
    "est_spill_access_bytes_log2",   # local-array accesses that the estimate spills (sim's spill traffic)
    "occupancy_est",                 # occupancy with those registers
    "resident_warps_per_sm",         # warps an SM actually holds (small grids hold fewer)
    "lane_utilisation", "min_lane_utilisation",  # threads per block / (warps x 32)
    "thread_occupancy",              # threads an SM actually holds / its maximum
    "bytes_in_flight_per_sm_log2",   # resident threads x bytes per access: memory-level parallelism
    # ... and the worst case over kernels
    "max_threads_per_block", "min_blocks_log2", "max_waves", "min_wave_efficiency", "min_sm_fill",
    "min_occupancy", "min_occupancy_est", "min_bytes_in_flight_per_sm_log2",
    "max_shared_bytes_per_block", "max_local_bytes_per_thread", "max_registers_per_thread",
    # from ptxas (NaN without a build)
    "spill_bytes_log2", "stack_bytes_per_thread",
    # schedule decisions
    "unroll_max_step", "unroll_annotations",
)

BUILD_FEATURES = ("occupancy_with_registers", "registers_per_thread", "max_registers_per_thread",
                  "spill_bytes_log2", "stack_bytes_per_thread")


def _log2(x: float) -> float:
    return math.log2(1.0 + max(float(x), 0.0))


def blocks_per_sm(threads: int, shared_bytes: int, gpu, registers: float | None = None) -> int:
    """Theoretical resident blocks per SM (CUDA occupancy calculator rules, simplified)."""
    warps = max(1, math.ceil(threads / gpu.warp_size))
    limits = [gpu.max_blocks_per_sm, gpu.max_threads_per_sm // (warps * gpu.warp_size)]
    if shared_bytes > 0:
        limits.append(gpu.shared_memory_per_sm // (shared_bytes + _SHARED_RESERVED_PER_BLOCK))
    if registers is not None and not math.isnan(registers) and registers > 0:
        per_warp = math.ceil(registers * gpu.warp_size / _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
        limits.append(gpu.registers_per_sm // (per_warp * warps))
    return max(0, min(limits))


def occupancy(threads: int, shared_bytes: int, gpu, registers: float | None = None) -> float:
    """Resident warps per SM over the maximum (0 when the block cannot be resident)."""
    warps = max(1, math.ceil(threads / gpu.warp_size))
    return blocks_per_sm(threads, shared_bytes, gpu, registers) * warps * gpu.warp_size / gpu.max_threads_per_sm


def unroll_features(trace) -> tuple[float, float]:
    """(largest auto-unroll max step, number of unroll annotations) of a schedule trace.

    A postprocessed trace carries ``pragma_auto_unroll_max_step`` on loops; an unprocessed one only
    the ``meta_schedule.unroll_explicit``/``unroll_implicit`` block annotation whose value is a
    SampleCategorical output, which is resolved through that instruction's decision.
    """
    if trace is None:
        return math.nan, 0.0
    steps: list[int] = []
    sampled: dict[str, int] = {}  # output var name -> sampled value
    annotations = 0
    for inst in trace.insts:
        kind = inst.kind.name
        if kind == "SampleCategorical":
            decision = trace.get_decision(inst)
            try:
                values = [int(v) for v in inst.attrs[0]]
                if decision is not None and inst.outputs:
                    sampled[str(inst.outputs[0])] = values[int(decision)]
            except (TypeError, ValueError, IndexError):
                pass
        elif kind == "Annotate" and inst.attrs:
            key = str(inst.attrs[0])
            value = inst.inputs[1] if len(inst.inputs) > 1 else None
            if key == "pragma_auto_unroll_max_step":
                annotations += 1
                try:
                    steps.append(int(value))
                except (TypeError, ValueError):
                    try:
                        steps.append(int(str(value)))
                    except ValueError:
                        pass
            elif key in ("meta_schedule.unroll_explicit", "meta_schedule.unroll_implicit"):
                if str(value) in sampled:
                    steps.append(sampled[str(value)])
    # Loop pragmas and block annotations repeat the same decision; count annotated loops only once.
    return (float(max(steps)) if steps else 0.0), float(annotations)


def _kernel_resources(launches, build) -> list:
    """ptxas resources matched to launches by kernel name (by order when names do not match)."""
    if build is None or not getattr(build, "kernels", None):
        return [None] * len(launches)
    by_name = {k.name: k for k in build.kernels}
    matched = [by_name.get(launch.name) for launch in launches]
    if any(m is None for m in matched) and len(build.kernels) == len(launches):
        matched = list(build.kernels)
    return matched


def _kernel_numbers(launch, resources, gpu) -> dict:
    t = launch.traffic
    threads = launch.threads_per_block
    blocks = launch.blocks
    registers = float(resources.registers) if resources is not None else math.nan
    # Always the static estimate (built or not), so these features mean the same for every candidate;
    # ptxas' own figures are the separate *registers* features.
    from etune.search_space.analysis import estimate_registers, spilled_access_bytes  # sim's estimates too

    est_registers, est_spill = (float(v) for v in estimate_registers(launch.local_bytes_per_thread, threads, gpu))
    warps = max(1, math.ceil(threads / gpu.warp_size))
    per_sm_est = max(1, blocks_per_sm(threads, launch.shared_bytes, gpu, est_registers))
    resident_blocks = min(per_sm_est, math.ceil(blocks / gpu.sm_count))
    resident_warps = resident_blocks * warps
    # Lanes a warp actually uses: a 4-thread block issues full warp instructions for 4 lanes' work.
    lane_utilisation = threads / (warps * gpu.warp_size)
    resident_threads = resident_blocks * threads
    load_i = t.global_load_instructions + t.global_store_instructions
    bytes_per_access = (t.global_load_bytes + t.global_store_bytes) / load_i if load_i > 0 else 0.0
    memory_instructions = load_i + t.shared_instructions
    issued = t.arithmetic_ops + t.hmma_instructions + memory_instructions
    lanes = threads / warps
    # L2 moves 32-byte sectors: a warp access narrower than one (few lanes, small elements) moves a whole one.
    sector_waste = max(1.0, _SECTOR_BYTES / (lanes * bytes_per_access)) if bytes_per_access > 0 else 1.0
    per_sm = blocks_per_sm(threads, launch.shared_bytes, gpu)
    capacity = max(1, per_sm * gpu.sm_count)
    waves = blocks / capacity
    wave_efficiency = waves / math.ceil(waves) if waves > 0 else 0.0
    sm_fill = min(1.0, blocks / gpu.sm_count)
    # Blocks are dealt to SMs in turn: 133 blocks keep one SM busy twice as long as the other 131.
    busy_sm_fraction = blocks / (gpu.sm_count * math.ceil(blocks / gpu.sm_count)) if blocks > 0 else 0.0
    flops = t.tensor_core_flops + t.arithmetic_ops
    global_bytes = t.global_load_bytes + t.global_store_bytes
    compute_s = t.tensor_core_flops / gpu.peak_fp16_tensor_flops + t.arithmetic_ops / gpu.peak_fp32_flops
    memory_s = global_bytes / gpu.memory_bandwidth
    roofline = max(compute_s, memory_s)
    # Per-SM pipes (NVIDIA: 32 banks x 4 B of shared memory, 4 schedulers x 32 lanes of issue, 64 B of
    # L1<->L2 per clock), at a clock derived from the fp32 peak (2 flops x 128 lanes per SM per clock).
    clock = gpu.peak_fp32_flops / (gpu.sm_count * 256)
    shared_s = (t.shared_load_bytes + t.shared_store_bytes) / (gpu.sm_count * 128 * clock)
    issue_s = issued / (gpu.sm_count * 128 * clock) / lane_utilisation
    lsu_s = global_bytes / (gpu.sm_count * 64 * clock)
    # Work spread over fewer SMs than the GPU has, and a last partial wave, both stretch the time.
    # (a grid smaller than one wave is charged once, through sm_fill, not again as a partial wave).
    tail = wave_efficiency if waves >= 1 else 1.0
    est = roofline / max(sm_fill, 1e-3) / max(tail, 1e-3) + KERNEL_LAUNCH_S
    # 4 schedulers want ~4 independent instruction streams each: warps, or fewer warps with ILP
    hiding = min(1.0, resident_warps * launch.warp_ilp() / 16.0)
    simt_s = t.arithmetic_ops / gpu.peak_fp32_flops / lane_utilisation
    # Little's law: an SM keeps (resident threads x bytes per access x loads in flight) on the way to
    # memory for one memory latency; few or narrow threads cannot fill the memory pipe.
    in_flight = max(resident_threads * bytes_per_access * LOADS_IN_FLIGHT, 1.0)
    active_sms = max(1, min(blocks, gpu.sm_count))
    parallelism_s = global_bytes / active_sms / in_flight * MEMORY_LATENCY_S / max(tail, 1e-3)
    bottleneck = max(max(compute_s, simt_s, memory_s, shared_s, issue_s, lsu_s) / max(sm_fill, 1e-3)
                     / max(tail, 1e-3) / max(hiding, 1e-3) ** 0.5, parallelism_s) + KERNEL_LAUNCH_S
    return {
        "threads": threads, "blocks": blocks, "waves": waves, "wave_efficiency": wave_efficiency,
        "sm_fill": sm_fill, "occupancy": occupancy(threads, launch.shared_bytes, gpu),
        "occupancy_reg": occupancy(threads, launch.shared_bytes, gpu, registers) if resources is not None else math.nan,
        "shared": launch.shared_bytes, "local": launch.local_bytes_per_thread, "lanes": launch.max_vector_lanes,
        "registers": registers, "flops": flops, "global_bytes": global_bytes,
        "est_registers": est_registers, "est_spill_access": spilled_access_bytes(launch, est_spill),
        "occupancy_est": occupancy(threads, launch.shared_bytes, gpu, est_registers),
        "resident_warps": resident_warps,
        "in_flight": resident_threads * bytes_per_access,
        "lanes_used": lane_utilisation, "thread_occupancy": resident_threads / gpu.max_threads_per_sm,
        "memory_instructions": memory_instructions, "issued": issued, "warp_instructions": issued / lanes,
        "sector_bytes": global_bytes * sector_waste, "busy_sm_fraction": busy_sm_fraction,
        "busy_thread_fraction": busy_sm_fraction * resident_threads / gpu.max_threads_per_sm,
        "shared_s": shared_s, "issue_s": issue_s, "lsu_s": lsu_s, "bottleneck": bottleneck, "hiding": hiding,
        "parallelism_s": parallelism_s,
        "compute_bound": 1.0 if compute_s >= memory_s else 0.0, "roofline": roofline, "est": est,
        "spill": (resources.spill_store_bytes + resources.spill_load_bytes) if resources is not None else math.nan,
        "stack": resources.stack_bytes if resources is not None else math.nan,
    }


def _weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if not math.isnan(v)]
    if not pairs:
        return math.nan
    total = sum(w for _, w in pairs)
    if total <= 0:
        return sum(v for v, _ in pairs) / len(pairs)
    return sum(v * w for v, w in pairs) / total


def _max(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else math.nan


def _min(values: Iterable[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return min(values) if values else math.nan


def launch_features(launches, workload, gpu, build=None, trace=None) -> dict[str, float]:
    """The feature dict from the parts of a candidate (what ``candidate_features`` unpacks)."""
    resources = _kernel_resources(launches, build)
    kernels = [_kernel_numbers(l, r, gpu) for l, r in zip(launches, resources)]
    weights = [k["est"] for k in kernels]

    def tsum(field):
        return float(sum(getattr(l.traffic, field) for l in launches))

    tc_flops = tsum("tensor_core_flops")
    arith = tsum("arithmetic_ops")
    flops = tc_flops + arith
    load_b, store_b = tsum("global_load_bytes"), tsum("global_store_bytes")
    load_i, store_i = tsum("global_load_instructions"), tsum("global_store_instructions")
    global_b = load_b + store_b
    shared_b = tsum("shared_load_bytes") + tsum("shared_store_bytes")
    roofline = sum(k["roofline"] for k in kernels)
    est = sum(weights)
    wl_flops = float(workload.flops)
    wl_bytes = float(workload.min_bytes)
    wl_roofline = gpu.roofline_seconds(wl_flops, wl_bytes, tensor_cores=workload.family != "softmax")
    unroll, unroll_count = unroll_features(trace)
    has_build = build is not None and any(r is not None for r in resources)

    f = {
        "family_gemm": float(workload.family == "gemm"),
        "family_softmax": float(workload.family == "softmax"),
        "family_attention": float(workload.family == "attention"),
        "workload_flops_log2": _log2(wl_flops),
        "workload_min_bytes_log2": _log2(wl_bytes),
        "workload_intensity": wl_flops / max(wl_bytes, 1.0),
        "workload_roofline_s": wl_roofline,
        "n_kernels": float(len(launches)),
        "flops_log2": _log2(flops),
        "tensor_core_flops_log2": _log2(tc_flops),
        "arithmetic_ops_log2": _log2(arith),
        "tensor_core_fraction": tc_flops / flops if flops > 0 else 0.0,
        "global_load_bytes_log2": _log2(load_b),
        "global_store_bytes_log2": _log2(store_b),
        "global_bytes_log2": _log2(global_b),
        "global_load_instructions_log2": _log2(load_i),
        "global_store_instructions_log2": _log2(store_i),
        "shared_bytes_moved_log2": _log2(shared_b),
        "arithmetic_intensity": flops / max(global_b, 1.0),
        "traffic_ratio": global_b / max(wl_bytes, 1.0),
        "redundant_compute_ratio": flops / max(wl_flops, 1.0),
        "bytes_per_load_instruction": load_b / load_i if load_i > 0 else 0.0,
        "bytes_per_store_instruction": store_b / store_i if store_i > 0 else 0.0,
        "shared_per_global_bytes": shared_b / max(global_b, 1.0),
        "memory_instructions_log2": _log2(sum(k["memory_instructions"] for k in kernels)),
        "issued_instructions_log2": _log2(sum(k["issued"] for k in kernels)),
        "warp_instructions_log2": _log2(sum(k["warp_instructions"] for k in kernels)),
        "l2_sector_bytes_log2": _log2(sum(k["sector_bytes"] for k in kernels)),
        "roofline_s": roofline,
        "est_time_s": est,
        "est_over_workload_roofline": est / wl_roofline if wl_roofline > 0 else math.nan,
        "compute_bound_fraction": _weighted([k["compute_bound"] for k in kernels], weights),
        "shared_time_s": sum(k["shared_s"] for k in kernels),
        "issue_time_s": sum(k["issue_s"] for k in kernels),
        "lsu_time_s": sum(k["lsu_s"] for k in kernels),
        "memory_parallelism_time_s": sum(k["parallelism_s"] for k in kernels),
        "bottleneck_time_s": sum(k["bottleneck"] for k in kernels),
        "est_warps_hiding": _weighted([k["hiding"] for k in kernels], weights),
        "threads_per_block": _weighted([k["threads"] for k in kernels], weights),
        "blocks_log2": _weighted([_log2(k["blocks"]) for k in kernels], weights),
        "total_threads_log2": _log2(sum(k["threads"] * k["blocks"] for k in kernels)),
        "waves": _weighted([k["waves"] for k in kernels], weights),
        "wave_efficiency": _weighted([k["wave_efficiency"] for k in kernels], weights),
        "sm_fill": _weighted([k["sm_fill"] for k in kernels], weights),
        "busy_sm_fraction": _weighted([k["busy_sm_fraction"] for k in kernels], weights),
        "busy_thread_fraction": _weighted([k["busy_thread_fraction"] for k in kernels], weights),
        "occupancy": _weighted([k["occupancy"] for k in kernels], weights),
        "occupancy_with_registers": _weighted([k["occupancy_reg"] for k in kernels], weights),
        "shared_bytes_per_block": _weighted([k["shared"] for k in kernels], weights),
        "local_bytes_per_thread": _weighted([k["local"] for k in kernels], weights),
        "vector_lanes": _weighted([k["lanes"] for k in kernels], weights),
        "registers_per_thread": _weighted([k["registers"] for k in kernels], weights),
        "est_registers_per_thread": _weighted([k["est_registers"] for k in kernels], weights),
        "est_spill_access_bytes_log2": _log2(sum(k["est_spill_access"] for k in kernels)),
        "occupancy_est": _weighted([k["occupancy_est"] for k in kernels], weights),
        "resident_warps_per_sm": _weighted([k["resident_warps"] for k in kernels], weights),
        "lane_utilisation": _weighted([k["lanes_used"] for k in kernels], weights),
        "min_lane_utilisation": _min(k["lanes_used"] for k in kernels),
        "thread_occupancy": _weighted([k["thread_occupancy"] for k in kernels], weights),
        "bytes_in_flight_per_sm_log2": _weighted([_log2(k["in_flight"]) for k in kernels], weights),
        "max_threads_per_block": _max(k["threads"] for k in kernels),
        "min_blocks_log2": _min(_log2(k["blocks"]) for k in kernels),
        "max_waves": _max(k["waves"] for k in kernels),
        "min_wave_efficiency": _min(k["wave_efficiency"] for k in kernels),
        "min_sm_fill": _min(k["sm_fill"] for k in kernels),
        "min_occupancy": _min(k["occupancy"] for k in kernels),
        "min_occupancy_est": _min(k["occupancy_est"] for k in kernels),
        "min_bytes_in_flight_per_sm_log2": _min(_log2(k["in_flight"]) for k in kernels),
        "max_shared_bytes_per_block": _max(k["shared"] for k in kernels),
        "max_local_bytes_per_thread": _max(k["local"] for k in kernels),
        "max_registers_per_thread": _max(k["registers"] for k in kernels),
        "spill_bytes_log2": _log2(sum(k["spill"] for k in kernels)) if has_build else math.nan,
        "stack_bytes_per_thread": _max(k["stack"] for k in kernels) if has_build else math.nan,
        "unroll_max_step": unroll,
        "unroll_annotations": unroll_count,
    }
    if not launches:
        f = {name: math.nan for name in FEATURE_NAMES}
    return {name: float(f[name]) for name in FEATURE_NAMES}


def candidate_features(candidate, gpu, build=None, per_store: bool = False) -> dict[str, float]:
    """Features of one ``search_space.Candidate`` for target ``gpu`` (a GpuSpec or preset name).

    ``build`` (a ``search_space.BuildResult``) adds registers, occupancy with registers, stack and
    spills; without it (or when it failed) those are NaN. ``per_store`` appends MetaSchedule's
    PerStoreFeature summary (``ms_*``; see the module docstring).
    """
    if isinstance(gpu, str):
        from etune.search_space import gpu_spec

        gpu = gpu_spec(gpu)
    if build is not None and not getattr(build, "ok", True):
        build = None
    try:
        trace = candidate.trace
    except Exception:  # a candidate without a schedule (tests, records) has no trace
        trace = None
    features = launch_features(candidate.launches, candidate.workload, gpu, build, trace)
    if per_store:
        features.update(per_store_features(candidate, gpu))
    return features


def features_of(candidates: Sequence, gpu, builds: Sequence | None = None, per_store: bool = False) -> list[dict]:
    builds = list(builds) if builds is not None else [None] * len(candidates)
    return [candidate_features(c, gpu, b, per_store) for c, b in zip(candidates, builds)]


# -- features of a measured latency (power mode) ---------------------------------------------------
RATE_FEATURES: tuple[str, ...] = (
    "latency_log2_us",               # log2 of the latency in microseconds
    "latency_over_roofline",         # how far from the roofline the schedule runs
    "latency_over_est",
    "latency_over_bottleneck",
    # Work per second of each kind that costs energy, over the peaks: a tensor-core flop and a SIMT
    # operation cost very different energy, so they are not added up.
    "achieved_tensor_fraction",
    "achieved_simt_fraction",
    "achieved_bandwidth_fraction",   # global bytes per second over HBM bandwidth
    "compulsory_bandwidth_fraction", # the workload's minimum bytes per second: DRAM traffic's floor
    "l2_sector_bytes_per_s_log2",
    "shared_bytes_per_s_log2",
    "issued_instructions_per_s_log2",
    "warp_instructions_per_s_log2",
    "memory_instructions_per_s_log2",
    "launch_gap_fraction",           # time between kernels: the clocks are up but no SM holds a block
)


@dataclasses.dataclass(frozen=True)
class _Peaks:
    peak_fp16_tensor_flops: float = 989e12
    peak_fp32_flops: float = 67e12
    memory_bandwidth: float = 3.35e12


_REFERENCE_PEAKS = _Peaks()


def _unlog2(x: float) -> float:
    return 2.0 ** x - 1.0 if x is not None and math.isfinite(x) else math.nan


def rate_features(features: Mapping[str, float], latency_s: float, gpu=None) -> dict[str, float]:
    """What a measured (or predicted) latency says about a schedule: its achieved rates.

    Average power is idle power plus energy per operation times operations per second, so with the
    latency known the rates are the natural inputs of a power model (``CostModel(mode="power")``); with
    ``busy_sm_fraction`` and the resident warps (static features) they say how much of the chip is
    busy and how hard, and ``latency_over_est`` shows a clock slowed at the power cap.
    Fractions are of the target's peaks; without ``gpu``, of the H100 preset's (a constant scale, which
    trees do not care about).
    """
    gpu = gpu or _REFERENCE_PEAKS
    if latency_s is None or not math.isfinite(latency_s) or latency_s <= 0:
        return {name: math.nan for name in RATE_FEATURES}
    get = lambda name: features.get(name, math.nan)  # noqa: E731
    per_second = lambda amount: _log2(_unlog2(get(amount)) / latency_s)  # noqa: E731
    tc = _unlog2(get("tensor_core_flops_log2"))
    arith = _unlog2(get("arithmetic_ops_log2"))
    roofline, est = get("roofline_s"), get("est_time_s")
    return {
        "latency_log2_us": math.log2(latency_s * 1e6),
        "latency_over_roofline": latency_s / roofline if roofline and roofline > 0 else math.nan,
        "latency_over_est": latency_s / est if est and est > 0 else math.nan,
        "latency_over_bottleneck": latency_s / get("bottleneck_time_s") if get("bottleneck_time_s") > 0 else math.nan,
        "achieved_tensor_fraction": tc / latency_s / gpu.peak_fp16_tensor_flops,
        "achieved_simt_fraction": arith / latency_s / gpu.peak_fp32_flops,
        "achieved_bandwidth_fraction": _unlog2(get("global_bytes_log2")) / latency_s / gpu.memory_bandwidth,
        "compulsory_bandwidth_fraction": _unlog2(get("workload_min_bytes_log2")) / latency_s / gpu.memory_bandwidth,
        "l2_sector_bytes_per_s_log2": per_second("l2_sector_bytes_log2"),
        "shared_bytes_per_s_log2": per_second("shared_bytes_moved_log2"),
        "issued_instructions_per_s_log2": per_second("issued_instructions_log2"),
        "warp_instructions_per_s_log2": per_second("warp_instructions_log2"),
        "memory_instructions_per_s_log2": per_second("memory_instructions_log2"),
        "launch_gap_fraction": min(1.0, get("n_kernels") * KERNEL_LAUNCH_S / latency_s),
    }


# -- shape-relative features (what transfers across shapes of a family) ------------------------------
_PER_FLOP = ("flops_log2", "tensor_core_flops_log2", "arithmetic_ops_log2")
_PER_BYTE = ("global_load_bytes_log2", "global_store_bytes_log2", "global_bytes_log2", "shared_bytes_moved_log2",
             "l2_sector_bytes_log2", "global_load_instructions_log2", "global_store_instructions_log2",
             "memory_instructions_log2", "issued_instructions_log2", "warp_instructions_log2")
_PER_ROOFLINE = ("roofline_s", "est_time_s", "shared_time_s", "issue_time_s", "lsu_time_s", "bottleneck_time_s",
                 "memory_parallelism_time_s")


def relative_features(features: Mapping[str, float]) -> dict[str, float]:
    """The same names, with amounts that grow with the problem expressed per unit of the workload:
    work per workload FLOP, traffic and instructions per compulsory byte, times per workload roofline
    time, latency per roofline. Within one workload this only shifts features by constants (trees do
    not care); across shapes it keeps a model inside the range it was trained on."""
    out = dict(features)
    wl_flops = features.get("workload_flops_log2", math.nan)
    wl_bytes = features.get("workload_min_bytes_log2", math.nan)
    wl_time = features.get("workload_roofline_s", math.nan)
    for name in _PER_FLOP:
        if name in out:
            out[name] = out[name] - wl_flops
    for name in _PER_BYTE:
        if name in out:
            out[name] = out[name] - wl_bytes
    if wl_time and wl_time > 0:
        for name in _PER_ROOFLINE:
            if name in out:
                out[name] = out[name] / wl_time
        if "latency_log2_us" in out:
            out["latency_log2_us"] = out["latency_log2_us"] - math.log2(wl_time * 1e6)
    return out


# -- MetaSchedule per-store features (optional) -----------------------------------------------------
PER_STORE_LENGTH = 164


def per_store_features(candidate, gpu) -> dict[str, float]:
    """MetaSchedule's PerStoreFeature rows of the candidate, summed and maxed over buffer stores."""
    from tvm.s_tir import meta_schedule as ms

    context = ms.TuneContext(mod=candidate.workload.ir_module(), target=gpu.tvm_target(), num_threads=1)
    extractor = ms.feature_extractor.PerStoreFeature(extract_workload=False)
    measure = ms.MeasureCandidate(candidate.schedule, [])
    rows = extractor.extract_from(context, [measure])[0].numpy()
    if rows.size == 0:
        rows = np.zeros((1, PER_STORE_LENGTH))
    summed, maxed = rows.sum(axis=0), rows.max(axis=0)
    out = {f"ms_sum_{i}": float(v) for i, v in enumerate(summed)}
    out.update({f"ms_max_{i}": float(v) for i, v in enumerate(maxed)})
    return out


def to_matrix(features: Sequence[Mapping[str, float]], names: Sequence[str] | None = None) -> np.ndarray:
    """Rows of feature dicts as a float matrix in ``names`` order (default FEATURE_NAMES); a name a
    dict lacks (or None/inf) becomes NaN."""
    names = list(names if names is not None else FEATURE_NAMES)
    matrix = np.full((len(features), len(names)), np.nan, dtype=np.float64)
    for i, row in enumerate(features):
        for j, name in enumerate(names):
            value = row.get(name)
            if value is not None:
                matrix[i, j] = float(value)
    matrix[~np.isfinite(matrix)] = np.nan
    return matrix


def feature_names_of(features: Sequence[Mapping[str, float]]) -> list[str]:
    """The names present in any row: those of FEATURE_NAMES in its order, then any others (per-store
    features, hand-made ones) in a stable order."""
    present = {k for row in features for k in row}
    known = list(FEATURE_NAMES) + list(RATE_FEATURES)
    extra = sorted(present - set(known), key=_natural_key)
    return [n for n in known if n in present] + extra


def _natural_key(name: str):
    head, _, tail = name.rpartition("_")
    return (head, int(tail)) if tail.isdigit() else (name, -1)
