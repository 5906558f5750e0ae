"""Workload specs on the command line: ``family:positional,...[,flag][,key=value]``.

    gemm:4096,4096,4096                  gemm:1,4096,4096,accumulate=float16
    softmax:4096,4096                    attention:1,32,2048,2048,128,causal
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from .attention import attention
from .gemm import gemm
from .softmax import softmax
from .workload import Workload, WorkloadError


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    make: Callable[..., Workload]
    positional: tuple[str, ...]
    flags: tuple[str, ...] = ()
    options: tuple[str, ...] = ()

    @property
    def usage(self) -> str:
        parts = list(self.positional) + [f"[{f}]" for f in self.flags] + [f"[{o}=...]" for o in self.options]
        return f"{self.name}:{','.join(parts)}"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gemm", gemm, ("M", "N", "K"), options=("accumulate", "dtype")),
        Family("softmax", softmax, ("rows", "cols"), options=("dtype",)),
        Family(
            "attention",
            attention,
            ("batch", "heads", "q_len", "kv_len", "head_dim"),
            flags=("causal",),
            options=("dtype",),
        ),
    )
}


# ASCII digits only: int() also takes "+1_6", full-width and other Unicode digits.
_SIZE = re.compile(r"[0-9]+")


def parse_spec(spec: str, memory_bytes: int | None = None) -> Workload:
    """The workload a spec names; raises WorkloadError with one readable line otherwise.

    Its tensors must fit ``memory_bytes`` of GPU memory; without it, the largest GPU etune knows
    (``workload.MAX_MEMORY_BYTES``: a spec is parsed before any target is chosen)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise WorkloadError(
            f"cannot parse workload {spec!r}: expected FAMILY:SIZES, e.g. gemm:4096,4096,4096 "
            f"(families: {', '.join(FAMILIES)})"
        )
    name, _, rest = spec.strip().partition(":")
    family = FAMILIES.get(name.strip().lower())
    if family is None:
        raise WorkloadError(f"unknown kernel family {name!r} in {spec!r}; known: {', '.join(FAMILIES)}")
    tokens = [t.strip() for t in rest.split(",")] if rest.strip() else []
    sizes: list[int] = []
    kwargs: dict[str, object] = {}
    for token in tokens:
        if not token:
            raise WorkloadError(f"empty field in {spec!r}; usage: {family.usage}")
        if "=" in token:
            key, _, value = token.partition("=")
            if key not in family.options:
                raise WorkloadError(f"unknown option {key!r} in {spec!r}; usage: {family.usage}")
            kwargs[key] = value
        elif token in family.flags:
            kwargs[token] = True
        elif kwargs:
            raise WorkloadError(f"sizes must come before flags and options in {spec!r}; usage: {family.usage}")
        elif _SIZE.fullmatch(token):
            sizes.append(int(token))
        else:
            raise WorkloadError(f"{token!r} in {spec!r} is not an integer size (a positive integer in digits 0-9); usage: {family.usage}")
    if len(sizes) != len(family.positional):
        raise WorkloadError(
            f"{family.name} needs {len(family.positional)} sizes ({', '.join(family.positional)}), "
            f"got {len(sizes)} in {spec!r}; usage: {family.usage}"
        )
    workload = family.make(*sizes, **kwargs)
    if memory_bytes is not None:
        workload.check_memory(memory_bytes)
    return workload


def as_workload(value: Workload | str) -> Workload:
    return value if isinstance(value, Workload) else parse_spec(value)
