"""What the GPU will run for a schedule: its kernels, their launch geometry and on-chip memory.

Read from the lowered device functions (TVM's own pipeline up to, not including, code generation), so
the numbers are those of the CUDA that would be built: compacted per-thread local arrays, merged
shared memory, the grid and block of every kernel.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import tvm
from tvm.target import Target

from etune.kernels.gemm_tma import TMA_BYTES_ATTR

from .targets import PASS_CONFIG, GpuSpec


# Registers every thread needs besides its local arrays (indices, addresses, loop counters).
REGISTER_BASE = 32
MAX_REGISTERS_PER_THREAD = 255
# Independent tensor-core accumulator tiles a warp can count on to hide latency (instruction-level
# parallelism). A warp with two or more issues its next mma while the last is in the pipe, so two such
# warps per scheduler keep it busy: the 8-warp SMs of CUTLASS's sm80 GEMMs and FlashAttention-2 run
# near mma.sync's peak. Capped at 2 because between k steps a warp still waits on its fragment loads
# and barriers, which more accumulators do not hide.
MAX_WARP_ILP = 2.0


def estimate_registers(local_bytes_per_thread: int, threads_per_block: int, gpu, base: int = REGISTER_BASE,
                       max_per_thread: int = MAX_REGISTERS_PER_THREAD) -> tuple[int, int]:
    """(registers per thread, spilled bytes per thread) without a build: a base plus one register per
    4 B of per-thread local arrays. TVM emits ``__launch_bounds__(threads)``, so ptxas fits one block
    into the register file and spills whatever does not fit; registers come in units of 8."""
    wanted = base + math.ceil(local_bytes_per_thread / 4)
    threads = gpu.warp_size * math.ceil(max(1, threads_per_block) / gpu.warp_size)
    fit = max(8, min(max_per_thread, (gpu.registers_per_block // threads) // 8 * 8))
    registers = min(8 * math.ceil(wanted / 8), fit)
    return registers, max(0, wanted - registers) * 4


def spilled_access_bytes(launch: "KernelLaunch", spilled_bytes_per_thread: float) -> float:
    """Local-memory traffic of a kernel whose threads spill ``spilled_bytes_per_thread`` of their local
    arrays (``estimate_registers``): that share of every access the lowered code makes to them (a
    spilled accumulator is read and written in every k step)."""
    local = launch.local_bytes_per_thread
    return min(1.0, spilled_bytes_per_thread / local) * launch.traffic.local_access_bytes if local > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    local_bytes_per_thread: int
    uses_tensor_cores: bool
    max_vector_lanes: int
    # Lanes of the widest gather (a vector load or store whose index is not a plain Ramp).
    max_gather_lanes: int = 1
    # Dynamic totals over the whole grid (every loop trip of every thread, both sides of every
    # branch): what the kernel asks of each memory level, before caches.
    traffic: "Traffic" = dataclasses.field(default_factory=lambda: Traffic())
    # Of ``shared_bytes``, the dynamic (``shared.dyn``) part; the rest is static.
    dynamic_shared_bytes: int = 0
    # Bytes per thread that cp.async keeps on the way: the copies of one commit group times the groups
    # a software pipeline lets be in flight (``async_wait_inflight_count`` + 1); 0 without cp.async.
    async_copy_bytes_in_flight: float = 0.0
    # Independent tensor-core accumulator tiles per thread (m16n8 shares of 4 elements: a wmma 16x16
    # fp32 fragment is two); 0 for kernels without tensor cores.
    accumulator_tiles: float = 0.0

    def warp_ilp(self, cap: float = MAX_WARP_ILP) -> float:
        """Independent instruction chains a warp offers the scheduler: its accumulator tiles, at least
        1 and at most ``cap`` (sim's latency hiding and the features count warps times this)."""
        return min(cap, max(1.0, self.accumulator_tiles))

    @property
    def static_shared_bytes(self) -> int:
        return self.shared_bytes - self.dynamic_shared_bytes

    @property
    def blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def threads_per_block(self) -> int:
        return math.prod(self.block)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Work a kernel asks for, counted over the whole grid from the lowered code.

    Loops multiply by their trip counts and thread launches by their extents; both sides of a branch
    count (bounds guards make this a slight over-count). Bytes are element bytes x vector lanes;
    ``*_instructions`` count one per (vector) access, so vectorising lowers them and not the bytes.
    """

    global_load_bytes: float = 0.0
    global_store_bytes: float = 0.0
    global_load_instructions: float = 0.0
    global_store_instructions: float = 0.0
    shared_load_bytes: float = 0.0
    shared_store_bytes: float = 0.0
    arithmetic_ops: float = 0.0  # scalar floating-point operations outside tensor cores
    tensor_core_flops: float = 0.0
    # Of those, the flops of Hopper's asynchronous warpgroup instruction (wgmma), which runs at a
    # higher rate than mma.sync.
    wgmma_flops: float = 0.0
    # Tensor-core (HMMA) instructions, per thread: two per 16x16x16 wmma ``mma_sync`` (nvcc splits it
    # into two m16n8k16 ones), one per PTX ``mma`` (m16n8k8: a quarter of a wmma one's flops), one
    # per ``wgmma`` (an HGMMA per warp).
    tensor_core_instructions: float = 0.0
    # Bytes of per-thread local arrays and tensor-core fragments that threads read and write,
    # operands of mma/ldmatrix/wmma calls included: what spilled registers turn into local-memory
    # traffic, in proportion to the share of them that spills.
    local_access_bytes: float = 0.0
    # Shared-memory access instructions per thread: one per 4 bytes of plain and wmma accesses, one
    # per ldmatrix (up to 16 bytes), none for cp.async (its one instruction is a global access).
    shared_access_instructions: float = 0.0

    @property
    def shared_instructions(self) -> float:
        """Shared-memory access instructions as counted; traffic without that count (older records)
        takes one per 4 bytes."""
        return self.shared_access_instructions or (self.shared_load_bytes + self.shared_store_bytes) / 4.0

    @property
    def hmma_instructions(self) -> float:
        """Tensor-core instructions per thread as counted; traffic without that count (older records)
        takes one per 16x16x16 wmma's flops."""
        return self.tensor_core_instructions or self.tensor_core_flops / _WMMA_FLOPS_PER_THREAD


_AXES = {"x": 0, "y": 1, "z": 2}


def lower_device_functions(mod, target: Target) -> list:
    """(name, PrimFunc) of each device kernel after TVM's default TIR pipeline."""
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.tirx.transform.BindTarget(target.with_host(target.host or Target({"kind": "llvm"})))(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
    with tvm.transform.PassContext(config=PASS_CONFIG):  # the passes builds run (cp.async)
        lowered = pipeline(mod)
        _, device_mods = split_host_device_mods(lowered)
        functions = []
        for device_mod in device_mods.values():
            for gvar, func in finalize_device()(device_mod).functions.items():
                functions.append((gvar.name_hint, func))
    return functions


# Child fields of TIR statements and expressions; TVM 0.27 exposes no TIR visitor to Python.
_CHILD_FIELDS = ("seq", "body", "then_case", "else_case", "value", "a", "b", "args", "indices", "condition",
                 "true_value", "false_value", "base", "stride", "extent", "min", "message")
# The fields each node type has, learnt on first sight: asking every node for all 17 names through
# the FFI (most absent) made analysis cost more than lowering.
_FIELDS_OF: dict[type, tuple[str, ...]] = {}


def _child_fields(node) -> tuple[str, ...]:
    fields = _FIELDS_OF.get(type(node))
    if fields is None:
        fields = _FIELDS_OF[type(node)] = tuple(f for f in _CHILD_FIELDS if hasattr(node, f))
    return fields


def _guard_fraction(condition, extents: dict) -> float:
    """The share of iterations a ``x == c`` guard lets through, where ``x`` combines loop and thread
    variables (``threadIdx.y == 0``, ``threadIdx.x * 8 + e == 0``: one writer of a value every thread
    holds): 1 / the number of distinct (variable) tuples, assuming the combination is injective;
    of a ``x < c`` guard on one variable, c / its extent; of a ``c <= x`` guard, the rest (a
    pipeline's loop that starts using tiles once the first stages are on their way). Other
    conditions (bounds guards) count as always taken."""
    kind = type(condition).__name__
    if kind == "LT" and isinstance(condition.a, tvm.tirx.Var) and _constant(condition.b) is not None:
        # ``threadIdx.y < c``: the first c of the variable's values (idle warps of a row loop).
        extent = extents.get(condition.a.__chandle__())
        return min(1.0, max(0, _constant(condition.b)) / extent) if extent else 1.0
    if kind == "LE" and isinstance(condition.b, tvm.tirx.Var) and _constant(condition.a) is not None:
        extent = extents.get(condition.b.__chandle__())
        return min(1.0, max(0.0, extent - _constant(condition.a)) / extent) if extent else 1.0
    if kind != "EQ":
        return 1.0
    found: dict = {}
    walk(condition, lambda n: found.setdefault(n.__chandle__(), 1) if isinstance(n, tvm.tirx.Var) else None)
    tuples = 1
    for key in found:
        tuples *= extents.get(key, 1)
    return 1.0 / tuples


def _nodes(root):
    """(node, trips) for every statement and expression under ``root``, pre-order; ``trips`` is how
    many times the node runs over the whole grid: loop extents and thread launches multiplied, and
    divided where a one-writer guard (``_guard_fraction``) holds."""
    stack = [(root, 1.0)]
    extents: dict = {}  # extents of the loop and thread variables seen, by handle
    while stack:
        node, trips = stack.pop()
        if node is None or isinstance(node, (int, float, str)):
            continue
        if isinstance(node, (list, tuple)) or type(node).__name__ == "Array":
            stack.extend((child, trips) for child in node)
            continue
        if not isinstance(node, (tvm.tirx.Stmt, tvm.ir.Expr)):
            continue
        yield node, trips
        kind = type(node).__name__
        if kind == "Call" and getattr(node.op, "name", "") in _ADDRESS_CALLS:
            continue  # ``address_of(buf[i])`` names an address; no access happens there
        if kind == "For":
            extent = _constant(node.extent)
            if extent is None:  # a loop whose length depends on the block (causal attention): its mean
                extent = _mean_extent(node.extent, extents)
            extents[node.loop_var.__chandle__()] = max(1, math.ceil(extent))
            stack.append((node.body, trips * extent))
            continue
        if kind == "IfThenElse" and node.else_case is None:
            stack.append((node.condition, trips))
            stack.append((node.then_case, trips * _guard_fraction(node.condition, extents)))
            continue
        if kind == "AttrStmt" and node.attr_key == "thread_extent":
            extents[node.node.var.__chandle__()] = _constant(node.value) or 1
            # a block's rank in its cluster: blockIdx already counts every block once
            if not node.node.thread_tag.startswith("clusterCtaIdx"):
                trips = trips * (_constant(node.value) or 1)
        for field in _child_fields(node):
            child = getattr(node, field)
            if child is not None:
                stack.append((child, trips))


# Integer arithmetic of loop extents, elementwise over numpy arrays (TIR's floor division and modulo).
_EXTENT_OPS = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
               "FloorDiv": lambda a, b: a // b, "FloorMod": lambda a, b: a % b,
               "Min": lambda a, b: np.minimum(a, b), "Max": lambda a, b: np.maximum(a, b),
               # lowering turns power-of-two division and modulo into shifts and masks
               "BitwiseAnd": lambda a, b: a & b, "BitwiseOr": lambda a, b: a | b,
               "RShift": lambda a, b: a >> b, "LShift": lambda a, b: a << b}
_MAX_EXTENT_POINTS = 1 << 20


def _mean_extent(expr, extents: dict) -> float:
    """The mean of a loop extent that depends on enclosing loop and thread variables, over all their
    values (each taken uniformly from 0 to its extent - 1); 1 where it cannot be evaluated (an
    unknown variable or operation: the count then takes one trip, as it did for every such loop)."""
    free: dict = {}
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, tvm.tirx.Var):
            free[node.__chandle__()] = node
        stack.extend(getattr(node, f) for f in ("a", "b", "value") if hasattr(node, f))
    if not free or any(h not in extents for h in free) or math.prod(extents[h] for h in free) > _MAX_EXTENT_POINTS:
        return 1.0
    handles = list(free)
    grids = np.meshgrid(*[np.arange(extents[h], dtype=np.int64) for h in handles], indexing="ij")
    values = dict(zip(handles, grids))

    def evaluate(node):
        kind = type(node).__name__
        if kind == "IntImm":
            return np.int64(node.value)
        if isinstance(node, tvm.tirx.Var):
            return values[node.__chandle__()]
        if kind == "Cast":
            return evaluate(node.value)
        if kind in _EXTENT_OPS:
            return _EXTENT_OPS[kind](evaluate(node.a), evaluate(node.b))
        raise ValueError(kind)

    try:
        return float(np.mean(np.maximum(evaluate(expr), 0)))
    except (ValueError, ZeroDivisionError):
        return 1.0


