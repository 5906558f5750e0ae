"""Run a built candidate's library on the GPU and check it against the workload's reference."""
from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np


def cuda_runtime_problem() -> str | None:
    """Why TVM cannot run CUDA kernels here, or None when it can.

    A runtime-only TVM (no compiler library: what the device check carries to the GPU) skips the
    backend hooks that load ``libtvm_runtime_cuda.so``, so it is loaded here, globally, as the full
    TVM would. It needs ``libcuda.so.1`` (the driver) and ``libcudart.so.13``.
    """
    try:
        import tvm
        from tvm.base import _LOADED_LIBS
    except ImportError as exc:
        return f"TVM is not importable ({exc})"
    if not tvm.runtime.enabled("cuda"):
        library = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent / "libtvm_runtime_cuda.so"
        if not library.exists():
            return f"this TVM has no CUDA runtime ({library.name} missing)"
        try:
            ctypes.CDLL(str(library), ctypes.RTLD_GLOBAL)
        except OSError as exc:
            return f"TVM's CUDA runtime does not load: {exc}"
        if not tvm.runtime.enabled("cuda"):
            return "TVM's CUDA runtime loaded but registers no CUDA device API"
    if not tvm.cuda(0).exist:
        return "TVM's CUDA runtime sees no GPU"
    return None


def poisoned_outputs(workload) -> list[np.ndarray]:
    """Output buffers full of NaN: an element the kernel never writes fails the check."""
    return [np.full(t.shape, np.nan, dtype=t.dtype) for t in workload.outputs]


def describe_mismatch(workload, rel_err: float) -> str:
    """The reason recorded for a candidate whose output is wrong."""
    if not math.isfinite(rel_err):
        return "wrong output (NaN/Inf, or elements never written)"
    return f"wrong output (rel err {rel_err:.3g} > tolerance {workload.rel_tolerance:.3g})"


def run_once(function, workload, input_tensors, device) -> tuple[list, list[np.ndarray]]:
    """One call of ``function`` on ``input_tensors`` (already on ``device``) into fresh NaN-poisoned
    outputs; returns (device argument list, outputs copied back to numpy)."""
    import tvm

    outputs = [tvm.runtime.tensor(o, device) for o in poisoned_outputs(workload)]
    args = [*input_tensors, *outputs]
    function(*args)
    device.sync()
    return args, [o.numpy() for o in outputs]


def run_and_check(workload, library: str, seed: int = 0, device_index: int = 0) -> tuple[bool, float]:
    """(ok, relative L2 error) of one call on fresh random inputs; outputs start poisoned with NaN so
    an element the kernel never writes fails the check."""
    import tvm

    cuda_runtime_problem()  # loads the CUDA runtime into a runtime-only TVM
    device = tvm.cuda(device_index)
    function = tvm.runtime.load_module(library)["main"]
    inputs = workload.random_inputs(seed)
    _, results = run_once(function, workload, [tvm.runtime.tensor(a, device) for a in inputs], device)
    return workload.check(results, workload.reference(inputs))


def faulting_candidate(spec: str = "softmax:256,256"):
    """A kernel with the workload's signature that reads 2 TB past its input: an illegal address on
    a GPU. For the isolation checks (tests, benchmarks/device_check.py); building it needs TVM's
    compiler, running it only the runtime."""
    import types

    import tvm
    from tvm import te
    from tvm.s_tir import Schedule

    from etune.kernels import parse_spec

    workload = parse_spec(spec)
    rows, cols = workload.params["rows"], workload.params["cols"]
    x = te.placeholder((rows, cols), "float16", name="X")
    y = te.compute((rows, cols), lambda i, j: x[i, j + tvm.tirx.const(1 << 40, "int64")], name="Y")
    sch = Schedule(tvm.IRModule({"main": te.create_prim_func([x, y])}))
    i, j = sch.get_loops(sch.get_sblock("Y"))
    sch.bind(i, "blockIdx.x")
    sch.bind(j, "threadIdx.x")
    return types.SimpleNamespace(workload=workload, mod=sch.mod, structural_hash="faulting")
