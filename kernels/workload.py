"""The Workload: one kernel at one shape, as a TVM PrimFunc with a numpy reference."""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import numpy as np

# Bounds on sizes, checked when a workload is made (so at parse time, before any target is chosen).
# The kernels index tensors with int32, so no dimension and no tensor may exceed 2**31 - 1 elements.
MAX_ELEMENTS = 2**31 - 1
# Every tensor a workload keeps in GPU memory must fit at once. A spec is parsed before a target is
# chosen, so the bound is the largest GPU memory etune targets (the H200's 141 GB); parse_spec takes
# a tighter one from a caller that knows its GPU.
MAX_MEMORY_BYTES = 141 * 10**9
MAX_MEMORY_NAME = "H200"


class WorkloadError(ValueError):
    """A workload was asked for with bad parameters or a spec that does not parse."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def elements(self) -> int:
        return math.prod(self.shape)  # Python integers: np.prod would wrap around at 2**63

    @property
    def nbytes(self) -> int:
        return self.elements * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class Workload:
    """A kernel at one shape.

    ``spec`` is the canonical text form (``gemm:4096,4096,4096``) that the registry parses back to an
    equal workload; it is the key of the workload in records and reports.
    """

    family: str
    spec: str
    params: dict
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    flops: int
    # Each input read once and each output written once: the floor of the memory traffic.
    min_bytes: int
    # Relative L2 error ||out - ref|| / ||ref|| allowed when checking an output (see each family).
    rel_tolerance: float
    build_prim_func: Callable[[], object] = dataclasses.field(repr=False, compare=False)
    reference_fn: Callable[..., Sequence[np.ndarray]] = dataclasses.field(repr=False, compare=False)
    # Intermediate tensors the module keeps in GPU memory between its kernels (attention's scores).
    scratch: tuple[TensorSpec, ...] = ()

    def __post_init__(self):
        for t in self.inputs + self.outputs + self.scratch:
            if t.elements > MAX_ELEMENTS:
                raise WorkloadError(f"{self.spec}: {t.name} would hold {t.elements} elements; etune's kernels "
                                    f"index with int32, so at most {MAX_ELEMENTS}")
        self.check_memory(MAX_MEMORY_BYTES, MAX_MEMORY_NAME)

    @property
    def memory_bytes(self) -> int:
        """GPU memory the workload's tensors take at once (arguments and intermediates)."""
        return sum(t.nbytes for t in self.inputs + self.outputs + self.scratch)

    def check_memory(self, memory_bytes: int, gpu: str = "the GPU") -> None:
        if self.memory_bytes > memory_bytes:
            raise WorkloadError(f"{self.spec}: its tensors need {self.memory_bytes / 1e9:.3g} GB of GPU memory, "
                                f"more than the {memory_bytes / 1e9:.3g} GB of {gpu}")

    @functools.cached_property
    def prim_func(self):
        return self.build_prim_func()

    def ir_module(self):
        import tvm

        return tvm.IRModule({"main": self.prim_func})

    @property
    def args(self) -> tuple[TensorSpec, ...]:
        """Arguments of the PrimFunc in call order: inputs then outputs."""
        return self.inputs + self.outputs

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Random, never constant, data: GEMM power depends on the values (docs/design.md)."""
        rng = np.random.default_rng(seed)
        return [rng.uniform(-1.0, 1.0, size=t.shape).astype(t.dtype) for t in self.inputs]

    def reference(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return list(self.reference_fn(*inputs))

    def check(self, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> tuple[bool, float]:
        """(ok, worst relative L2 error) of outputs against reference outputs; NaN never passes."""
        worst = 0.0
        for out, ref in zip(outputs, reference, strict=True):
            out64 = np.asarray(out, dtype=np.float64)
            ref64 = np.asarray(ref, dtype=np.float64)
            if out64.shape != ref64.shape or not np.all(np.isfinite(out64)):
                return False, float("inf")
            err = np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-30)
            worst = max(worst, float(err))
        return worst <= self.rel_tolerance, worst

    def __str__(self) -> str:
        return self.spec


def positive_ints(family: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise WorkloadError(f"{family}: {name} must be a positive integer, got {value!r}")
        if value > MAX_ELEMENTS:
            raise WorkloadError(f"{family}: {name}={value} is too large (at most {MAX_ELEMENTS}: etune's kernels "
                                "index with int32)")


def check_dtype(family: str, what: str, dtype: str, allowed: Sequence[str]) -> None:
    if dtype not in allowed:
        raise WorkloadError(f"{family}: unknown {what} {dtype!r}; expected one of {', '.join(allowed)}")