# Calls whose buffer arguments are addresses (ldmatrix's source operand), not loads.
# Calls whose buffer arguments name addresses, where no access happens (a wgmma descriptor holds
# the shared-memory address its instruction reads from; the read is counted at the wgmma).
_ADDRESS_CALLS = ("tirx.address_of", "tir.address_of", "tirx.cuda.wgmma_encode_matrix_descriptor")
_WGMMA_SYNC = ("wgmma_fence", "wgmma_commit_group", "wgmma_wait_group")
_WARPGROUP = 128


def walk(node, visit) -> None:
    """Call ``visit`` on every statement and expression under ``node`` (pre-order)."""
    for current, _ in _nodes(node):
        visit(current)


def _constant(expr) -> int | None:
    return int(expr.value) if type(expr).__name__ == "IntImm" else None


def _dtype(expr) -> tvm.DataType | None:
    """Expressions carry a PrimType in ``ty`` (``float16x8``)."""
    try:
        return tvm.DataType(str(expr.ty))
    except (AttributeError, ValueError, TypeError):
        return None


def _lanes(expr) -> int:
    dtype = _dtype(expr)
    return dtype.lanes if dtype is not None else 1


_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Max", "Min", "FloorDiv"}
_MATH_CALLS = ("exp", "log", "sqrt", "rsqrt", "tanh", "pow", "fma")
# One wmma mma_sync is a 16x16x16 multiply-accumulate done by a warp: 2*16^3 flops over 32 threads,
# and the lowered code counts it once per thread.
_WMMA_FLOPS_PER_THREAD = 2 * 16**3 / 32
_WARP = 32
_PTX_MMA_SHAPE = re.compile(r"m(\d+)n(\d+)k(\d+)")
# PTX type names; the lowered mma calls spell TVM's ("float16", "float32")
_PTX_TYPE_BITS = {"fp16": 16, "bf16": 16, "fp32": 32, "tf32": 32, "int8": 8, "uint8": 8, "int32": 32, "fp64": 64}


