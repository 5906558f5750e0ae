"""Exported kernel libraries (``etune export``): load one and call its kernels.

    from etune.kernels import load_library

    lib = load_library("out/kernels")              # manifest.json + libetune_kernels.so
    gemm = lib["gemm:4096,4096,4096"]              # or lib.gemm_4096_4096_4096
    gemm(a, b, c)                                  # destination-passing: c is written
    c = gemm.run(a, b)                             # outputs allocated with PyTorch

Arguments are PyTorch or CuPy tensors, or anything else with ``__dlpack__`` (TVM tensors included),
inputs first then outputs, exactly as the manifest lists them. Every call checks the count, shape,
dtype, contiguity and device (CUDA, one device for all) of the arguments before anything is launched,
and a mismatch raises LibraryError naming the argument. The tensors reach TVM through DLPack with no
copy; PyTorch tensors run on PyTorch's current stream.

A library exported on a host without a CUDA-enabled TVM holds CUDA source, not a binary
(``"runnable": false`` in its manifest): loading it says so. Export it again on a GPU host.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping

MANIFEST_FILE = "manifest.json"
FORMAT = "etune-kernel-library"
FORMAT_VERSION = 1

# DLPack device types (dlpack.h DLDeviceType)
_DLPACK_DEVICES = {1: "cpu", 2: "cuda", 3: "cuda_host", 4: "opencl", 7: "vulkan", 8: "metal", 9: "vpi",
                   10: "rocm", 11: "rocm_host", 12: "ext_dev", 13: "cuda_managed", 14: "oneapi", 15: "webgpu",
                   16: "hexagon"}
_CUDA_DEVICE_TYPES = (2, 13)  # device memory and managed memory are both addressable by a kernel


class LibraryError(RuntimeError):
    """A kernel library cannot be loaded, or a kernel was called with the wrong arguments."""


class UnknownKernelError(LibraryError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


# -- the manifest ------------------------------------------------------------------------------------
def _bad(path, where: str, what: str, value: Any) -> LibraryError:
    return LibraryError(f"{path}: {where} must be {what}, got {value!r}")


def _check_tensors(path, where: str, value) -> None:
    if not isinstance(value, list):
        raise _bad(path, where, "a list", value)
    for i, t in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise _bad(path, here, "an object with name, shape, dtype", t)
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise _bad(path, f"{here}.name", "a string", t.get("name"))
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise _bad(path, f"{here}.shape", "a list of non-negative integers", shape)
        if not isinstance(t.get("dtype"), str) or not t["dtype"]:
            raise _bad(path, f"{here}.dtype", "a dtype name like 'float16'", t.get("dtype"))


def _confined(path, directory: Path, where: str, value: Any) -> Path:
    """``directory / value`` for a manifest's relative path that stays inside the library folder
    (no absolute path, no ``..``, no symbolic link out of it); LibraryError otherwise."""
    if not isinstance(value, str) or not value:
        raise _bad(path, where, "a file name", value)
    relative = PurePosixPath(value)
    target = directory / relative
    if (relative.is_absolute() or "\\" in value or ".." in relative.parts
            or not target.resolve().is_relative_to(directory.resolve())):
        raise LibraryError(f"{path}: {where} {value!r} points outside the library folder {directory}")
    return target


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an exported library, checked; LibraryError with one line if it is not one."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LibraryError(f"no kernel library at {directory}: not a directory")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise LibraryError(f"{directory} is not an etune kernel library: {MANIFEST_FILE} is missing "
                           "(make one with etune export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LibraryError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LibraryError(f"{path} is not an etune kernel library manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LibraryError(f"{path} has format version {version!r}; this etune reads up to {FORMAT_VERSION}: "
                           "upgrade etune")
    _confined(path, directory, "library", manifest.get("library"))
    if not isinstance(manifest.get("runnable"), bool):
        raise _bad(path, "runnable", "true or false", manifest.get("runnable"))
    kernels = manifest.get("kernels")
    if not isinstance(kernels, list) or not kernels:
        raise _bad(path, "kernels", "a non-empty list", kernels)
    names = set()
    for i, k in enumerate(kernels):
        if not isinstance(k, dict):
            raise _bad(path, f"kernels[{i}]", "an object", k)
        name = k.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _bad(path, f"kernels[{i}].name", "an identifier", name)
        if name in names:
            raise LibraryError(f"{path}: two kernels are named {name!r}")
        names.add(name)
        if not isinstance(k.get("spec"), str):
            raise _bad(path, f"kernels[{i}].spec", "a workload spec", k.get("spec"))
        if "source" in k:
            _confined(path, directory, f"kernels[{i}].source", k["source"])
        _check_tensors(path, f"kernels[{i}].inputs", k.get("inputs"))
        _check_tensors(path, f"kernels[{i}].outputs", k.get("outputs"))
        if not k["outputs"]:
            raise _bad(path, f"kernels[{i}].outputs", "a non-empty list", k["outputs"])
    return manifest


# -- arguments -----------------------------------------------------------------------------------------
def _dtype_name(dtype: Any) -> str:
    text = str(dtype)
    return text.removeprefix("torch.")


def _contiguous(arg: Any) -> bool | None:
    is_contiguous = getattr(arg, "is_contiguous", None)  # torch
    if callable(is_contiguous):
        try:
            return bool(is_contiguous())
        except Exception:
            return None
    flags = getattr(arg, "flags", None)  # numpy, cupy
    if flags is not None:
        try:
            return bool(flags["C_CONTIGUOUS"])
        except Exception:
            return None
    return None


def _device(arg: Any) -> tuple[int, int] | None:
    get = getattr(arg, "__dlpack_device__", None)
    if get is None:
        return None
    try:
        kind, index = get()
        return int(kind), int(index)
    except Exception:
        return None


def _device_text(device: tuple[int, int] | None) -> str:
    if device is None:
        return "an unknown device"
    return f"{_DLPACK_DEVICES.get(device[0], f'device type {device[0]}')}:{device[1]}"


class Kernel:
    """One function of a library: ``kernel(*inputs, *outputs)`` writes the outputs."""

    def __init__(self, entry: dict, function: Callable | None):
        self.entry = entry
        self.name: str = entry["name"]
        self.spec: str = entry["spec"]
        self.inputs: list[dict] = entry["inputs"]
        self.outputs: list[dict] = entry["outputs"]
        self._function = function

    # what the manifest says
    @property
    def latency_s(self) -> float | None:
        return self.entry.get("latency_s")

    @property
    def energy_j(self) -> float | None:
        return self.entry.get("energy_j")

    @property
    def simulated(self) -> bool:
        return bool(self.entry.get("simulated"))

    @property
    def signature(self) -> str:
        def fmt(t):
            return f"{t['name']}: {t['dtype']}[{', '.join(map(str, t['shape']))}]"

        return (f"{self.name}({', '.join(fmt(t) for t in self.inputs)} -> "
                f"{', '.join(fmt(t) for t in self.outputs)})")

    def __repr__(self) -> str:
        return f"<etune kernel {self.signature} for {self.spec}>"

    # calling
    def check_args(self, args) -> None:
        """Raises LibraryError naming the first argument that does not fit the kernel."""
        expected = self.inputs + self.outputs
        if len(args) != len(expected):
            raise LibraryError(
                f"{self.name} takes {len(expected)} arguments (inputs {', '.join(t['name'] for t in self.inputs)}, "
                f"then outputs {', '.join(t['name'] for t in self.outputs)}), got {len(args)}")
        cuda_index = None
        for position, (arg, want) in enumerate(zip(args, expected)):
            role = "input" if position < len(self.inputs) else "output"
            label = f"{self.name}: {role} {want['name']} (argument {position + 1})"
            if not hasattr(arg, "__dlpack__") or not hasattr(arg, "shape") or not hasattr(arg, "dtype"):
                raise LibraryError(f"{label}: expected a tensor (PyTorch, CuPy or anything with __dlpack__), "
                                   f"got {type(arg).__name__}")
            try:
                shape = tuple(int(d) for d in arg.shape)
            except (TypeError, ValueError):
                raise LibraryError(f"{label}: cannot read its shape {arg.shape!r}") from None
            if shape != tuple(want["shape"]):
                raise LibraryError(f"{label}: shape {shape} but the kernel was built for {tuple(want['shape'])}")
            dtype = _dtype_name(arg.dtype)
            if dtype != want["dtype"]:
                raise LibraryError(f"{label}: dtype {dtype} but the kernel was built for {want['dtype']}")
            device = _device(arg)
            if device is None or device[0] not in _CUDA_DEVICE_TYPES:
                raise LibraryError(f"{label}: is on {_device_text(device)}; the kernel runs on a CUDA GPU and "
                                   "needs a CUDA tensor (e.g. tensor.cuda())")
            if cuda_index is None:
                cuda_index = device[1]
            elif device[1] != cuda_index:
                raise LibraryError(f"{label}: is on cuda:{device[1]} but the earlier arguments are on "
                                   f"cuda:{cuda_index}; all arguments must be on one GPU")
            if _contiguous(arg) is False:
                raise LibraryError(f"{label}: is not contiguous; the kernel needs a dense row-major tensor "
                                   "(e.g. tensor.contiguous())")
            if role == "output" and getattr(arg, "requires_grad", False):
                raise LibraryError(f"{label}: requires grad; pass a tensor without autograd (tensor.detach())")

    def __call__(self, *args) -> None:
        self.check_args(args)
        if self._function is None:
            raise LibraryError(f"{self.name} is not loaded (the library was read without its binary)")
        self._function(*args)

    def run(self, *inputs):
        """Allocates the outputs with PyTorch on the inputs' device, calls the kernel and returns the
        output (a tuple when there are several)."""
        try:
            import torch
        except ImportError:
            raise LibraryError(f"{self.name}.run allocates outputs with PyTorch, which is not installed; "
                               "pass the outputs yourself: kernel(*inputs, *outputs)") from None
        if len(inputs) != len(self.inputs):
            raise LibraryError(f"{self.name}.run takes the {len(self.inputs)} inputs "
                               f"({', '.join(t['name'] for t in self.inputs)}), got {len(inputs)}")
        if not inputs or not isinstance(inputs[0], torch.Tensor):
            raise LibraryError(f"{self.name}.run allocates its outputs with PyTorch and needs PyTorch inputs; "
                               "with other tensors pass the outputs yourself: kernel(*inputs, *outputs)")
        outputs = [torch.empty(tuple(t["shape"]), dtype=getattr(torch, t["dtype"]), device=inputs[0].device)
                   for t in self.outputs]
        self(*inputs, *outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


class KernelLibrary:
    """The kernels of an exported library, by function name (attribute or ``lib[name]``) or spec."""

    def __init__(self, manifest: dict, functions: Mapping[str, Callable] | None = None,
                 directory: str | Path | None = None, module: Any = None):
        self.manifest = manifest
        self.directory = Path(directory) if directory is not None else None
        self._module = module  # keeps the loaded TVM module alive
        functions = functions or {}
        self._kernels = {k["name"]: Kernel(k, functions.get(k["name"])) for k in manifest["kernels"]}
        self._by_spec = {k.spec: k for k in self._kernels.values()}

    @property
    def simulated(self) -> bool:
        return bool(self.manifest.get("simulated"))

    @property
    def runnable(self) -> bool:
        return bool(self.manifest.get("runnable"))

    @property
    def names(self) -> list[str]:
        return list(self._kernels)

    def __getitem__(self, key: str) -> Kernel:
        if key in self._kernels:
            return self._kernels[key]
        if key in self._by_spec:
            return self._by_spec[key]
        try:  # a spec written differently: gemm:64, 64, 64
            from .registry import parse_spec

            canonical = parse_spec(key).spec
        except Exception:
            canonical = None
        if canonical in self._by_spec:
            return self._by_spec[canonical]
        raise UnknownKernelError(f"no kernel {key!r} in this library; it has: "
                                 + ", ".join(f"{k.name} ({k.spec})" for k in self._kernels.values()))

    def __getattr__(self, name: str) -> Kernel:
        kernels = self.__dict__.get("_kernels")
        if kernels is not None and name in kernels:
            return kernels[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or kernel {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._kernels))

    def __contains__(self, key: object) -> bool:
        try:
            self[key]  # type: ignore[index]
            return True
        except (LibraryError, TypeError):
            return False

    def __iter__(self) -> Iterator[Kernel]:
        return iter(self._kernels.values())

    def __len__(self) -> int:
        return len(self._kernels)

    def __repr__(self) -> str:
        where = f" at {self.directory}" if self.directory else ""
        return f"<etune KernelLibrary{where}: {', '.join(self._kernels)}>"


def _reason(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    return lines[-1] if lines else type(exc).__name__


def load_library(directory: str | Path) -> KernelLibrary:
    """The library exported into ``directory`` by ``etune export``, ready to call on the GPU.

    Raises LibraryError (one line) when the manifest is missing or invalid, the library was exported
    without a CUDA-enabled TVM (``"runnable": false``), this TVM has no CUDA runtime, or the shared
    library cannot be loaded or lacks a kernel the manifest lists.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["runnable"]:
        raise LibraryError(
            f"{directory} cannot run: it was exported with a TVM without a CUDA runtime, so the library "
            "holds CUDA source, not a compiled binary. Export it again (etune export) on a GPU host with a "
            "CUDA-enabled TVM.")
    path = directory / manifest["library"]  # inside the folder: read_manifest checked it
    if not path.is_file():
        raise LibraryError(f"{path} is missing (the manifest lists it)")
    import tvm

    if not tvm.runtime.enabled("cuda"):
        raise LibraryError(f"this TVM ({tvm.__version__}) has no CUDA runtime; loading {path} needs a "
                           "CUDA-enabled TVM")
    try:
        module = tvm.runtime.load_module(str(path))
    except Exception as exc:
        raise LibraryError(f"cannot load {path} (exported with TVM {manifest.get('tvm_version', '?')}, this is "
                           f"{tvm.__version__}): {_reason(exc)}") from None
    functions = {}
    for entry in manifest["kernels"]:
        try:
            function = module.get_function(entry["name"])
        except Exception:
            function = None
        if function is None:
            raise LibraryError(f"{path} has no function {entry['name']!r} although the manifest lists it")
        functions[entry["name"]] = function
    return KernelLibrary(manifest, functions, directory, module)
