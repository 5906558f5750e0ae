"""Split-K design spaces for GEMV and skinny GEMM (M <= 4): a MetaSchedule rule whose every choice is
a sampling instruction, so TVM's replay, etune's mutation and crossover work on it unchanged.

Why: MetaSchedule's rules never split a reduction whose spatial extent is at least its reduction
extent, so every GEMV schedule they give streams the matrix with 2-byte loads from a few thousand
threads and is latency-bound. Here K is split across threadIdx.x (reduced with warp shuffles, plus
one shared-memory step beyond a warp) and, in the second design space, across blocks too
(blockIdx.y, reduced by a second kernel). Each thread keeps M x v fp32 partial sums for v consecutive columns, loads v halves of B per
row as one vector (up to 16 bytes) and ku halves of each row of A as one vector.

Choices (``sample_categorical``, candidates fitted to the shape so that vector loads never need a
predicate): ``v`` columns per thread (divisors of N up to 8), ``cg`` column groups per block
(threadIdx.y), ``kl`` threads over K, ``ku`` K steps per loop trip (divisors of K up to 8, unrolled),
``kb`` blocks over K, and the threads of the merge kernel. The fp32 accumulators stay scalar (no
vector wider than 16 bytes: VerifyGPUCode rejects float32x8), only the loads are vectors.
"""
from __future__ import annotations

from tvm.ir.utils import derived_object
from tvm.s_tir import Schedule
from tvm.s_tir.meta_schedule.schedule_rule import PyScheduleRule
from tvm.s_tir.schedule import SBlockRV

from .choices import uniform_choice

# Offered up to this M. Each weight feeds M fp32 FMAs on the SIMT pipes: on sim, split-K beats the
# tensor-core spaces at M = 4 (gemm:4,11008,4096: 40 us vs 60 us) and loses from M = 8 on
# (71 vs 66 us, 33 vs 24 mJ); there the tensor-core split-K (``splitk_tc``, offered from M = 2) wins.
MAX_M = 4
COLUMN_GROUPS = (1, 2, 4, 8, 16, 32)
K_LANES = (4, 8, 16, 32, 64, 128, 256)  # beyond a warp: shuffles, then one shared-memory step
K_BLOCKS = (2, 3, 4, 6, 8, 16)
MERGE_THREADS = (64, 128, 256, 512)


def applies(workload) -> bool:
    return workload.family == "gemm" and workload.params["M"] <= MAX_M


def _divisors_up_to(n: int, limit: int) -> list[int]:
    return [d for d in (1, 2, 4, 8) if d <= limit and n % d == 0]


def _gemm_blocks(sch: Schedule, block: SBlockRV):
    """(reduction block, its elementwise consumer or None) if ``block`` is etune's GEMM reduction."""
    stmt = sch.get(block)
    kinds = [int(iv.iter_type) for iv in stmt.iter_vars]
    if kinds != [0, 0, 2] or len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None
    consumers = sch.get_consumers(block)
    return block, (consumers[0] if len(consumers) == 1 else None)


def schedule_split_k(sch: Schedule, block: SBlockRV, epilogue: SBlockRV | None, shape, across_blocks: bool) -> None:
    """Split-K GEMV/skinny-GEMM schedule of ``block`` (C_acc[i, j] += A[i, k] * B[k, j])."""
    M, N, K = shape
    i, j, k = sch.get_loops(block)
    v = uniform_choice(sch, _divisors_up_to(N, 8))
    cg = uniform_choice(sch, COLUMN_GROUPS)
    kl = uniform_choice(sch, K_LANES)
    ku = uniform_choice(sch, _divisors_up_to(K, 8))
    jb, jt, jv = sch.split(j, [None, cg, v], preserve_unit_iters=True)
    if across_blocks:
        kb = uniform_choice(sch, K_BLOCKS)
        kbl, ko, kt, ki = sch.split(k, [kb, None, kl, ku], preserve_unit_iters=True)
        sch.reorder(kbl, jb, jt, kt, ko, ki, i, jv)
        # Partial sums per K block go to a global C_rf[kb, M, N]; a second kernel adds them up.
        partial = sch.rfactor(kbl, 0)
        kbl, jb, jt, kt, ko, ki, i, jv = sch.get_loops(partial)
        sch.bind(kbl, "blockIdx.y")
    else:
        ko, kt, ki = sch.split(k, [None, kl, ku], preserve_unit_iters=True)
        sch.reorder(jb, jt, kt, ko, ki, i, jv)
        partial = block
    # Per-lane partial sums in registers, then a warp-shuffle reduction over the lanes.
    lanes = sch.rfactor(kt, 0)
    loops = sch.get_loops(lanes)
    jb, jt, kt, ko, ki, i, jv = loops[-7:]
    sch.reverse_compute_at(partial, jt, preserve_unit_loops=True)
    write_loops = sch.get_loops(partial)
    if across_blocks:
        red, kb_unit, ri, rj = write_loops[3:]
        sch.reorder(kb_unit, ri, rj, red)
    else:
        red, ri, rj = write_loops[2:]
        sch.reorder(ri, rj, red)
    sch.bind(jb, "blockIdx.x")
    sch.bind(jt, "threadIdx.y")
    sch.bind(kt, "threadIdx.x")
    sch.bind(red, "threadIdx.x")
    if across_blocks:
        red_kb, mj0, mj1, mi, mj2 = sch.get_loops(block)
        sch.reorder(mi, mj0, mj1, mj2, red_kb)
        fused = sch.fuse(mi, mj0, mj1, mj2)
        threads = uniform_choice(sch, MERGE_THREADS)
        mb, mt = sch.split(fused, [None, threads], preserve_unit_iters=True)
        sch.bind(mb, "blockIdx.x")
        sch.bind(mt, "threadIdx.x")
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, mt, preserve_unit_loops=True)
            sch.set_scope(block, 0, "local")
    else:
        if epilogue is not None:
            sch.reverse_compute_at(epilogue, jt, preserve_unit_loops=True)
            sch.set_scope(block, 0, "local")
    # Vector loads: v halves of a row of B per K step, ku halves of each row of A per loop trip.
    b_local = sch.cache_read(lanes, 1, "local")
    sch.compute_at(b_local, ki, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(b_local)[-1])
    a_local = sch.cache_read(lanes, 0, "local")
    sch.compute_at(a_local, ko, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(a_local)[-1])
    for loop in (ki, i, jv):
        sch.unroll(loop)
    sch.decompose_reduction(lanes, ko)
    sch.set_scope(lanes, 0, "local")


@derived_object
class SplitKRule(PyScheduleRule):
    """Offers two design spaces for a GEMM reduction with M <= MAX_M: split-K within a block, and split-K
    within and across blocks (two kernels). Other blocks are left to the schedule as it is."""

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch: Schedule, block: SBlockRV) -> list[Schedule]:
        found = _gemm_blocks(sch, block)
        if found is None:
            return [sch]
        reduction, epilogue = found
        stmt = sch.get(reduction)
        shape = [int(iv.dom.extent) for iv in stmt.iter_vars]
        if shape[0] > MAX_M:
            return [sch]
        spaces = []
        for across_blocks in (False, True):
            copy = sch.copy()
            copy.seed(sch.fork_seed())
            schedule_split_k(copy, reduction, epilogue, shape, across_blocks)
            spaces.append(copy)
        return spaces

    def clone(self):
        return SplitKRule()
