"""GPU target presets: the numbers TVM needs to build, and the ones the roofline and sim need."""
from __future__ import annotations

import dataclasses


class TargetError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    name: str
    arch: str  # sm_90
    sm_count: int
    max_threads_per_block: int = 1024
    # Shared memory per block: static ``shared`` allocations are limited to 48 KiB (ptxas rejects
    # more); dynamic ``shared.dyn`` may go up to the opt-in limit (227 KiB on sm_90, 163 KiB on sm_80),
    # which TVM's CUDA runtime raises for every launch with dynamic shared memory
    # (cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)). The opt-in limit bounds
    # static and dynamic together.
    max_shared_memory_per_block: int = 227 * 1024
    max_static_shared_memory_per_block: int = 48 * 1024
    shared_memory_per_sm: int = 228 * 1024
    registers_per_block: int = 65536
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    warp_size: int = 32
    l2_bytes: int = 50 * 1024 * 1024
    memory_bytes: int = 80 * 10**9
    # Public datasheet rates (dense, no sparsity), used for rooflines and the simulated GPU.
    peak_fp16_tensor_flops: float = 989e12
    peak_fp32_flops: float = 67e12
    memory_bandwidth: float = 3.35e12
    tdp_w: float = 700.0
    idle_w: float = 73.0

    @property
    def compute_capability(self) -> tuple[int, int]:
        digits = self.arch.removeprefix("sm_").rstrip("a")
        return int(digits[:-1]), int(digits[-1])

    def tvm_target(self, dynamic_shared: bool = True):
        """TVM's target. Its ``max_shared_memory_per_block`` is what VerifyGPUCode checks (static and
        dynamic shared memory together): the opt-in limit, or with ``dynamic_shared=False`` (spaces
        that only allocate static shared memory) the static one."""
        from tvm.target import Target

        shared = self.max_shared_memory_per_block if dynamic_shared else self.max_static_shared_memory_per_block

        return Target(
            {
                "kind": "cuda",
                "arch": self.arch,
                "max_threads_per_block": self.max_threads_per_block,
                "max_num_threads": self.max_threads_per_block,
                "max_shared_memory_per_block": shared,
                "thread_warp_size": self.warp_size,
                "registers_per_block": self.registers_per_block,
                "l2_cache_size_bytes": self.l2_bytes,
            },
            Target({"kind": "llvm"}),
        )

    def with_shared_limit(self, kib: int | None) -> "GpuSpec":
        """This GPU with its per-block shared memory limit set to ``kib`` KiB (None: as it is); 48 gives
        the limit of static shared memory alone, as without the opt-in."""
        return self if kib is None else dataclasses.replace(self, max_shared_memory_per_block=kib * 1024)

    def roofline_seconds(self, flops: float, nbytes: float, tensor_cores: bool = True) -> float:
        peak = self.peak_fp16_tensor_flops if tensor_cores else self.peak_fp32_flops
        return max(flops / peak, nbytes / self.memory_bandwidth)


# Passes of TVM's TIR pipeline that etune turns on wherever it lowers or builds (analysis, builds,
# exports), so that what sim analyses is what nvcc compiles: cp.async for software pipelines with
# async stages (the ``mma`` rule set). Kernels without such pipelines are unaffected.
PASS_CONFIG = {"tirx.use_async_copy": True}


PRESETS: dict[str, GpuSpec] = {
    "h100": GpuSpec(name="NVIDIA H100 80GB HBM3", arch="sm_90", sm_count=132),
    # The H100's chip with HBM3e: the same SMs, clocks and power cap, 141 GB at 4.8 TB/s (datasheet).
    # PyTorch reports 60 MiB of L2 on the H200 machines lent to this project (50 MiB on an H100).
    "h200": GpuSpec(name="NVIDIA H200", arch="sm_90", sm_count=132, memory_bandwidth=4.8e12,
                    memory_bytes=141 * 10**9, l2_bytes=60 * 1024 * 1024),
    "a100": GpuSpec(
        name="NVIDIA A100-SXM4-80GB",
        arch="sm_80",
        sm_count=108,
        shared_memory_per_sm=164 * 1024,
        max_shared_memory_per_block=163 * 1024,
        l2_bytes=40 * 1024 * 1024,
        peak_fp16_tensor_flops=312e12,
        peak_fp32_flops=19.5e12,
        memory_bandwidth=2.04e12,
        memory_bytes=80 * 10**9,
        tdp_w=400.0,
        idle_w=55.0,
    ),
}

# Known boards by the name NVML reports, for the local-GPU preset.
_BY_NVML_NAME = {"h100": "h100", "h200": "h200", "a100": "a100"}


def local_gpu(index: int = 0) -> GpuSpec | None:
    """A preset for the GPU NVML sees, or None without NVML or GPU.

    The compute capability comes from NVML; rates come from the closest known board, else from the
    H100 preset scaled by SM count (labelled in the name so nobody mistakes it for a datasheet).
    """
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    arch = f"sm_{major}{minor}"
    for key, preset in _BY_NVML_NAME.items():
        if key in name.lower() and PRESETS[preset].arch == arch:
            return dataclasses.replace(PRESETS[preset], name=name)
    return dataclasses.replace(PRESETS["h100"], name=f"{name} (rates assumed from the H100 preset)", arch=arch)


def gpu_spec(name: str = "h100") -> GpuSpec:
    """A preset by name: h100, h200, a100, or 'local' for the GPU NVML finds."""
    key = name.lower()
    if key == "local":
        spec = local_gpu()
        if spec is None:
            raise TargetError("target 'local' needs an NVIDIA GPU visible to NVML; none was found")
        return spec
    if key not in PRESETS:
        raise TargetError(f"unknown GPU target {name!r}; known: {', '.join(PRESETS)}, local")
    return PRESETS[key]
