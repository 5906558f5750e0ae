"""Run a built candidate's library on the GPU and check it against the workload's reference."""
from __future__ import annotations

import numpy as np


def run_and_check(workload, library: str, seed: int = 0, device_index: int = 0) -> tuple[bool, float]:
    """(ok, relative L2 error) of one call on fresh random inputs; outputs start poisoned with NaN so
    an element the kernel never writes fails the check."""
    import tvm

    device = tvm.cuda(device_index)
    function = tvm.runtime.load_module(library)["main"]
    inputs = workload.random_inputs(seed)
    outputs = [np.full(t.shape, np.nan, dtype=t.dtype) for t in workload.outputs]
    args = [tvm.runtime.tensor(a, device) for a in (*inputs, *outputs)]
    function(*args)
    device.sync()
    results = [a.numpy() for a in args[len(inputs):]]
    return workload.check(results, workload.reference(inputs))
