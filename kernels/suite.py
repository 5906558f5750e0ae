"""The public benchmark suite of docs/design.md (fp16)."""
from __future__ import annotations

from .registry import parse_spec
from .workload import Workload

SUITE_SPECS: dict[str, str] = {
    "gemm-4096": "gemm:4096,4096,4096",
    "gemm-2048x11008x4096": "gemm:2048,11008,4096",
    "gemm-16x11008x4096": "gemm:16,11008,4096",
    "gemv-4096": "gemm:1,4096,4096",
    "softmax-4096x4096": "softmax:4096,4096",
    "softmax-65536x2048": "softmax:65536,2048",
    "softmax-32768x128": "softmax:32768,128",
    "attention-prefill-2048": "attention:1,32,2048,2048,128",
    "attention-prefill-2048-causal": "attention:1,32,2048,2048,128,causal",
    "attention-8x1024": "attention:8,32,1024,1024,128",
    "attention-decode-4096": "attention:8,32,1,4096,128",
}


def suite() -> dict[str, Workload]:
    """Suite workloads by name, in the order of docs/design.md."""
    return {name: parse_spec(spec) for name, spec in SUITE_SPECS.items()}