def _type_bits(expr) -> int:
    name = _string(expr)
    return _PTX_TYPE_BITS.get(name) or tvm.DataType(name).bits


def _string(expr) -> str:
    return str(expr.value) if hasattr(expr, "value") else str(expr)


def _ptx_op(op: str) -> str | None:
    """'mma', 'wgmma', 'ldmatrix', 'cp_async', 'commit_group' or 'wait_group' for TVM's PTX intrinsics
    (``ptx_legacy.mma``, ``ptx_mma``, ``ptx.wgmma_f16_ss``, ``s_tir.cp_async_raw``,
    ``ptx.cp_async_wait_group``, ...), else None (wgmma's fence, commit and wait among them)."""
    tail = op.rpartition(".")[2].removeprefix("ptx_")
    if tail == "mma" and "ptx" in op:
        return "mma"
    if tail.startswith("wgmma_") and "ptx" in op and tail not in _WGMMA_SYNC:
        return "wgmma"
    if tail == "ldmatrix":
        return "ldmatrix"
    if tail in ("cp_async_commit_group", "cp_async_wait_group"):
        return tail.removeprefix("cp_async_")
    if tail.startswith("cp_async") and "bulk" not in tail and "barrier" not in tail:
        return "cp_async"
    return None


def analyse_kernel(name: str, func) -> KernelLaunch:
    """Launch geometry, on-chip memory and dynamic traffic of one lowered device function."""
    grid = [1, 1, 1]
    block = [1, 1, 1]
    shared = local = 0
    dynamic_shared = 0
    tensor_cores = False
    lanes = gather_lanes = 1
    totals = dict.fromkeys(Traffic.__dataclass_fields__, 0.0)
    # cp.async: bytes one thread copies in each commit group's scope; groups allowed in flight.
    # Kernels that commit and wait with explicit calls (thread-level templates) instead of TVM's
    # pipeline scopes: their copies, commits and the groups their waits leave in flight.
    groups: list[float] = []
    inflight = 0
    explicit = {"copied": 0.0, "commits": 0.0}
    tma_bytes = 0.0  # bytes TMA loads read, from the attribute etune's templates put around each
    cluster = 1
    # Local arrays with their elements per thread, the elements of wmma accumulator fragments, and
    # the buffers PTX mma calls accumulate into (the walk is not in program order, so they are
    # matched at the end).
    local_arrays: list = []
    accumulator_elements = 0.0
    mma_accumulators: list = []
    for node, trips in _nodes(func.body):
        kind = type(node).__name__
        if kind == "AttrStmt" and node.attr_key == "async_commit_queue_scope":
            groups.append(sum(inner_trips * _cp_async_bytes(inner) for inner, inner_trips in _nodes(node.body)
                              if type(inner).__name__ == "Call"
                              and _ptx_op(getattr(inner.op, "name", "")) == "cp_async"))
        elif kind == "AttrStmt" and node.attr_key == "async_wait_inflight_count":
            inflight = max(inflight, _constant(node.value) or 0)
        elif kind == "AttrStmt" and node.attr_key == TMA_BYTES_ATTR:
            # a TMA load (one thread, a whole box): read from L2 once, written into the shared memory
            # of every block a multicast names
            nbytes = trips * (_constant(node.value) or 0)
            multicast = _calls_string(node.body, "multicast::cluster")
            totals["global_load_bytes"] += nbytes
            totals["global_load_instructions"] += trips
            totals["shared_store_bytes"] += nbytes * (cluster if multicast else 1)
            tma_bytes += nbytes
        elif kind == "AttrStmt" and node.attr_key == "thread_extent":
            scope, _, axis = node.node.thread_tag.partition(".")
            extent = _constant(node.value) or 1
            if scope == "blockIdx":
                grid[_AXES[axis]] = extent
            elif scope == "clusterCtaIdx":
                cluster *= extent
            elif scope == "threadIdx":
                block[_AXES[axis]] = extent
        elif kind == "AllocBuffer":
            buffer = node.buffer
            nbytes = math.prod(int(e) for e in buffer.shape) * tvm.DataType(buffer.dtype).bits // 8
            scope = buffer.scope()
            if scope.startswith("shared"):
                shared += nbytes
                if scope == "shared.dyn":
                    dynamic_shared += nbytes
            elif scope == "local":
                local += nbytes
                local_arrays.append((buffer, math.prod(int(e) for e in buffer.shape)))
            elif scope.startswith("wmma."):
                # wmma fragments are declared per warp and live in its threads' registers
                local += nbytes // _WARP
                if scope == "wmma.accumulator":
                    accumulator_elements += math.prod(int(e) for e in buffer.shape) / _WARP
        elif kind in ("BufferStore", "TensorLoad", "BufferLoad"):  # 0.27 calls a load TensorLoad
            store = kind == "BufferStore"
            dtype = _dtype(node.value if store else node)
            if dtype is not None:
                lanes = max(lanes, dtype.lanes)
            for index in node.indices:
                if type(index).__name__ != "Ramp" and _lanes(index) > 1:
                    gather_lanes = max(gather_lanes, _lanes(index))
            scope = (node.buffer if store or kind == "BufferLoad" else node.source).scope()
            nbytes = dtype.bits * dtype.lanes // 8 if dtype is not None else 0
            direction = "store" if store else "load"
            if scope == "global":
                totals[f"global_{direction}_bytes"] += trips * nbytes
                totals[f"global_{direction}_instructions"] += trips
            elif scope.startswith("shared"):
                totals[f"shared_{direction}_bytes"] += trips * nbytes
                totals["shared_access_instructions"] += trips * nbytes / 4.0
            elif scope == "local":
                totals["local_access_bytes"] += trips * nbytes
        elif kind in _ARITHMETIC:
            dtype = _dtype(node)
            if dtype is not None and dtype.type_code == tvm.DataTypeCode.FLOAT:
                totals["arithmetic_ops"] += trips * dtype.lanes
        elif kind == "Call" and hasattr(node.op, "name"):
            op = node.op.name
            ptx = _ptx_op(op)
            if "mma" in op or "matrix_sync" in op or ptx == "ldmatrix":
                tensor_cores = True
            if "mma_sync" in op:
                totals["tensor_core_flops"] += trips * _WMMA_FLOPS_PER_THREAD
                # a 16x16x16 wmma mma_sync is two HMMA.16816 instructions on sm_80 and later
                totals["tensor_core_instructions"] += trips * 2
                # fragments a, b and c read, d written (fp16 16x16 operands, fp32 accumulator)
                totals["local_access_bytes"] += trips * (2 * 16 * 16 * 2 + 2 * 16 * 16 * 4) / _WARP
            elif op.endswith("tvm_load_matrix_sync") or op.endswith("tvm_store_matrix_sync"):
                # (fragment, m, n, k, index, address_of(shared[...]), stride, layout): a warp moves
                # one fragment between shared memory and its registers
                m, n, k = (_constant(a) or 16 for a in node.args[1:4])
                fragment = str(node.args[0])
                elements = m * k if "matrix_a" in fragment else k * n if "matrix_b" in fragment else m * n
                source = node.args[5].args[0] if type(node.args[5]).__name__ == "Call" and node.args[5].args else None
                dtype = tvm.DataType(source.buffer.dtype) if hasattr(source, "buffer") else tvm.DataType("float16")
                moved = trips * elements * dtype.bits / 8 / _WARP
                if not hasattr(source, "buffer") or source.buffer.scope().startswith("shared"):
                    direction = "store" if op.endswith("store_matrix_sync") else "load"
                    totals[f"shared_{direction}_bytes"] += moved
                    totals["shared_access_instructions"] += moved / 4.0
                totals["local_access_bytes"] += moved
            elif ptx == "mma":
                # ptx mma(shape, layouts, dtypes, ...): 2*m*n*k flops by a warp, counted once per
                # thread; one HMMA instruction (m16n8k8 or m16n8k16)
                m, n, k = (int(v) for v in _PTX_MMA_SHAPE.fullmatch(_string(node.args[0])).groups())
                totals["tensor_core_flops"] += trips * 2 * m * n * k / _WARP
                totals["tensor_core_instructions"] += trips
                # per thread: its share of A and B read, of the accumulator read and written
                a_bits, b_bits, c_bits = (_type_bits(t) for t in node.args[3:6])
                totals["local_access_bytes"] += trips * (m * k * a_bits + k * n * b_bits
                                                         + 2 * m * n * c_bits) / 8 / _WARP
                mma_accumulators.append(_pointed_buffer(node.args[10]))
            elif ptx == "wgmma":
                # wgmma.mma_async(accumulators..., descriptors or A registers, scale-d, immediates,
                # "mma_async", "sync", "aligned", "m64nNk16", dtypes...): 2*m*n*k flops by a warpgroup
                # of 128 threads, counted once per thread; the descriptor operands (``_ss``: A and B,
                # ``_rs``: B) read shared memory without load instructions
                shape = next(_PTX_MMA_SHAPE.fullmatch(a.value) for a in node.args
                             if type(a).__name__ == "StringImm" and _PTX_MMA_SHAPE.fullmatch(a.value))
                m, n, k = (int(v) for v in shape.groups())
                flops = trips * 2 * m * n * k / _WARPGROUP
                totals["tensor_core_flops"] += flops
                totals["wgmma_flops"] += flops
                totals["tensor_core_instructions"] += trips
                operand_bytes = (m * k + k * n) * 2 if op.endswith("_ss") else k * n * 2
                totals["shared_load_bytes"] += trips * operand_bytes / _WARPGROUP
                # the accumulators are loads of a float array (the descriptors are uint64 ones)
                mma_accumulators.extend(b for b in map(_loaded_buffer, node.args)
                                        if b is not None and b.dtype.startswith("float"))
            elif ptx == "ldmatrix":
                # ldmatrix(trans, num, ".b16", ...): num 8x8 matrices of 16-bit elements from shared
                # memory into a warp's registers: num x 128 B per warp, num x 4 B per thread
                moved = trips * (_constant(node.args[1]) or 1) * 8 * 8 * 2 / _WARP
                totals["shared_load_bytes"] += moved
                totals["shared_access_instructions"] += trips
                totals["local_access_bytes"] += moved  # into registers
            elif ptx == "cp_async":
                nbytes = _cp_async_bytes(node)
                totals["global_load_bytes"] += trips * nbytes
                totals["global_load_instructions"] += trips
                totals["shared_store_bytes"] += trips * nbytes
                explicit["copied"] += trips * nbytes
            elif ptx == "commit_group":
                explicit["commits"] += trips
            elif ptx == "wait_group":
                inflight = max(inflight, _constant(node.args[0]) or 0)
            elif op.rpartition(".")[2] in _MATH_CALLS:
                totals["arithmetic_ops"] += trips * _lanes(node)
    if not groups and explicit["commits"]:
        # per thread and group: the kernel's copies over its commits (both counted per thread; a
        # pipeline's drain commits empty groups, which lowers the mean a little)
        groups.append(explicit["copied"] / explicit["commits"])
    in_flight = max(groups) * (inflight + 1) if groups else 0.0
    if tma_bytes:
        # TMA fills shared memory with no registers held: take half of the kernel's dynamic shared
        # memory (all stages but the one being read, of 2 to 4) as on the way, shared by its threads
        in_flight = max(in_flight, dynamic_shared / 2 / math.prod(block))
    accumulator_elements += sum(elements for buffer, elements in local_arrays
                                if any(buffer.same_as(b) for b in mma_accumulators if b is not None))
    # an m16n8 accumulator tile is 4 elements per thread
    accumulator_tiles = accumulator_elements / 4.0
    return KernelLaunch(name, tuple(grid), tuple(block), shared, local, tensor_cores, lanes, gather_lanes,
                        Traffic(**totals), dynamic_shared, in_flight, accumulator_tiles)


