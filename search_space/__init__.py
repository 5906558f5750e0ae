"""Schedule spaces for CUDA GPUs: targets, MetaSchedule design spaces, sampling, mutation, crossover,
validity checks and parallel builds."""
from .analysis import KernelLaunch, kernel_launches, launch_problem
from .build import Builder, BuildError, BuildResult, KernelResources, success_rate
from .space import Candidate, DesignSpace, SamplingError, ScheduleSpace
from .targets import PRESETS, GpuSpec, TargetError, gpu_spec, local_gpu

__all__ = [
    "Builder", "BuildError", "BuildResult", "Candidate", "DesignSpace", "GpuSpec", "KernelLaunch",
    "KernelResources", "PRESETS", "SamplingError", "ScheduleSpace", "TargetError", "gpu_spec",
    "kernel_launches", "launch_problem", "local_gpu", "success_rate",
]
