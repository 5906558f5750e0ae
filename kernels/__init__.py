"""Workloads: TVM PrimFuncs with numpy references, FLOP and byte counts, and the benchmark suite."""
from .attention import attention
from .gemm import gemm
from .library import KernelLibrary, LibraryError, load_library
from .registry import FAMILIES, as_workload, parse_spec
from .softmax import softmax
from .suite import SUITE_SPECS, suite
from .workload import TensorSpec, Workload, WorkloadError

__all__ = [
    "FAMILIES", "KernelLibrary", "LibraryError", "SUITE_SPECS", "TensorSpec", "Workload", "WorkloadError",
    "as_workload", "attention", "gemm", "load_library", "parse_spec", "softmax", "suite",
]