def _calls_string(root, value: str) -> bool:
    """Whether a call under ``root`` has the string argument ``value`` (a PTX modifier)."""
    return any(type(n).__name__ == "StringImm" and n.value == value for n, _ in _nodes(root))


def _loaded_buffer(expr):
    """The buffer a load reads (0.27 calls a load TensorLoad, with ``source``), else None."""
    kind = type(expr).__name__
    return expr.source if kind == "TensorLoad" else expr.buffer if kind == "BufferLoad" else None


def _pointed_buffer(expr):
    """The buffer of a pointer argument ``buf.data`` (in 0.27 the call ``buffer_data(buf)``), else None."""
    if type(expr).__name__ == "Call" and getattr(expr.op, "name", "").endswith("buffer_data"):
        return expr.args[0]
    return None


def _cp_async_bytes(call) -> int:
    """Bytes one thread copies with a cp.async call: its last argument (4, 8 or 16)."""
    return _constant(call.args[-1]) or 16


def kernel_launches(mod, target: Target) -> list[KernelLaunch]:
    return [analyse_kernel(name, func) for name, func in lower_device_functions(mod, target)]


# Per-thread local arrays beyond this spill to local memory so badly (and, at hundreds of KiB, cannot
# be launched at all: the driver must back every resident thread's stack) that no such candidate is
# worth a build. 255 registers are ~1 KiB; 8 KiB leaves room for honest spills.
MAX_LOCAL_BYTES_PER_THREAD = 8 * 1024


