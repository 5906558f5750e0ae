"""Hopper's Tensor Memory Accelerator (TMA), mbarriers and thread-block clusters from TVM 0.27 TIRx,
and the checks a lent GPU runs on them before a TMA GEMM template is built on them.

``gemm_wgmma`` moves its tiles with cp.async (every thread copies 16-byte chunks) and reads each
tile from L2 once per block. The way past that (docs/sim_results.md, issue 16's big GEMMs) is TMA:
one thread asks the copy engine for a whole tile, an mbarrier counts the bytes that land, and with
``.multicast::cluster`` one load fills the shared memory of every block of a cluster, so blocks that
share a B (or A) tile read it from L2 once. What TVM 0.27 offers for it (TIRx script, all building
for sm_90a with nvcc 13.0; checked 2026-12-02):

- the load: ``T.ptx["cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"]``
  ``(dst, T.address_of(map), x, y, mbar)`` (coordinates innermost first), ``+ ".multicast::cluster"``
  with a trailing u16 CTA mask;
- the host side: ``T.tvm_stack_alloca("tensormap", 1)`` and ``T.call_packed("runtime.cuTensorMapEncodeTiled",
  map, dtype, rank, ptr, dims..., byte strides..., box..., element strides..., interleave, swizzle,
  L2 promotion, OOB fill)`` in the PrimFunc's host part: TVM's runtime encodes the 128-byte
  CUtensorMap per call and passes it as a ``const __grid_constant__ CUtensorMap`` kernel parameter,
  so callers still pass plain tensors;
- mbarriers: ``T.ptx.mbarrier.init/arrive/arrive.expect_tx/...``, ``T.cuda.mbarrier_wait(addr, parity)``;
- clusters: a ``clusterCtaIdx.x`` thread binding (TVM launches with ``cuLaunchKernelEx`` and a
  cluster dimension; in a 1-D cluster the variable is ``%cluster_ctarank``),
  ``T.ptx.barrier.cluster.arrive/wait``, ``T.cuda.cluster_sync()``, ``T.ptx.mapa`` for a peer's
  shared memory;
- warp specialisation: ``T.cuda.elect_sync()``, ``T.ptx.setmaxnreg.inc|dec.sync.aligned.u32(n)``,
  which ptxas ignores (warning C7508) unless the kernel has ``__launch_bounds__(threads, 1)``:
  ``T.attr({"tirx.launch_bounds_min_blocks_per_sm": 1})`` inside the device region gives it (in
  ``T.func_attr`` it is dropped).

What a compiler cannot say is whether these do on the GPU what the ISA says, with TVM's runtime in
between: the tensor map TVM encodes, the 128-byte swizzle (which a wgmma descriptor must match), the
byte count and phase parity of the mbarriers, multicast into a peer's shared memory, and a
producer/consumer ring across a cluster. ``CHECKS`` are six small kernels that answer that with
exact integer data; ``run_check`` runs one on a GPU against ``expected`` (benchmarks/device_check.py,
phase ``tma``). Two more run the TMA GEMM template built on them (kernels.gemm_tma, clusters of 2
and 4) against the exact product. Not yet run on a GPU.
"""
from __future__ import annotations

import numpy as np

M, N = 256, 512  # the fp16 matrix every check reads
BM, BN = 64, 64  # the TMA box: 64 rows of 128 bytes (the widest box the 128-byte swizzle allows)
TILE_BYTES = BM * BN * 2
CLUSTER = 2
RING_STAGES = 2  # the ring's shared-memory slots; N / BN = 8 tiles pass through each of them 4 times
SWIZZLE_NONE, SWIZZLE_128B = 0, 3  # CUtensorMapSwizzle
TMA_LOAD = "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
TMA_LOAD_MULTICAST = TMA_LOAD + ".multicast::cluster"


def _encode_args(swizzle: int) -> list:
    """runtime.cuTensorMapEncodeTiled's arguments after the pointer, for the M x N row-major matrix
    and a BM x BN box."""
    return [N, M, N * 2, BN, BM, 1, 1, 0, swizzle, 0, 0]


def swizzle_128b(tile: np.ndarray) -> np.ndarray:
    """A BM x 64 fp16 tile as TMA's 128-byte swizzle stores it (``tma_place`` at a 1 KiB boundary):
    16-byte chunk c of row r lands at chunk c ^ (r % 8) of the same row."""
    out = np.empty(tile.size, tile.dtype)
    tma_place(out, 0, tile)
    return out.reshape(tile.shape)


