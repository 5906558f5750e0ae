"""Vendor reference kernels (cuBLAS through torch.matmul, torch.softmax, SDPA) for a Workload.

A tuned kernel is only interesting next to what the vendor library does at the same shape, measured
the same way. `prepare(workload)` gives a `VendorKernel`: the torch call on random inputs (never
constants: GEMM power depends on the values), checked once against the workload's numpy reference,
with

- ``launch`` / ``sync`` for the energy protocol (`nvml_energy.measure_energy`): one ``launch`` is one
  replay of a CUDA graph holding ``calls_per_launch`` back-to-back calls, so kernels of ~10 us keep
  the GPU busy (one Python call per torch op costs ~10-20 us on the CPU, as long as the kernel itself
  for a GEMV or a small softmax: the idle gaps between launches would count in the energy, which is
  why the first H100 GEMV measurement did not converge, docs/results.md); the energy per call is the
  energy per launch divided by ``calls_per_launch``;
- ``latency()``: CUDA events around back-to-back graph replays, median seconds per call.

If graph capture fails, it falls back to one Python call per launch and says so in ``notes``.

Layouts match the workloads: gemm C[M, N] = A[M, K] @ B[K, N] row-major (torch.matmul(A, B));
softmax over the last axis; attention Q (B, H, Q, D), K and V (B, H, KV, D). etune's causal mask is
bottom-right aligned (query i sees keys j <= i + KV - Q); torch's ``is_causal=True`` is top-left
aligned, the same only when Q == KV, so for Q < KV the lower-right mask is passed explicitly
(`torch.nn.attention.bias.causal_lower_right` where torch has it, which keeps the fused kernels
eligible; else a boolean mask, which rules out the flash kernel: noted in ``notes``).

torch is imported lazily: etune runs without it, and only this module needs it.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Callable, Sequence

import numpy as np

from .stats import coefficient_of_variation

VENDOR_NAMES = {
    "gemm": "torch.matmul",
    "softmax": "torch.softmax",
    "attention": "torch.nn.functional.scaled_dot_product_attention",
}

GRAPH_BATCH_S = 0.002  # GPU time of one graph replay: long against a launch, short against 100 ms
MAX_GRAPH_CALLS = 1000
GRAPH_MEMORY_BYTES = 2 << 30  # bound on outputs a capture may keep, if the pool does not reuse them


class VendorError(RuntimeError):
    """torch (with CUDA) is missing, or the family has no vendor reference."""


def vendor_name(workload) -> str:
    try:
        return VENDOR_NAMES[workload.family]
    except KeyError:
        raise VendorError(f"no vendor reference for the {workload.family!r} family") from None


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise VendorError(f"vendor references need PyTorch with CUDA ({exc})") from None
    if not torch.cuda.is_available():
        raise VendorError("vendor references need PyTorch with CUDA; torch.cuda.is_available() is False")
    return torch


@dataclasses.dataclass
class VendorKernel:
    name: str
    workload: object
    call: Callable[[], object]  # one call; returns the output tensor (asynchronous)
    launch: Callable[[], None]  # one launch: ``calls_per_launch`` calls (asynchronous)
    calls_per_launch: int
    sync: Callable[[], None]
    batching: str  # "cuda-graph" or "python"
    ok: bool  # output matched the workload's reference
    rel_err: float
    notes: list[str] = dataclasses.field(default_factory=list)
    _torch: object = dataclasses.field(default=None, repr=False)

    def _time_launches(self, launches: int) -> float:
        """Seconds of GPU time for ``launches`` back-to-back launches, by CUDA events."""
        torch = self._torch
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(launches):
            self.launch()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def latency(self, repeats: int = 20, repeat_s: float = 1e-3, warmup_s: float = 0.05,
                budget_s: float = 2.0) -> dict:
        """Median seconds per call over ``repeats`` event-timed groups of back-to-back launches."""
        per_launch = max(self._time_launches(1), 1e-7)
        warm = max(1, math.ceil(warmup_s / per_launch))
        per_launch = max(self._time_launches(warm) / warm, 1e-7)
        number = max(1, math.ceil(repeat_s / per_launch))
        repeats = max(3, min(repeats, math.ceil(budget_s / (number * per_launch))))
        times = [self._time_launches(number) / (number * self.calls_per_launch) for _ in range(repeats)]
        mean = statistics.fmean(times)
        return {
            "median_s": statistics.median(times),
            "min_s": min(times),
            "mean_s": mean,
            "cv": coefficient_of_variation(times),
            "repeats": repeats,
            "number": number * self.calls_per_launch,
            "timer": f"cuda events around {self.batching} launches",
        }


def _inputs_on_device(torch, workload, inputs, device):
    return [torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in inputs]


def _call(torch, workload, tensors, device) -> tuple[Callable[[], object], list[str]]:
    """The torch call for the workload and notes on what it does differently, if anything."""
    family, p = workload.family, workload.params
    notes: list[str] = []
    if family == "gemm":
        a, b = tensors
        c = torch.empty((p["M"], p["N"]), dtype=a.dtype, device=device)
        if p.get("accumulate", "float32") != "float32":
            notes.append("torch.matmul accumulates as cuBLAS chooses (fp32 for fp16), not in fp16")
        return (lambda: torch.matmul(a, b, out=c)), notes
    if family == "softmax":
        (x,) = tensors
        return (lambda: torch.softmax(x, dim=-1)), notes
    if family == "attention":
        q, k, v = tensors
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if not p["causal"]:
            return (lambda: sdpa(q, k, v)), notes
        if p["q_len"] == p["kv_len"]:
            return (lambda: sdpa(q, k, v, is_causal=True)), notes
        offset = p["kv_len"] - p["q_len"]
        try:
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(p["q_len"], p["kv_len"])
            notes.append("bottom-right causal mask via torch.nn.attention.bias.causal_lower_right")
        except ImportError:
            rows = torch.arange(p["q_len"], device=device)[:, None]
            cols = torch.arange(p["kv_len"], device=device)[None, :]
            mask = cols <= rows + offset
            notes.append("bottom-right causal mask as an explicit boolean mask (flash kernel not eligible)")
        return (lambda: sdpa(q, k, v, attn_mask=mask)), notes
    raise VendorError(f"no vendor reference for the {family!r} family")


def _graph(torch, call: Callable[[], object], calls: int):
    """A CUDA graph of ``calls`` back-to-back calls (warmed up on a side stream, as torch asks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            out = call()  # noqa: F841 - dropping the previous output lets the pool reuse it
    torch.cuda.synchronize()
    return graph


def prepare(workload, *, seed: int = 0, device_index: int = 0, inputs: Sequence[np.ndarray] | None = None,
            reference: Sequence[np.ndarray] | None = None, graph_batch_s: float = GRAPH_BATCH_S,
            use_graph: bool = True) -> VendorKernel:
    """The vendor kernel for ``workload`` on CUDA device ``device_index``, checked once."""
    torch = _torch()
    name = vendor_name(workload)
    device = torch.device("cuda", device_index)
    torch.cuda.set_device(device)
    if inputs is None:
        inputs = workload.random_inputs(seed)
    if reference is None:
        reference = workload.reference(inputs)
    tensors = _inputs_on_device(torch, workload, inputs, device)
    call, notes = _call(torch, workload, tensors, device)

    out = call()
    torch.cuda.synchronize()
    ok, rel_err = workload.check([out.cpu().numpy()], reference)

    # One call timed alone sizes the graph (its launch overhead makes this an over-estimate).
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / 1e3, 1e-7)
    out_bytes = sum(t.nbytes for t in workload.outputs)
    calls = max(1, min(MAX_GRAPH_CALLS, round(graph_batch_s / per_call), GRAPH_MEMORY_BYTES // max(out_bytes, 1)))

    def python_launch() -> None:
        call()

    launch, calls_per_launch, batching = python_launch, 1, "python"
    if use_graph:
        try:
            launch, calls_per_launch, batching = _graph(torch, call, calls).replay, calls, "cuda-graph"
        except Exception as exc:  # noqa: BLE001 - some torch builds/ops cannot be captured
            torch.cuda.synchronize()
            notes.append(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).strip()[:200]}); "
                         "one Python launch per call, so short kernels leave the GPU idle between calls")
    sync = torch.cuda.synchronize
    return VendorKernel(name=name, workload=workload, call=call, launch=launch,
                        calls_per_launch=calls_per_launch, sync=sync, batching=batching, ok=bool(ok),
                        rel_err=float(rel_err), notes=notes, _torch=torch)


def describe(kernel: VendorKernel) -> dict:
    """JSON-able facts about a prepared vendor kernel, for a measurement's details."""
    torch = kernel._torch
    return {
        "vendor": kernel.name,
        "torch": getattr(torch, "__version__", None),
        "batching": kernel.batching,
        "calls_per_launch": kernel.calls_per_launch,
        "notes": list(kernel.notes),
        "rel_err": kernel.rel_err,
        "checked": True,
        "prepared_at": time.time(),
    }
