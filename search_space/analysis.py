"""What the GPU will run for a schedule: its kernels, their launch geometry and on-chip memory.

Read from the lowered device functions (TVM's own pipeline up to, not including, code generation), so
the numbers are those of the CUDA that would be built: compacted per-thread local arrays, merged
shared memory, the grid and block of every kernel.
"""
from __future__ import annotations

import dataclasses
import math

import tvm
from tvm.target import Target

from .targets import GpuSpec


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
    # branch): what the kernel asks of each memory level, before caches. See traffic().
    traffic: "Traffic" = dataclasses.field(default_factory=lambda: Traffic())

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


_AXES = {"x": 0, "y": 1, "z": 2}


def lower_device_functions(mod, target: Target) -> list:
    """(name, PrimFunc) of each device kernel after TVM's default TIR pipeline."""
    from tvm.tirx.build import split_host_device_mods

    mod = tvm.tirx.transform.BindTarget(target.with_host(target.host or Target({"kind": "llvm"})))(mod)
    pipeline, _, finalize_device = tvm.tirx.get_default_tir_pipeline(target)
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


def walk(node, visit) -> None:
    """Call ``visit`` on every statement and expression under ``node`` (pre-order, iteratively)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if current is None or isinstance(current, (int, float, str)):
            continue
        if isinstance(current, (list, tuple)) or type(current).__name__ == "Array":
            stack.extend(current)
            continue
        if not isinstance(current, (tvm.tirx.Stmt, tvm.ir.Expr)):
            continue
        visit(current)
        for field in _CHILD_FIELDS:
            child = getattr(current, field, None)
            if child is not None:
                stack.append(child)


def _lanes(expr) -> int:
    """Vector lanes of an expression (``float16x8`` -> 8); expressions carry a PrimType in ``ty``."""
    try:
        return tvm.DataType(str(expr.ty)).lanes
    except (AttributeError, ValueError, TypeError):
        return 1


def analyse_kernel(name: str, func) -> KernelLaunch:
    grid = [1, 1, 1]
    block = [1, 1, 1]
    shared = 0
    local = 0
    tensor_cores = False
    lanes = 1
    gather_lanes = 1

    def visit(node):
        nonlocal shared, local, tensor_cores, lanes, gather_lanes
        kind = type(node).__name__
        if kind == "AttrStmt" and node.attr_key == "thread_extent":
            tag = node.node.thread_tag
            extent = int(node.value) if type(node.value).__name__ == "IntImm" else 1
            scope, _, axis = tag.partition(".")
            if scope == "blockIdx":
                grid[_AXES[axis]] = extent
            elif scope == "threadIdx":
                block[_AXES[axis]] = extent
        elif kind == "AllocBuffer":
            buffer = node.buffer
            nbytes = math.prod(int(e) for e in buffer.shape) * tvm.DataType(buffer.dtype).bits // 8
            scope = buffer.scope()
            if scope.startswith("shared"):
                shared += nbytes
            elif scope == "local":
                local += nbytes
        elif kind == "Call" and hasattr(node.op, "name"):
            if "mma" in node.op.name or "matrix_sync" in node.op.name:
                tensor_cores = True
        elif kind in ("BufferStore", "BufferLoad", "TensorLoad"):  # 0.27 calls a load TensorLoad
            expr = node.value if kind == "BufferStore" else node
            lanes = max(lanes, _lanes(expr))
            for index in node.indices:
                if _lanes(index) > 1 and type(index).__name__ != "Ramp":
                    gather_lanes = max(gather_lanes, _lanes(index))

    walk(func.body, visit)
    return KernelLaunch(name, tuple(grid), tuple(block), shared, local, tensor_cores, lanes, gather_lanes)


_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Max", "Min", "FloorDiv"}
_MATH_CALLS = ("exp", "log", "sqrt", "rsqrt", "tanh", "pow", "fma")
# One wmma mma_sync is a 16x16x16 multiply-accumulate done by a warp: 2*16^3 flops over 32 threads,
# and the lowered code counts it once per thread.
_WMMA_FLOPS_PER_THREAD = 2 * 16**3 / 32


def _constant(expr) -> int | None:
    return int(expr.value) if type(expr).__name__ == "IntImm" else None


def _bytes_of(expr) -> int:
    try:
        dtype = tvm.DataType(str(expr.ty))
    except (AttributeError, ValueError, TypeError):
        return 0
    return dtype.bits * dtype.lanes // 8


def traffic(func) -> Traffic:
    """Dynamic memory and arithmetic totals of one lowered device function (see Traffic)."""
    totals = dict.fromkeys(Traffic.__dataclass_fields__, 0.0)
    stack = [(func.body, 1.0)]
    while stack:
        node, trips = stack.pop()
        if node is None or isinstance(node, (int, float, str)):
            continue
        if isinstance(node, (list, tuple)) or type(node).__name__ == "Array":
            stack.extend((child, trips) for child in node)
            continue
        if not isinstance(node, (tvm.tirx.Stmt, tvm.ir.Expr)):
            continue
        kind = type(node).__name__
        child_trips = trips
        if kind == "For":
            child_trips = trips * (_constant(node.extent) or 1)
        elif kind == "AttrStmt" and node.attr_key == "thread_extent":
            child_trips = trips * (_constant(node.value) or 1)
        elif kind in ("TensorLoad", "BufferLoad", "BufferStore"):
            scope = (node.buffer if kind == "BufferStore" else node.source).scope()
            nbytes = _bytes_of(node.value if kind == "BufferStore" else node)
            direction = "store" if kind == "BufferStore" else "load"
            if scope == "global":
                totals[f"global_{direction}_bytes"] += trips * nbytes
                totals[f"global_{direction}_instructions"] += trips
            elif scope.startswith("shared"):
                totals[f"shared_{direction}_bytes"] += trips * nbytes
        elif kind in _ARITHMETIC and "float" in str(getattr(node, "ty", "")):
            totals["arithmetic_ops"] += trips * _lanes(node)
        elif kind == "Call" and hasattr(node.op, "name"):
            op = node.op.name
            if "mma_sync" in op:
                totals["tensor_core_flops"] += trips * _WMMA_FLOPS_PER_THREAD
            elif op.rpartition(".")[2] in _MATH_CALLS:
                totals["arithmetic_ops"] += trips * _lanes(node)
        for field in _CHILD_FIELDS:
            child = getattr(node, field, None)
            if child is not None and not (kind == "For" and field in ("min", "extent")):
                stack.append((child, child_trips))
    return Traffic(**totals)


def kernel_launches(mod, target: Target) -> list[KernelLaunch]:
    return [dataclasses.replace(analyse_kernel(name, func), traffic=traffic(func))
            for name, func in lower_device_functions(mod, target)]


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
        if k.local_bytes_per_thread > MAX_LOCAL_BYTES_PER_THREAD:
            return f"{k.name}: {k.local_bytes_per_thread} B local memory per thread > {MAX_LOCAL_BYTES_PER_THREAD}"
        if k.max_gather_lanes > 4:
            # TVM 0.27's CUDA codegen packs an 8-lane int32 index vector into a longlong4 but calls
            # make_longlong4 with 8 arguments, which nvcc rejects.
            return f"{k.name}: {k.max_gather_lanes}-lane gather (TVM 0.27 CUDA codegen emits invalid code)"
        if k.grid[1] > 65535 or k.grid[2] > 65535 or k.grid[0] > 2**31 - 1:
            return f"{k.name}: grid {k.grid} exceeds CUDA limits"
    return None
