"""MetaSchedule schedule rules for CUDA, spelled out so etune can fix what TVM 0.27's defaults break.

Five rule sets, each a family of design spaces for the workloads it applies to:
- ``tensorcore``: TVM's DefaultCUDATensorCore, except that the wmma accumulator is staged through
  *static* shared memory. With the default ("shared.dyn" for loads and the store), the pass that merges
  dynamic shared allocations types the merged pool with the first buffer's element type (fp16), and the
  fp32 accumulator store then fails to build ("tvm_access_ptr element type must match the source
  buffer"): 13 of 16 sampled fp32-accumulate GEMM candidates at 1024^3 failed that way, 0 of 16 with the
  static store.
- ``simt``: TVM's DefaultCUDA (no tensor cores). Kept as a separate space because its energy profile
  differs from the tensor-core one, which is exactly what an energy search wants to see.
- ``fused``: attention only. Not a rule set over the workload's TE chain but over etune's fused TIR
  templates (kernels/attention_fused.py: split-KV decode, flash prefill), which carry a
  ``schedule_rule`` annotation: ApplyCustomRule calls etune's rules (search_space/attention_rules.py)
  and nothing else touches them.
- ``splitk``: GEMV and skinny GEMM (M <= 4) only: K split across lanes and blocks
  (``search_space.splitk``), which MetaSchedule's own rules never do for these shapes.
- ``rowsoftmax``: softmax only, over etune's row-softmax templates (kernels/softmax_fused.py) like
  ``fused``: the row in registers with 16-byte vectors, a warp or a block per row, and rows split
  across blocks (``search_space.softmax_rules``).
"""
from __future__ import annotations

import importlib
import inspect
import sys

from tvm.s_tir.meta_schedule import schedule_rule as sr

from . import splitk

RULE_SETS = ("tensorcore", "simt", "fused", "splitk", "rowsoftmax")


def rule_set_applies(rule_set: str, workload) -> bool:
    """Whether a rule set gives a design space of its own for ``workload``."""
    if rule_set == "splitk":
        return splitk.applies(workload)
    if rule_set == "rowsoftmax":
        return workload.family == "softmax"
    return True


def _generic_rules(cross_thread_reduction: bool = True) -> list:
    """The rules DefaultCUDA applies after multi-level tiling (inline, reductions, unroll, binding)."""
    rules = [
        sr.InlineConstantScalars(),
        sr.AutoInline(
            into_producer=True,
            into_consumer=True,
            inline_const_tensor=True,
            disallow_if_then_else=False,
            require_injective=False,
            require_ordered=False,
            disallow_op=None,
        ),
        sr.CrossThreadReduction(thread_extents=[4, 8, 16, 32, 64, 128, 256, 512]),
        sr.ParallelizeVectorizeUnroll(
            max_jobs_per_core=-1, max_vectorize_extent=-1, unroll_max_steps=[0, 16, 64, 512, 1024], unroll_explicit=True
        ),
        sr.AutoBind(max_threadblocks=256, thread_extents=[32, 64, 128, 256, 512, 1024]),
    ]
    if not cross_thread_reduction:
        rules = [r for r in rules if not isinstance(r, sr.CrossThreadReduction)]
    return rules


def _simt_tiling():
    return sr.MultiLevelTiling(
        structure="SSSRRSRS",
        tile_binds=["blockIdx.x", "vthread.x", "threadIdx.x"],
        max_innermost_factor=64,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=sr.ReuseType(req="must", levels=[4], scope="shared"),
        reuse_write=sr.ReuseType(req="must", levels=[3], scope="local"),
    )


def tensor_intrinsics():
    """TVM's CUDA tensor-intrinsic module, which registers every wmma/mma intrinsic.

    Imported on first use, not with this package: build workers must not pay for it. Its import
    parses ~500 TVMScript functions, and each ``T.prim_func`` calls ``inspect.stack()``, which reads
    the source of every frame on the stack, and for a frame without a file (the import machinery's)
    it scans all of ``sys.modules``: 17 s in a bare process, minutes in one with pandas and xgboost
    loaded. TVM only ever looks at the source line of the third frame (``is_defined_in_class``), so
    during the import the frames below it are listed without source.
    """
    module = sys.modules.get("tvm.s_tir.tensor_intrin.cuda")
    if module is not None:
        return module
    original = inspect.stack

    def shallow_stack(context: int = 1):
        infos, frame = [], sys._getframe(1)
        while frame is not None:
            if len(infos) < 3:
                tb = inspect.getframeinfo(frame, context)
                infos.append(inspect.FrameInfo(frame, *tb, positions=tb.positions))
            else:  # no getframeinfo: for "<frozen importlib...>" frames it scans sys.modules
                code = frame.f_code
                infos.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None))
            frame = frame.f_back
        return infos

    inspect.stack = shallow_stack
    try:
        return importlib.import_module("tvm.s_tir.tensor_intrin.cuda")
    finally:
        inspect.stack = original


def _wmma_tiling():
    get_wmma_intrin_group = tensor_intrinsics().get_wmma_intrin_group

    groups = [
        get_wmma_intrin_group(
            load_scope="shared.dyn", store_scope="shared", in_dtype="float16", out_dtype=out, trans_b=trans_b
        )
        for out in ("float32", "float16")
        for trans_b in (False, True)
    ]
    return sr.MultiLevelTilingTensorCore(
        intrin_groups=groups,
        structure="SSSRRSRS",
        tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"],
        max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=sr.ReuseType(req="must", levels=[4], scope="shared.dyn"),
        reuse_write=sr.ReuseType(req="must", levels=[2], scope="shared"),
        use_software_pipeline=False,
    )


def postprocs(rule_set: str, kind: str):
    """The postprocessors of a rule set: TVM's defaults for ``kind``, except that ``fused`` drops
    RewriteUnboundBlock. The fused rules bind every block themselves, and that postprocessor aborts
    ("blockIdx is bound but threadIdx is not") on the prefill template's granule block, whose threads
    are bound inside it."""
    from tvm.s_tir.meta_schedule.postproc import Postproc

    if rule_set != "fused":
        return kind
    return [p for p in Postproc.create(kind) if type(p).__name__ != "RewriteUnboundBlock"]


def schedule_rules(rule_set: str, cross_thread_reduction: bool = True) -> list:
    """The rules of a rule set. ``cross_thread_reduction=False`` drops the rule that, in TVM 0.27,
    aborts design-space generation for multi-block modules such as attention ("Unable to get the
    extent of threadIdx.x" when an earlier block was fused into a reduction without a thread binding)."""
    generic = _generic_rules(cross_thread_reduction)
    if rule_set == "tensorcore":
        return [sr.ApplyCustomRule(), _wmma_tiling(), _simt_tiling(), *generic]
    if rule_set == "simt":
        return [sr.ApplyCustomRule(), _simt_tiling(), *generic]
    if rule_set == "fused":
        from .attention_rules import register

        register()
        tensor_intrinsics()  # TuneContext imports it otherwise, without the fast path
        return [sr.ApplyCustomRule()]
    if rule_set == "splitk":
        # The rule schedules the reduction and its epilogue completely; nothing else is left to bind.
        return [splitk.SplitKRule()]
    if rule_set == "rowsoftmax":
        from .softmax_rules import register

        register()
        tensor_intrinsics()  # TuneContext imports it otherwise, without the fast path (~30 s)
        return [sr.ApplyCustomRule()]
    raise ValueError(f"unknown rule set {rule_set!r}; known: {', '.join(RULE_SETS)}")