def launch_problem(launches: list[KernelLaunch], gpu: GpuSpec) -> str | None:
    """Why these kernels cannot run well on ``gpu``, or None."""
    if not launches:
        return "no device kernel"
    for k in launches:
        if k.threads_per_block > gpu.max_threads_per_block:
            return f"{k.name}: {k.threads_per_block} threads per block > {gpu.max_threads_per_block}"
        if k.shared_bytes > gpu.max_shared_memory_per_block:
            return f"{k.name}: {k.shared_bytes} B shared memory > {gpu.max_shared_memory_per_block}"
        if k.static_shared_bytes > gpu.max_static_shared_memory_per_block:
            # ptxas rejects static shared memory beyond 48 KiB; only shared.dyn may use the opt-in limit
            return (f"{k.name}: {k.static_shared_bytes} B static shared memory > "
                    f"{gpu.max_static_shared_memory_per_block}")
        if k.local_bytes_per_thread > MAX_LOCAL_BYTES_PER_THREAD:
            return f"{k.name}: {k.local_bytes_per_thread} B local memory per thread > {MAX_LOCAL_BYTES_PER_THREAD}"
        if k.max_gather_lanes > 4:
            # TVM 0.27's CUDA codegen packs an 8-lane int32 index vector into a longlong4 but calls
            # make_longlong4 with 8 arguments, which nvcc rejects.
            return f"{k.name}: {k.max_gather_lanes}-lane gather (TVM 0.27 CUDA codegen emits invalid code)"
        if k.grid[1] > 65535 or k.grid[2] > 65535 or k.grid[0] > 2**31 - 1:
            return f"{k.name}: grid {k.grid} exceeds CUDA limits"
    return None
