"""The ``sim`` backend: an analytic GPU that turns a schedule's kernels into latency and energy.

docs/design.md, "The simulated backend": CI and most development machines have no GPU, so the tuning loop
runs against this model. It is a pure function of the candidate's lowered kernels (``KernelLaunch``:
grid, block, on-chip memory and the dynamic traffic totals of search_space.analysis), the workload
(compulsory bytes) and a ``GpuSpec``; nothing is built or run. Its numbers are sim figures, never
hardware results: every result and device record carries the backend name ``sim``.

The model, per kernel of a module (kernels run one after another, each after a launch gap):

* occupancy: blocks per SM limited by threads (2048/SM), registers (estimated from the per-thread
  local arrays, never from ptxas, so the result does not depend on a build), shared memory and the
  32-block limit. What does not fit spills: that share of every access to the local arrays and
  tensor-core fragments becomes 4-byte L1/L2 traffic. Blocks are dealt to SMs round-robin and run in rounds of that many (wave
  quantisation): 133 blocks of one-per-SM cost two rounds on the busiest SM.
* SM time of a block: tensor-core flops, SIMT operations, shared bytes, issued warp instructions and
  L1<->L2 bytes against per-SM rates, combined by a soft maximum (they overlap, not perfectly), and
  slowed when few independent instruction streams (resident warps, times the independent
  accumulator tiles of tensor-core warps, up to 2) are there to hide latency. Idle lanes of partial warps cost their slots.
* memory time: DRAM bytes (the compulsory bytes of the workload plus re-reads and intermediates the
  50 MB L2 cannot keep) against HBM bandwidth; all global traffic (in 32-byte sectors) against L2
  bandwidth; and Little's law: a thread keeps only a few accesses in flight, so a block streams
  (threads x bytes per access x accesses in flight) per memory latency. Scalar loads at low
  occupancy cannot fill the memory pipe; vectorised ones can.
* power: idle power all the time (the NVML counter includes it), an uncore share while kernels run,
  a per-SM share while an SM holds blocks (growing with its resident warps, as in AccelWattch's
  occupancy-aware static power), and dynamic energy per tensor-core flop, SIMT operation, warp
  instruction, global access, L2 byte, DRAM byte and shared byte. When the average power of a call
  would exceed the board's cap, the clock drops: kernel time stretches until power equals the cap,
  and dynamic energy per operation falls a little with the lower voltage.

Energy is therefore not a function of latency. Equally fast schedules differ in energy when they
spread the same memory parallelism over fewer SMs, issue fewer instructions (vector accesses), move
fewer L2 or shared bytes, or do less redundant arithmetic; power-capped schedules pay for their
dynamic energy in time as well.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import statistics
import time
from typing import Sequence

from .backend import Backend, DeviceInfo, MeasureResult, Progress, check_kind
from .stats import coefficient_of_variation

__all__ = ["KernelOutcome", "SimBackend", "SimOutcome", "SimParams", "VENDOR_KERNELS", "VendorKernel",
           "params_for", "simulate", "vendor_outcome"]


@dataclasses.dataclass(frozen=True)
class SimParams:
    """Microarchitecture and energy constants the GpuSpec does not carry (values for an H100 SXM).

    Rates the GpuSpec has (SMs, tensor and fp32 peaks, HBM bandwidth, L2 size, power cap, idle power)
    come from it. The rest come from public microbenchmarks where there are some, else they are
    round numbers chosen so that sampled schedules and the vendor kernels land near the H100 table
    of docs/design.md (latency within ~1-2.5x of the vendor, big GEMM at the cap, softmax ~500 W, GEMV
    ~250 W).
    """

    # Sustained SM clock under load (H100 SXM boosts to 1.98 GHz, settles near 1.75 GHz when busy).
    sm_clock_hz: float = 1.755e9
    # TVM emits wmma (mma.sync). On Hopper only wgmma reaches the dense peak; mma.sync
    # microbenchmarks reach ~60-65 % of it.
    tensor_core_efficiency: float = 0.62
    # wgmma (Hopper's asynchronous warpgroup mma, operands straight from shared memory): FlashAttention-3
    # sustains 740 TFLOP/s of fp16 with it (75 % of the peak) over a whole attention kernel, softmax
    # included, so the pipe runs at least that fast.
    wgmma_efficiency: float = 0.75
    # SIMT pipes: dependent chains and address arithmetic keep real kernels below the fp32 peak.
    simt_efficiency: float = 0.85
    # Independent instruction streams per SM for full latency hiding (4 schedulers x 4 warps of one
    # chain each); with fewer, SM-side throughput falls as (warps x ILP / 16) ** 0.6, where a
    # tensor-core warp's ILP is its independent accumulator tiles, up to ``max_warp_ilp``
    # (KernelLaunch.warp_ilp; 1 gives the model before 2026-12-01, which counted warps only).
    warps_for_full_issue: float = 16.0
    latency_hiding_exponent: float = 0.6
    max_warp_ilp: float = 2.0  # search_space.analysis.MAX_WARP_ILP, which says why (sim loads without TVM)
    # Per-SM pipes: 32 banks x 4 B of shared memory, 4 schedulers issuing one warp instruction each,
    # 64 B/clk between L1 and L2.
    shared_bytes_per_clk: float = 128.0
    warp_instructions_per_clk: float = 4.0
    lsu_bytes_per_clk: float = 64.0
    # L2 and DRAM move 32-byte sectors.
    sector_bytes: float = 32.0
    # Achievable fraction of HBM bandwidth (STREAM-like copies reach ~90 % on an H100).
    dram_efficiency: float = 0.9
    # L2 -> SM bandwidth: ~5.5-7 TB/s measured on an H100 PCIe (114 SMs, lower clock); the SXM has
    # more SMs and a higher clock.
    l2_bandwidth: float = 8.0e12
    # Part of the 50 MB L2 that holds reusable data (two partitions; lines get duplicated across them).
    l2_effective_fraction: float = 0.75
    # Re-reads that miss although the data fits (conflicts, partition crossings); and for re-reads
    # within a kernel, the share of the overflow that misses when the co-resident blocks' data
    # outgrows L2 (blocks of a wave share most of what they read, so most re-reads still hit).
    l2_miss_floor: float = 0.03
    l2_miss_overflow: float = 0.2
    # Load-to-use latencies (Hopper microbenchmarks: L2 ~260 cycles, HBM ~500 ns) and the
    # independent accesses a thread keeps in flight (unrolled loops; fits the vendor table best).
    l2_latency_s: float = 160e-9
    dram_latency_s: float = 500e-9
    loads_in_flight_per_thread: float = 3.0
    # Registers: a base for indices, addresses and loop counters, plus one per 4 B of local arrays.
    register_base: int = 32
    max_registers_per_thread: int = 255
    # Shared memory the driver reserves per resident block on sm_80 and later.
    shared_reserved_per_block: int = 1024
    # Soft maximum of overlapping limits: ~max, and two equal limits cost 19 % more than one.
    overlap_exponent: float = 4.0
    # Wall time per kernel launch when calls run back to back (stream launch latency plus TVM's
    # packed-function call).
    launch_gap_s: float = 2.0e-6

    # Power beyond idle (watts): uncore (L2, NoC, memory controllers and PHYs with clocks up) while a
    # call runs, and per SM while it holds blocks: clock tree, schedulers and leakage at load voltage,
    # plus a little per resident warp (AccelWattch models static power by active SMs and occupancy).
    # 40 W + 132 x (1.0 + 0.008 x 40 warps) W ~ 215 W, which with memory traffic puts a memory-bound
    # kernel at ~500 W, like the vendor softmax.
    uncore_active_w: float = 40.0
    sm_active_w: float = 1.0
    sm_warp_w: float = 0.008
    # Dynamic energy (joules): tensor-core flop with operand delivery (989 TFLOP/s at ~0.45 pJ is
    # ~450 W: a big GEMM hits the 700 W cap); SIMT lane op; warp instruction (fetch, decode,
    # scheduling, operand collection: ~200 pJ); thread-level global access (address coalescing, L1
    # tags); L2 byte (crossbar and SRAM, ~2.5 pJ/bit); DRAM byte (HBM3 with PHY and controller,
    # ~5.6 pJ/bit); shared-memory byte.
    tensor_flop_j: float = 0.45e-12
    simt_op_j: float = 3.0e-12
    warp_instruction_j: float = 200e-12
    global_access_j: float = 15.0e-12
    l2_byte_j: float = 20.0e-12
    dram_byte_j: float = 45.0e-12
    shared_byte_j: float = 2.5e-12
    # Under the cap the clock runs at 1/s of nominal and dynamic energy per op is (1 - beta + beta/s)
    # of nominal: voltage falls less than frequency near the top of the V/f curve.
    throttle_voltage_beta: float = 0.5


# Per-arch clocks of the known presets; anything else keeps the H100 constants.
_CLOCKS = {"sm_90": 1.755e9, "sm_80": 1.41e9}


def params_for(gpu) -> SimParams:
    return SimParams(sm_clock_hz=_CLOCKS.get(gpu.arch, SimParams.sm_clock_hz))


def _gpu(gpu):
    if isinstance(gpu, str):
        from etune.search_space.targets import gpu_spec

        return gpu_spec(gpu)
    return gpu


@dataclasses.dataclass(frozen=True)
class KernelOutcome:
    name: str
    seconds: float  # kernel time before any power throttling, without the launch gap
    registers: int
    spill_bytes_per_thread: int
    blocks_per_sm: int
    occupancy: float  # resident warps / 64 on the busiest SM
    rounds: int  # rounds of blocks on the busiest SM
    active_sms: int
    limiter: str  # the largest time component
    times: dict  # seconds per component: tensor, simt, shared, issue, lsu (SM), dram, l2, latency
    dram_bytes: float
    l2_bytes: float
    energy_j: dict  # dynamic and active energy by component (no idle), before throttling


@dataclasses.dataclass(frozen=True)
class SimOutcome:
    """One call of a module on the simulated GPU, noise-free. Energy includes idle power (like NVML)."""

    latency_s: float
    energy_j: float
    avg_power_w: float
    breakdown: dict
    kernels: tuple[KernelOutcome, ...] = ()

    @property
    def energy_above_idle_j(self) -> float:
        return self.breakdown["energy_above_idle_j"]


def _soft_max(values, p: float) -> float:
    values = [v for v in values if v > 0.0]
    if not values:
        return 0.0
    top = max(values)
    return top * sum((v / top) ** p for v in values) ** (1.0 / p)


def _blocks_per_sm(k, registers: int, gpu, params: SimParams) -> int:
    warps = math.ceil(k.threads_per_block / gpu.warp_size)
    limits = [gpu.max_blocks_per_sm, gpu.max_threads_per_sm // (warps * gpu.warp_size),
              gpu.registers_per_sm // (registers * warps * gpu.warp_size)]
    if k.shared_bytes > 0:
        limits.append(gpu.shared_memory_per_sm // (k.shared_bytes + params.shared_reserved_per_block))
    return max(1, min(limits))


def _occupancy(k, gpu, params: SimParams) -> tuple[int, int, int]:
    """(registers per thread, spilled bytes per thread, co-resident blocks per SM)."""
    from etune.search_space.analysis import estimate_registers  # the estimate the features use too

    registers, spill = estimate_registers(k.local_bytes_per_thread, k.threads_per_block, gpu,
                                          params.register_base, params.max_registers_per_thread)
    return registers, spill, _blocks_per_sm(k, registers, gpu, params)


def _dram_plan(launches, occupancies, workload, gpu, params: SimParams) -> list[float]:
    """DRAM bytes of each kernel of one call.

    Inputs are read from DRAM once (the compulsory bytes of the workload) and outputs written once.
    Loads beyond that are re-reads: of data an earlier kernel touched (reuse distance: everything
    touched in between, so they miss as the module's footprint outgrows L2), or of data this
    kernel touched itself (reuse distance: what the co-resident blocks touch, and blocks of a wave
    share much of it, so only a part of the overflow misses). Intermediate buffers that do not fit
    in L2 are written back.
    """
    loads = [k.traffic.global_load_bytes for k in launches]
    stores = [k.traffic.global_store_bytes for k in launches]
    if workload is None:  # a bare kernel: every byte it touches is compulsory (a streaming kernel)
        in_bytes, out_bytes = sum(loads), sum(stores)
    else:
        out_bytes = float(sum(t.nbytes for t in workload.outputs))
        in_bytes = max(0.0, float(workload.min_bytes) - out_bytes)
    intermediates = max(0.0, sum(stores) - out_bytes)
    l2 = params.l2_effective_fraction * gpu.l2_bytes
    footprint = in_bytes + out_bytes + intermediates

    def overflow(working_set: float) -> float:
        return max(0.0, 1.0 - l2 / working_set) if working_set > 0 else 0.0

    cross_miss = params.l2_miss_floor + (1.0 - params.l2_miss_floor) * overflow(footprint)
    written_back = (out_bytes + intermediates * overflow(footprint)) / sum(stores) if sum(stores) > 0 else 0.0
    seen = written = 0.0
    plan = []
    for k, occupancy, load, store in zip(launches, occupancies, loads, stores):
        first = min(load, max(0.0, in_bytes - seen))
        cross = min(load - first, seen + written)
        within = load - first - cross
        blocks = max(1, k.blocks)
        resident = min(blocks, occupancy[2] * gpu.sm_count)
        working_set = min(footprint, resident * (load + store) / blocks)
        within_miss = params.l2_miss_floor + params.l2_miss_overflow * overflow(working_set)
        plan.append(first + cross * cross_miss + within * within_miss + store * written_back)
        seen += first
        written += store
    if seen < in_bytes and sum(loads) > 0:  # traffic counted fewer loads than inputs: still read them once
        plan = [d + (in_bytes - seen) * load / sum(loads) for d, load in zip(plan, loads)]
    return plan


def _global_bytes(k) -> float:
    return k.traffic.global_load_bytes + k.traffic.global_store_bytes


def _kernel(k, occupancy, dram_bytes: float, gpu, params: SimParams) -> KernelOutcome:
    """Time and (un-throttled, idle-free) energy of one kernel that moves ``dram_bytes`` from/to HBM."""
    from etune.search_space.analysis import spilled_access_bytes  # the features' estimate too

    t = k.traffic
    clock = params.sm_clock_hz
    sms = gpu.sm_count
    blocks = max(1, k.blocks)
    warps = math.ceil(k.threads_per_block / gpu.warp_size)
    # Threads a warp instruction works for: a block of 4 threads still issues whole warps.
    lanes = k.threads_per_block / warps
    warp_waste = gpu.warp_size / lanes
    registers, spill, per_sm = occupancy

    # Global accesses (thread level) and bytes; spills are 4-byte accesses that stop in L1/L2.
    spill_bytes = spilled_access_bytes(k, spill)
    accesses = t.global_load_instructions + t.global_store_instructions + spill_bytes / 4.0
    requested = _global_bytes(k) + spill_bytes
    bytes_per_access = requested / accesses if accesses > 0 else 0.0
    # L2 moves 32-byte sectors: a warp access narrower than a sector (few lanes, small elements)
    # still costs a whole one.
    sector_waste = max(1.0, params.sector_bytes / (lanes * bytes_per_access)) if bytes_per_access > 0 else 1.0
    l2_bytes = requested * sector_waste
    shared_bytes = t.shared_load_bytes + t.shared_store_bytes
    # Thread instructions: arithmetic, HMMA instructions (two per 16x16x16 wmma mma_sync, one per PTX
    # mma), shared accesses (one per ldmatrix, else one per 4 bytes), global accesses, and one
    # address/loop instruction per memory access.
    memory_accesses = accesses + t.shared_instructions
    thread_instructions = t.arithmetic_ops + t.hmma_instructions + 2.0 * memory_accesses
    warp_instructions = thread_instructions / lanes

    # -- SM side: one block's demands at full per-SM rates; idle lanes of partial warps still
    # occupy their pipe slot -------------------------------------------------------------------
    per_block = [
        (t.tensor_core_flops - t.wgmma_flops) / (gpu.peak_fp16_tensor_flops / sms * params.tensor_core_efficiency)
        + t.wgmma_flops / (gpu.peak_fp16_tensor_flops / sms * params.wgmma_efficiency),
        t.arithmetic_ops * warp_waste / (gpu.peak_fp32_flops / sms * params.simt_efficiency),
        shared_bytes * warp_waste / (params.shared_bytes_per_clk * clock),
        warp_instructions / (params.warp_instructions_per_clk * clock),
        l2_bytes / (params.lsu_bytes_per_clk * clock),
    ]
    per_block = [v / blocks for v in per_block]
    block_work = _soft_max(per_block, params.overlap_exponent)

    def sm_time(n: int) -> float:
        """Time an SM needs for n blocks: rounds of up to per_sm co-resident blocks."""
        total = 0.0
        while n > 0:
            resident = min(n, per_sm)
            hiding = min(1.0, resident * warps * k.warp_ilp(params.max_warp_ilp) / params.warps_for_full_issue) ** params.latency_hiding_exponent
            total += resident * block_work / hiding
            n -= resident
        return total

    base, extra = divmod(blocks, sms)
    busiest = base + (1 if extra else 0)
    t_sm = sm_time(busiest)
    sm_load = extra * sm_time(base + 1) + (sms - extra) * sm_time(base)
    rounds = math.ceil(busiest / per_sm)

    # -- memory side -------------------------------------------------------------------------
    t_dram = dram_bytes / (gpu.memory_bandwidth * params.dram_efficiency)
    t_l2 = l2_bytes / params.l2_bandwidth
    # Little's law per block: each thread keeps a few accesses on the way, so a block streams
    # (threads x bytes per access x loads in flight) per memory latency; the blocks of a round
    # stream side by side and rounds follow one another.
    if bytes_per_access > 0:
        miss = min(1.0, dram_bytes / l2_bytes)
        latency = miss * params.dram_latency_s + (1.0 - miss) * params.l2_latency_s
        # cp.async copies go to shared memory without holding registers, so a software pipeline
        # keeps what its stages have issued on the way (analysis: async_copy_bytes_in_flight).
        per_thread = max(bytes_per_access * params.loads_in_flight_per_thread, k.async_copy_bytes_in_flight)
        in_flight = k.threads_per_block * per_thread
        t_latency = rounds * (requested / blocks) * latency / in_flight
    else:
        t_latency = 0.0

    scale = t_sm / block_work if block_work > 0 else 0.0
    times = {name: value * scale for name, value in zip(("tensor", "simt", "shared", "issue", "lsu"), per_block)}
    times.update(dram=t_dram, l2=t_l2, latency=t_latency)
    seconds = max(_soft_max([t_sm, t_dram, t_l2, t_latency], params.overlap_exponent), 1e-9)

    # SM-seconds with blocks resident: SMs with fewer blocks finish (and clock-gate) earlier.
    busy_sm_seconds = seconds * sm_load / t_sm if t_sm > 0 else seconds * min(blocks, sms)
    resident_warps = busiest / rounds * warps  # mean over the busiest SM's rounds
    energy = {
        "uncore": params.uncore_active_w * seconds,
        "sm_active": busy_sm_seconds * (params.sm_active_w + params.sm_warp_w * resident_warps * lanes / gpu.warp_size),
        "tensor": t.tensor_core_flops * params.tensor_flop_j,
        "simt": t.arithmetic_ops * params.simt_op_j,
        "instructions": warp_instructions * params.warp_instruction_j + accesses * params.global_access_j,
        "l2": l2_bytes * params.l2_byte_j,
        "dram": dram_bytes * params.dram_byte_j,
        "shared": shared_bytes * params.shared_byte_j,
    }
    return KernelOutcome(
        name=k.name, seconds=seconds, registers=registers, spill_bytes_per_thread=spill, blocks_per_sm=per_sm,
        occupancy=min(busiest, per_sm) * warps * gpu.warp_size / gpu.max_threads_per_sm, rounds=rounds,
        active_sms=min(blocks, sms), limiter=max(times, key=times.get), times=times, dram_bytes=dram_bytes,
        l2_bytes=l2_bytes, energy_j=energy,
    )


def simulate(launches: Sequence, workload=None, gpu="h100", params: SimParams | None = None) -> SimOutcome:
    """Latency and energy of one call of a module whose kernels are ``launches`` (noise-free)."""
    gpu = _gpu(gpu)
    params = params or params_for(gpu)
    if not launches:
        raise ValueError("no kernel launches to simulate")

    occupancies = [_occupancy(k, gpu, params) for k in launches]
    dram = _dram_plan(launches, occupancies, workload, gpu, params)
    kernels = [_kernel(k, o, d, gpu, params) for k, o, d in zip(launches, occupancies, dram)]

    # -- the call: kernels back to back, each after a launch gap; then the power cap -------------
    kernel_s = sum(k.seconds for k in kernels)
    gaps_s = params.launch_gap_s * len(kernels)
    static_names = ("uncore", "sm_active")
    components = {name: sum(k.energy_j[name] for k in kernels) for name in kernels[0].energy_j}
    static_j = sum(components[n] for n in static_names)
    dynamic_j = sum(v for n, v in components.items() if n not in static_names)
    # During the launch gaps the clocks stay up but no SM holds a block.
    gap_j = params.uncore_active_w * gaps_s
    power = gpu.idle_w + (static_j + dynamic_j + gap_j) / (kernel_s + gaps_s)
    stretch = 1.0
    dynamic_scale = 1.0
    if power > gpu.tdp_w:
        # Solve cap * (T s + G) = idle * (T s + G) + static * s + gap + dynamic * (1 - beta + beta / s)
        # for the clock stretch s of the kernels (static energy is power x time, so it stretches).
        beta = params.throttle_voltage_beta
        headroom = gpu.tdp_w - gpu.idle_w
        a = headroom * kernel_s - static_j
        b = dynamic_j * (1.0 - beta) + gap_j - headroom * gaps_s
        c = dynamic_j * beta
        if a <= 0:  # static power alone over the cap cannot happen with sane constants
            raise ValueError("sim constants put static power above the power cap")
        stretch = max(1.0, (b + math.sqrt(b * b + 4 * a * c)) / (2 * a))
        dynamic_scale = 1.0 - beta + beta / stretch
    latency = kernel_s * stretch + gaps_s
    above_idle = static_j * stretch + gap_j + dynamic_j * dynamic_scale
    energy = gpu.idle_w * latency + above_idle
    scaled = {n: v * (stretch if n in static_names else dynamic_scale) for n, v in components.items()}
    scaled["uncore"] += gap_j
    breakdown = {
        "kernels": len(kernels),
        "kernel_s": kernel_s * stretch,
        "launch_gaps_s": gaps_s,
        "throttle_stretch": stretch,
        "dram_bytes": sum(dram),
        "l2_bytes": sum(k.l2_bytes for k in kernels),
        "energy_idle_j": gpu.idle_w * latency,
        "energy_above_idle_j": above_idle,
        "energy_by_component_j": scaled,
        "limiters": [k.limiter for k in kernels],
        "occupancy": [round(k.occupancy, 3) for k in kernels],
    }
    return SimOutcome(latency, energy, energy / latency, breakdown, tuple(kernels))


# -- vendor kernels ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VendorKernel:
    """An idealised vendor kernel: a roofline at fixed efficiencies (a sim figure, not a measurement).

    The efficiencies are fitted to the H100 table of docs/design.md (cuBLAS, torch.softmax, SDPA flash),
    so they already include the clock those kernels ran at under the cap.
    """

    name: str  # what it stands for: torch.matmul | torch.softmax | sdpa
    compute_efficiency: float  # of the fp16 tensor-core peak (SIMT fp32 peak for softmax)
    memory_efficiency: float  # of HBM bandwidth, for the workload's compulsory bytes
    tensor_cores: bool
    # L2 bytes per flop of a tiled kernel: a 128x256 output tile reads (128 + 256) x 2 B per k step for
    # 2 x 128 x 256 flops, i.e. ~0.0117 B/flop (flash attention's 128-row tiles are alike).
    l2_bytes_per_flop: float


# gemm 4096^3: 137 GFLOP in 213 us ~ 66 % of 989 TFLOP/s; gemm 16x11008x4096 and GEMV stream their
# matrix at ~55-80 % of HBM bandwidth; softmax moves its compulsory bytes at ~40-55 %; SDPA reaches
# ~40-55 % of the tensor peak in prefill and ~90 % of HBM bandwidth in decode.
VENDOR_KERNELS = {
    "gemm": VendorKernel("torch.matmul", 0.66, 0.66, True, 0.0117),
    "softmax": VendorKernel("torch.softmax", 0.5, 0.45, False, 0.0),
    "attention": VendorKernel("sdpa", 0.5, 0.85, True, 0.0117),
}


def vendor_outcome(workload, gpu="h100", params: SimParams | None = None) -> SimOutcome:
    """Latency and energy of the idealised vendor kernel for ``workload`` on the simulated GPU.

    Latency is the roofline at the family's efficiencies plus one launch gap. Power uses the same
    constants as candidates, with every SM busy at full occupancy and 16-byte accesses; it is
    clamped at the cap without stretching time, because the efficiencies were fitted to latencies
    measured under the cap.
    """
    gpu = _gpu(gpu)
    params = params or params_for(gpu)
    vendor = VENDOR_KERNELS.get(workload.family)
    if vendor is None:
        raise ValueError(f"no vendor kernel for family {workload.family!r}")
    peak = gpu.peak_fp16_tensor_flops if vendor.tensor_cores else gpu.peak_fp32_flops
    compute_s = workload.flops / (peak * vendor.compute_efficiency)
    memory_s = workload.min_bytes / (gpu.memory_bandwidth * vendor.memory_efficiency)
    kernel_s = max(compute_s, memory_s)
    latency = kernel_s + params.launch_gap_s
    l2_bytes = max(float(workload.min_bytes), workload.flops * vendor.l2_bytes_per_flop)
    full_occupancy_warps = gpu.max_threads_per_sm / gpu.warp_size
    components = {
        "uncore": params.uncore_active_w * latency,
        "sm_active": gpu.sm_count * kernel_s * (params.sm_active_w + params.sm_warp_w * full_occupancy_warps),
        "tensor": workload.flops * params.tensor_flop_j if vendor.tensor_cores else 0.0,
        "simt": 0.0 if vendor.tensor_cores else workload.flops * params.simt_op_j,
        "instructions": l2_bytes / 16.0 * (params.global_access_j + 2.0 * params.warp_instruction_j / gpu.warp_size),
        "l2": l2_bytes * params.l2_byte_j,
        "dram": workload.min_bytes * params.dram_byte_j,
        "shared": 0.0,
    }
    above_idle = min(sum(components.values()), (gpu.tdp_w - gpu.idle_w) * latency)
    energy = gpu.idle_w * latency + above_idle
    breakdown = {
        "vendor": vendor.name,
        "limiter": "compute" if compute_s >= memory_s else "memory",
        "compute_efficiency": vendor.compute_efficiency,
        "memory_efficiency": vendor.memory_efficiency,
        "capped": above_idle < sum(components.values()),
        "energy_idle_j": gpu.idle_w * latency,
        "energy_above_idle_j": above_idle,
        "energy_by_component_j": components,
    }
    return SimOutcome(latency, energy, energy / latency, breakdown)


# -- the backend ------------------------------------------------------------------------------------
# Repeats of the latency protocol, and windows of the energy protocol with what they would cost on
# hardware (docs/design.md: a warm-up, then windows of >= 1 s that start and end on counter steps ~100 ms
# apart, so ~1.05 s each on average).
LATENCY_REPEATS = 20
ENERGY_WINDOWS = 3
ENERGY_WARMUP_S = 0.2
ENERGY_WINDOW_S = 1.05
# A latency measurement's GPU time on hardware: nvml's warm-up and 1 ms per repeat.
LATENCY_COST_S = 0.05 + LATENCY_REPEATS * 1e-3


class SimBackend(Backend):
    """Measurements from the analytic GPU, with small seeded noise.

    Noise is lognormal (sigma ``noise``) per repeat or window and deterministic given the backend
    seed, the candidate's structural hash, the kind, and how many times this instance has measured
    that hash for that kind: a run is reproducible, and measuring again gives a slightly different
    figure, as on hardware.
    """

    name = "sim"

    def __init__(self, gpu="h100", seed: int = 0, noise: float = 0.005, params: SimParams | None = None,
                 wall_time_scale: float = 0.0):
        """``wall_time_scale``: each measurement sleeps for that fraction of the GPU time it would take
        on hardware (``simulated_cost_s``), so parallel measurement (tuner.cluster) shows its speed-up;
        0 (the default) answers at once."""
        if noise < 0:
            raise ValueError("noise must be >= 0")
        if wall_time_scale < 0:
            raise ValueError("wall_time_scale must be >= 0")
        self.wall_time_scale = float(wall_time_scale)
        self.gpu = _gpu(gpu)
        self.seed = int(seed)
        self.noise = float(noise)
        self.params = params or params_for(self.gpu)
        self._counts: dict[tuple[str, str], int] = {}

    def device(self) -> DeviceInfo:
        gpu = self.gpu
        details = {
            "note": "analytic model (measurements.sim): sim figures, not hardware results",
            "sm_count": gpu.sm_count,
            "peak_fp16_tensor_flops": gpu.peak_fp16_tensor_flops,
            "peak_fp32_flops": gpu.peak_fp32_flops,
            "memory_bandwidth": gpu.memory_bandwidth,
            "l2_bytes": gpu.l2_bytes,
            "power_limit_w": gpu.tdp_w,
            "idle_power_w": gpu.idle_w,
            "seed": self.seed,
            "noise": self.noise,
            "params": dataclasses.asdict(self.params),
        }
        return DeviceInfo("sim", "sim:" + gpu.name, None, details)

    # -- noise ----------------------------------------------------------------------------------
    def _rng(self, key: str, kind: str) -> random.Random:
        count = self._counts.get((key, kind), 0)
        self._counts[(key, kind)] = count + 1
        digest = hashlib.blake2b(f"{self.seed}|{key}|{kind}|{count}".encode(), digest_size=8).digest()
        return random.Random(int.from_bytes(digest, "little"))

    def _samples(self, rng: random.Random, value: float, n: int) -> list[float]:
        return [value * rng.lognormvariate(0.0, self.noise) if self.noise > 0 else value for _ in range(n)]

    def _result(self, key: str, hash_: str | None, kind: str, outcome: SimOutcome, details: dict) -> MeasureResult:
        started = time.time()
        rng = self._rng(key, kind)
        stretch = outcome.breakdown.get("throttle_stretch", 1.0)
        clock_mhz = self.params.sm_clock_hz / 1e6 / stretch
        if kind == "latency":
            samples = self._samples(rng, outcome.latency_s, LATENCY_REPEATS)
            median = statistics.median(samples)
            details = {"min_s": min(samples), "median_s": median, "repeats": LATENCY_REPEATS, "checked": False,
                       "note": "sim runs no code", "simulated_cost_s": LATENCY_COST_S, **details}
            self._take_wall_time(LATENCY_COST_S)
            return MeasureResult(hash_, kind, True, median, coefficient_of_variation(samples), None, details, clock_mhz, None,
                                 started, time.time())
        # One energy sample per window; the window's latency wobbles independently.
        energies = self._samples(rng, outcome.energy_j, ENERGY_WINDOWS)
        latencies = self._samples(rng, outcome.latency_s, ENERGY_WINDOWS)
        energy = statistics.fmean(energies)
        latency = statistics.fmean(latencies)
        idle = self.gpu.idle_w
        details = {
            "latency_s": latency,
            "avg_power_w": energy / latency,
            "idle_power_w": idle,
            "energy_above_idle_j": energy - idle * latency,
            "windows": ENERGY_WINDOWS,
            "converged": True,
            "method": "sim",
            "simulated_cost_s": ENERGY_WARMUP_S + ENERGY_WINDOWS * ENERGY_WINDOW_S,
            **details,
        }
        self._take_wall_time(details["simulated_cost_s"])
        return MeasureResult(hash_, kind, True, energy, coefficient_of_variation(energies), None, details, clock_mhz, None,
                             started, time.time())

    def _take_wall_time(self, simulated_cost_s: float) -> None:
        if self.wall_time_scale > 0:
            time.sleep(simulated_cost_s * self.wall_time_scale)

    # -- Backend --------------------------------------------------------------------------------
    def outcome(self, candidate) -> SimOutcome:
        """The noise-free outcome of a candidate (cheap, so not cached)."""
        return simulate(candidate.launches, candidate.workload, self.gpu, self.params)

    def measure(self, candidates: Sequence, kind: str, builds: Sequence | None = None,
                progress: Progress | None = None) -> list[MeasureResult]:
        check_kind(kind)
        if builds is not None and len(builds) != len(candidates):
            raise ValueError(f"{len(candidates)} candidates but {len(builds)} builds")
        results = []
        for index, candidate in enumerate(candidates):
            result = self._measure_one(candidate, kind, builds[index] if builds is not None else None)
            results.append(result)
            if progress is not None:
                progress(result)
        return results

    def _measure_one(self, candidate, kind: str, build) -> MeasureResult:
        hash_ = getattr(candidate, "structural_hash", None)
        if build is not None:
            if not build.ok:
                reason = build.error or "no reason given"
                return MeasureResult(hash_, kind, False, error=f"not built: {build.status}: {reason}")
            if build.structural_hash != hash_:
                return MeasureResult(hash_, kind, False, error=f"not built: the build is of {build.structural_hash}")
        if not getattr(candidate, "launches", None):
            return MeasureResult(hash_, kind, False, error="nothing to simulate: the candidate has no kernel launches")
        try:
            outcome = self.outcome(candidate)
        except (ValueError, ZeroDivisionError, OverflowError) as exc:
            return MeasureResult(hash_, kind, False, error=f"sim failed: {exc}")
        extra = {"limiters": outcome.breakdown["limiters"], "throttle_stretch": outcome.breakdown["throttle_stretch"]}
        return self._result(hash_, hash_, kind, outcome, extra)

    def measure_vendor(self, workload, kind: str) -> MeasureResult:
        check_kind(kind)
        try:
            outcome = vendor_outcome(workload, self.gpu, self.params)
        except ValueError as exc:
            return MeasureResult(None, kind, False, error=str(exc))
        extra = {"vendor": outcome.breakdown["vendor"], "vendor_model": "roofline at fitted efficiencies (sim)",
                 "limiter": outcome.breakdown["limiter"]}
        return self._result("vendor:" + workload.spec, None, kind, outcome, extra)