def tile_copy(swizzle: int = SWIZZLE_NONE):
    """Every BM x BN tile through TMA into shared memory, then shared memory copied out as it lies
    (element i of the buffer to element i of the tile): the identity without swizzle, the swizzled
    tile with it."""
    from tvm.script import tirx as T  # here: the GPU host's runtime-only TVM has no TVMScript

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, N), "float16"), B: T.Buffer((M, N), "float16")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data, *_encode_args(swizzle))
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, (M // BM) * (N // BN))
        T.launch_thread(tx, 128)
        with T.sblock():
            As = T.sblock_alloc_buffer((BM * BN,), "float16", scope="shared.dyn", align=1024)
            Bar = T.sblock_alloc_buffer((1,), "uint64", scope="shared", align=8)
            row0 = T.meta_var(bx // (N // BN) * BM)
            col0 = T.meta_var(bx % (N // BN) * BN)
            if tx == 0:
                T.ptx.mbarrier.init.shared.b64(T.address_of(Bar[0]), T.uint32(1))
                T.ptx.fence.proxy.async_.shared__cta()
            T.tvm_storage_sync("shared")
            if tx == 0:
                T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(Bar[0]), T.uint32(TILE_BYTES))
                T.ptx[TMA_LOAD](As.data, T.address_of(A_map), col0, row0, T.address_of(Bar[0]))
            T.cuda.mbarrier_wait(T.address_of(Bar[0]), 0)
            for i in T.serial(BM * BN // 128):
                B[row0 + (i * 128 + tx) // BN, col0 + (i * 128 + tx) % BN] = As[i * 128 + tx]

    return main


def multicast():
    """Clusters of two blocks: rank 0 loads each tile once with ``.multicast::cluster`` (mask 0b11)
    and both blocks write what arrived in their own shared memory to their half of the output."""
    from tvm.script import tirx as T  # here: the GPU host's runtime-only TVM has no TVMScript

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, N), "float16"), B: T.Buffer((CLUSTER, M, N), "float16")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data, *_encode_args(SWIZZLE_NONE))
        rank = T.env_thread("clusterCtaIdx.x")
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(rank, CLUSTER)
        T.launch_thread(bx, (M // BM) * (N // BN) * CLUSTER)
        T.launch_thread(tx, 128)
        with T.sblock():
            As = T.sblock_alloc_buffer((BM * BN,), "float16", scope="shared.dyn", align=1024)
            Bar = T.sblock_alloc_buffer((1,), "uint64", scope="shared", align=8)
            tile = T.meta_var(bx // CLUSTER)
            row0 = T.meta_var(tile // (N // BN) * BM)
            col0 = T.meta_var(tile % (N // BN) * BN)
            if tx == 0:
                T.ptx.mbarrier.init.shared.b64(T.address_of(Bar[0]), T.uint32(1))
                T.ptx.fence.mbarrier_init.release.cluster()
            # a peer's multicast must not signal a barrier that is not initialised yet
            T.cuda.cluster_sync()
            if tx == 0:
                T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(Bar[0]), T.uint32(TILE_BYTES))
                if rank == 0:
                    T.ptx[TMA_LOAD_MULTICAST](As.data, T.address_of(A_map), col0, row0, T.address_of(Bar[0]),
                                              T.uint16((1 << CLUSTER) - 1))
            T.cuda.mbarrier_wait(T.address_of(Bar[0]), 0)
            for i in T.serial(BM * BN // 128):
                B[rank, row0 + (i * 128 + tx) // BN, col0 + (i * 128 + tx) % BN] = As[i * 128 + tx]
            T.cuda.cluster_sync()

    return main


def ring():
    """A warp-specialised producer/consumer ring across a cluster of two, the shape of a TMA GEMM's
    main loop: warpgroup 0 produces (``setmaxnreg.dec``, one elected thread; rank 0 multicasts the
    row block's N / BN tiles, one per step, through ``RING_STAGES`` slots), warpgroup 1 consumes
    (``setmaxnreg.inc``; waits on the slot's full barrier with the step's phase parity, sums the
    tile into one float per thread, then releases the slot in both blocks with a remote arrive).
    Block b writes its 128 sums plus its rank to row b of the output."""
    from tvm.script import tirx as T  # here: the GPU host's runtime-only TVM has no TVMScript

    steps = N // BN

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, N), "float16"), B: T.Buffer((M // BM * CLUSTER, 128), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data, *_encode_args(SWIZZLE_NONE))
        rank = T.env_thread("clusterCtaIdx.x")
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(rank, CLUSTER)
        T.launch_thread(bx, M // BM * CLUSTER)
        T.launch_thread(tx, 256)
        T.attr({"tirx.launch_bounds_min_blocks_per_sm": 1})  # else ptxas ignores setmaxnreg (C7508)
        with T.sblock():
            As = T.sblock_alloc_buffer((RING_STAGES * BM * BN,), "float16", scope="shared.dyn", align=1024)
            Full = T.sblock_alloc_buffer((RING_STAGES,), "uint64", scope="shared", align=8)
            Empty = T.sblock_alloc_buffer((RING_STAGES,), "uint64", scope="shared", align=8)
            Acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
            Remote = T.sblock_alloc_buffer((1,), "uint32", scope="local")
            if tx == 0:
                for s in T.serial(RING_STAGES):
                    T.ptx.mbarrier.init.shared.b64(T.address_of(Full[s]), T.uint32(1))
                    T.ptx.mbarrier.init.shared.b64(T.address_of(Empty[s]), T.uint32(CLUSTER))
                T.ptx.fence.mbarrier_init.release.cluster()
            T.cuda.cluster_sync()
            if tx < 128:  # producer
                T.ptx.setmaxnreg.dec.sync.aligned.u32(40)
                if tx < 32:
                    if T.cuda.elect_sync() != T.uint32(0):
                        for k in T.serial(steps):
                            # a fresh barrier's preceding phase counts as complete: parity 1 passes
                            T.cuda.mbarrier_wait(T.address_of(Empty[k % RING_STAGES]), (k // RING_STAGES + 1) % 2)
                            T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(Full[k % RING_STAGES]),
                                                                      T.uint32(TILE_BYTES))
                            if rank == 0:
                                T.ptx[TMA_LOAD_MULTICAST](
                                    T.address_of(As[k % RING_STAGES * BM * BN]), T.address_of(A_map), k * BN,
                                    bx // CLUSTER * BM, T.address_of(Full[k % RING_STAGES]),
                                    T.uint16((1 << CLUSTER) - 1))
            else:  # consumer
                T.ptx.setmaxnreg.inc.sync.aligned.u32(232)
                Acc[0] = T.float32(0)
                for k in T.serial(steps):
                    T.cuda.mbarrier_wait(T.address_of(Full[k % RING_STAGES]), k // RING_STAGES % 2)
                    for i in T.serial(BM * BN // 128):
                        Acc[0] = Acc[0] + T.Cast("float32", As[k % RING_STAGES * BM * BN + i * 128 + tx - 128])
                    T.cuda.warpgroup_sync(1)
                    if tx == 128:
                        for r in T.serial(CLUSTER):  # the slot is free again in every block of the cluster
                            T.ptx.mapa.shared__cluster.u32(
                                Remote[0], T.cuda.cvta_generic_to_shared(T.address_of(Empty[k % RING_STAGES])),
                                T.uint32(r))
                            T.ptx.mbarrier.arrive.release.cluster.shared__cluster.b64(Remote[0])
                B[bx, tx - 128] = Acc[0] + T.Cast("float32", rank)
            T.cuda.cluster_sync()

    return main


# The wgmma checks' descriptors (bytes): A K-major, 8-row groups 1 KiB apart, k16 steps 32 bytes.
A_LBO, A_SBO, A_K_STEP = 16, 1024, 32  # K-major LBO is unused (encoded 1, as CUTLASS does)


def wgmma_b_operand(b_k_major: bool) -> tuple:
    """(N of the wgmma, 64-column TMA boxes of B, (LBO, SBO, k16 step) in bytes) of a wgmma check."""
    if b_k_major:
        return BN, 1, (A_LBO, A_SBO, A_K_STEP)
    return 2 * BN, 2, (BM * BN * 2, 1024, 2048)  # chunks 8 KiB apart, 8-row k groups 1 KiB, k16 = 2 KiB


def wgmma_swizzle128(b_k_major: bool = True):
    """The operand path of a TMA GEMM: tiles loaded by TMA with the 128-byte swizzle and one
    warpgroup's four k16 ``wgmma.mma_async`` steps reading them through swizzled descriptors
    (layout type 128B; the matrix's rows are 128 bytes, so 8-row groups are 1 KiB apart).

    - A (64 x 64, rows 0-63 of the matrix): K-major; SBO 1 KiB between 8-row groups of m, LBO unused;
      the k16 step moves the start address 32 bytes inside the swizzle atom, as CUTLASS does.
    - ``b_k_major``: W = rows 64-127, columns 0-63, K-major like A (``imm-trans-b`` 0), m64n64k16,
      D = A W^T. Otherwise B = rows 64-127, columns 0-127 as a row-major K x N operand (MN-major,
      ``imm-trans-b`` 1, what a GEMM's B is): two 64-column boxes 8 KiB apart, m64n128k16, D = A B,
      with CUTLASS's MN-major convention: LBO 8 KiB between the 64-column chunks, SBO 1 KiB between
      8-row groups of k, the k16 step 2 KiB.

    D is stored by gemm_wgmma's accumulator layout."""
    from tvm.script import tirx as T  # here: the GPU host's runtime-only TVM has no TVMScript

    from .gemm_wgmma import acc_fragment

    n, b_boxes, (b_lbo, b_sbo, b_step) = wgmma_b_operand(b_k_major)
    nacc = n // 2
    wgmma = getattr(T.ptx.wgmma.mma_async.sync.aligned, f"m64n{n}k16").f32.f16.f16

    @T.prim_func(s_tir=True)
    def main(A: T.Buffer((M, N), "float16"), D: T.Buffer((64, n), "float32")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        A_map: T.let[T.handle("tensormap")] = T.tvm_stack_alloca("tensormap", 1)
        T.call_packed("runtime.cuTensorMapEncodeTiled", A_map, "float16", 2, A.data, *_encode_args(SWIZZLE_128B))
        bx = T.env_thread("blockIdx.x")
        tx = T.env_thread("threadIdx.x")
        T.launch_thread(bx, 1)
        T.launch_thread(tx, 128)
        with T.sblock():
            Ts = T.sblock_alloc_buffer(((1 + b_boxes) * BM * BN,), "float16", scope="shared.dyn", align=1024)
            Bar = T.sblock_alloc_buffer((1,), "uint64", scope="shared", align=8)
            Acc = T.sblock_alloc_buffer((nacc,), "float32", scope="local")
            DescA = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            DescB = T.sblock_alloc_buffer((1,), "uint64", scope="local")
            if tx == 0:
                T.ptx.mbarrier.init.shared.b64(T.address_of(Bar[0]), T.uint32(1))
                T.ptx.fence.proxy.async_.shared__cta()
            T.tvm_storage_sync("shared")
            if tx == 0:
                T.ptx.mbarrier.arrive.expect_tx.shared.b64(T.address_of(Bar[0]), T.uint32((1 + b_boxes) * TILE_BYTES))
                T.ptx[TMA_LOAD](Ts.data, T.address_of(A_map), 0, 0, T.address_of(Bar[0]))
                for box in T.unroll(b_boxes):  # B's 64-column chunks, 8 KiB apart
                    T.ptx[TMA_LOAD](T.address_of(Ts[(1 + box) * BM * BN]), T.address_of(A_map), box * BN, BM,
                                    T.address_of(Bar[0]))
            for i in T.unroll(nacc):
                Acc[i] = T.float32(0)
            T.cuda.mbarrier_wait(T.address_of(Bar[0]), 0)
            T.ptx.wgmma.fence.sync.aligned()
            for kk in T.unroll(4):
                T.cuda.wgmma.encode_matrix_descriptor(T.address_of(DescA[0]),
                                                      Ts.access_ptr("r", offset=kk * A_K_STEP // 2),
                                                      A_LBO // 16, A_SBO // 16, SWIZZLE_128B)
                T.cuda.wgmma.encode_matrix_descriptor(
                    T.address_of(DescB[0]), Ts.access_ptr("r", offset=BM * BN + kk * b_step // 2),
                    b_lbo // 16, b_sbo // 16, SWIZZLE_128B)
                wgmma(*[Acc[i] for i in range(nacc)], DescA[0], DescB[0], True, 1, 1, 0, 0 if b_k_major else 1)
            T.ptx.wgmma.commit_group.sync.aligned()
            T.ptx.wgmma.wait_group.sync.aligned(0)
            for i in T.unroll(nacc):
                D[acc_fragment(tx, i)[0], acc_fragment(tx, i)[1]] = Acc[i]

    return main


# -- the ISA's view of those tiles (NumPy) -------------------------------------------------------------
def swizzle_address(byte: np.ndarray) -> np.ndarray:
    """Where the 128-byte swizzle puts a byte offset of a 1 KiB-aligned buffer: bits 4-6 (the 16-byte
    chunk in a 128-byte row) XOR bits 7-9 (the row in an 8-row group), CUTLASS's Swizzle<3,4,3>;
    what TMA writes and a 128B-swizzle descriptor reads."""
    return byte ^ (((byte >> 7) & 7) << 4)


def tma_place(smem: np.ndarray, byte_start: int, box: np.ndarray) -> None:
    """A 128B-swizzled TMA box (rows of 64 halves = 128 bytes) written to ``smem`` (fp16) at
    ``byte_start`` (a multiple of 1 KiB)."""
    r, c = np.indices(box.shape)
    smem[swizzle_address(byte_start + r * 128 + c * 2) // 2] = box


def descriptor_operand(smem: np.ndarray, byte_start: int, lbo: int, sbo: int, rows: int, k_major: bool) -> np.ndarray:
    """The operand a 128B-swizzle descriptor names (CUTLASS's canonical layouts, in bytes): K-major,
    element (m, k) of a rows x 16 operand at start + (m // 8) SBO + (m % 8) 128 + 2k; MN-major,
    element (k, n) of a 16 x rows operand at start + (n // 64) LBO + (k // 8) SBO + (k % 8) 128
    + 2 (n % 64); then swizzled. Returned as (m, k), or (k, n)."""
    if k_major:
        m, k = np.indices((rows, 16))
        return smem[swizzle_address(byte_start + m // 8 * sbo + m % 8 * 128 + k * 2) // 2]
    k, n = np.indices((16, rows))
    return smem[swizzle_address(byte_start + n // 64 * lbo + k // 8 * sbo + k % 8 * 128 + n % 64 * 2) // 2]


def emulate_wgmma_check(a: np.ndarray, b_k_major: bool, b_operand: tuple | None = None) -> np.ndarray:
    """What ``wgmma_swizzle128`` computes if the hardware does what ``swizzle_address`` and
    ``descriptor_operand`` say: the TMA boxes placed as the kernel places them, each k16 step's
    operands read through the kernel's descriptors (``b_operand``: another (N, boxes, (LBO, SBO,
    step)) to show what a wrong one gives)."""
    n, boxes, (lbo, sbo, step) = b_operand or wgmma_b_operand(b_k_major)
    smem = np.zeros((1 + boxes) * BM * BN, a.dtype)
    tma_place(smem, 0, a[:BM, :BN])
    for box in range(boxes):
        tma_place(smem, (1 + box) * TILE_BYTES, a[BM:2 * BM, box * BN:(box + 1) * BN])
    d = np.zeros((64, n), np.float32)
    for kk in range(4):
        a_op = descriptor_operand(smem, kk * A_K_STEP, A_LBO, A_SBO, 64, True).astype(np.float32)
        b_op = descriptor_operand(smem, TILE_BYTES + kk * step, lbo, sbo, n, b_k_major).astype(np.float32)
        d += a_op @ (b_op.T if b_k_major else b_op)
    return d


# -- what each check must produce --------------------------------------------------------------------
def _tiles(a: np.ndarray):
    for r in range(0, M, BM):
        for c in range(0, N, BN):
            yield r, c, a[r:r + BM, c:c + BN]


def expected(name: str, a: np.ndarray) -> np.ndarray:
    """The output check ``name`` must produce from ``a`` (M x N fp16)."""
    if name == "tile_copy":
        return a.copy()
    if name == "tile_copy_swizzle128":
        out = np.empty_like(a)
        for r, c, tile in _tiles(a):
            out[r:r + BM, c:c + BN] = swizzle_128b(tile)
        return out
    if name == "wgmma_swizzle128":
        return a[:BM, :BN].astype(np.float32) @ a[BM:2 * BM, :BN].astype(np.float32).T
    if name == "wgmma_mn_major_swizzle128":
        return a[:BM, :BN].astype(np.float32) @ a[BM:2 * BM, :2 * BN].astype(np.float32)
    if name == "multicast":
        return np.stack([a] * CLUSTER)
    if name == "ring":
        out = np.empty((M // BM * CLUSTER, 128), np.float32)
        for block in range(out.shape[0]):
            rows = a[block // CLUSTER * BM:(block // CLUSTER + 1) * BM].astype(np.float32)
            # consumer thread j sums element i * 128 + j of every tile's row-major 64 x 64 box
            boxes = rows.reshape(BM, N // BN, BN).transpose(1, 0, 2).reshape(N // BN, BM * BN // 128, 128)
            out[block] = boxes.sum(axis=(0, 1)) + block % CLUSTER
        return out
    raise KeyError(name)


# The TMA GEMM template (kernels.gemm_tma) itself, with every tail: 5 row tiles of 128 (the last one
# 8 rows deep; clusters of 4 add 3 blocks past M), a 264-column B (the second 256-column tile 8 wide),
# K = 456 (8 k steps, the last 8 deep: the loop refills stages with 3 and 4 of them).
GEMM_CHECK_SHAPE = (520, 264, 456)
GEMM_CHECK_TILE = (128, 256, 2, 1)


def gemm_check(stages: int, cluster: int):
    from .gemm_tma import gemm_tma

    return gemm_tma(*GEMM_CHECK_SHAPE, *GEMM_CHECK_TILE, stages, cluster)


CHECKS = {
    "tile_copy": lambda: tile_copy(SWIZZLE_NONE),
    "tile_copy_swizzle128": lambda: tile_copy(SWIZZLE_128B),
    "wgmma_swizzle128": wgmma_swizzle128,
    "wgmma_mn_major_swizzle128": lambda: wgmma_swizzle128(b_k_major=False),
    "multicast": multicast,
    "ring": ring,
    "gemm_cluster2": lambda: gemm_check(3, 2),
    "gemm_cluster4": lambda: gemm_check(4, 4),
}
GEMM_CHECKS = ("gemm_cluster2", "gemm_cluster4")


def check_candidates() -> list:
    """The checks as etune's Builder takes them (module, workload spec and flops, name ``tma_<check>``)."""
    import types

    import tvm

    return [types.SimpleNamespace(workload=types.SimpleNamespace(spec="tma-checks", flops=0),
                                  mod=tvm.IRModule({"main": build()}), structural_hash=f"tma_{name}")
            for name, build in CHECKS.items()]


def check_input(seed: int = 0) -> np.ndarray:
    """Small integers as fp16: every sum the checks form is exact in fp32, so outputs compare exactly."""
    return np.random.default_rng(seed).integers(-8, 9, size=(M, N)).astype(np.float16)


def check_arguments(name: str, seed: int = 0) -> tuple[list, np.ndarray]:
    """(inputs, the output due) of check ``name``. The GEMM checks multiply small integers: the fp32
    sums are exact (and, for these operands, below 2048: exact in fp16 as well)."""
    if name not in GEMM_CHECKS:
        a = check_input(seed)
        return [a], expected(name, a)
    M_, N_, K_ = GEMM_CHECK_SHAPE
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(-4, 5, size=shape).astype(np.float16) for shape in ((M_, K_), (K_, N_)))
    return [a, b], (a.astype(np.float32) @ b.astype(np.float32)).astype(np.float16)


def compare(want: np.ndarray, out: np.ndarray) -> dict:
    """{"passed", "mismatches", "of", "first_wrong"} of an output against the one due."""
    if out.shape != want.shape:
        return {"passed": False, "mismatches": int(want.size), "of": int(want.size), "first_wrong": None}
    bad = ~(out == want)  # NaN (never written) counts as wrong
    first = [int(i) for i in np.argwhere(bad)[0]] if bad.any() else None
    return {"passed": not bad.any(), "mismatches": int(bad.sum()), "of": int(want.size),
            # where a layout slip shows: the index, what came and what was due
            "first_wrong": None if first is None else [first, float(out[tuple(first)]), float(want[tuple(first)])]}


def run_check(name: str, library: str, device_index: int = 0) -> dict:
    """Run check ``name`` from its built ``library`` on the GPU (TVM runtime) and compare."""
    import tvm

    from etune.measurements.tvm_runner import cuda_runtime_problem

    problem = cuda_runtime_problem()
    if problem:
        raise RuntimeError(problem)
    device = tvm.cuda(device_index)
    function = tvm.runtime.load_module(library)["main"]
    inputs, want = check_arguments(name)
    out = tvm.runtime.tensor(np.full(want.shape, np.nan, want.dtype), device)
    function(*[tvm.runtime.tensor(x, device) for x in inputs], out)
    device.sync()
    return compare(want, out.numpy())
