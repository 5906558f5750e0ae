"""Run a built candidate's library on the GPU and check it against the workload's reference."""
from __future__ import annotations

import math

import numpy as np


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

    device = tvm.cuda(device_index)
    function = tvm.runtime.load_module(library)["main"]
    inputs = workload.random_inputs(seed)
    _, results = run_once(function, workload, [tvm.runtime.tensor(a, device) for a in inputs], device)
    return workload.check(results, workload.reference(inputs))
