"""Measuring kernels: the Backend interface (measurements.backend) and its implementations,
``nvml`` (a real GPU), ``sim`` (an analytic GPU) and ``replay`` (a recorded dataset)."""
from __future__ import annotations

from .backend import Backend, BackendError


def make_backend(name: str, gpu: str = "h100", **options) -> Backend:
    """``nvml``, ``sim``, ``replay:PATH`` (a recorded dataset), or ``auto`` (nvml when NVML finds a
    GPU, else sim)."""
    from .nvml_energy import nvml_available  # imported here: NVML is loaded only when asked for

    if name.startswith("replay:"):
        from .replay import ReplayBackend

        return ReplayBackend(name.removeprefix("replay:"), **options)
    if name == "auto":
        name = "nvml" if nvml_available() else "sim"
    if name == "sim":
        from .sim import SimBackend

        return SimBackend(gpu=gpu, **options)
    if name == "nvml":
        from .nvml_backend import NvmlBackend

        return NvmlBackend(**options)
    raise BackendError(f"unknown backend {name!r} (choose nvml, sim, replay:PATH or auto)")
