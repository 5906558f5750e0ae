"""MetaSchedule schedule rules for CUDA, spelled out so etune can fix what TVM 0.27's defaults break.

Ten rule sets, each a family of design spaces for the workloads it applies to:
- ``tensorcore``: TVM's DefaultCUDATensorCore, except that the wmma accumulator is staged through
  *static* shared memory. With the default ("shared.dyn" for loads and the store), the pass that merges
  dynamic shared allocations types the merged pool with the first buffer's element type (fp16), and the
  fp32 accumulator store then fails to build ("tvm_access_ptr element type must match the source
  buffer"): 13 of 16 sampled fp32-accumulate GEMM candidates at 1024^3 failed that way, 0 of 16 with the
  static store.
- ``mma``: fp16 GEMM with M and N multiples of 32 only (``rule_set_applies``): TVM's
  MultiLevelTilingTensorCore with its mma.sync path (ldmatrix into
  registers, ``mma.sync.m16n8k8``, the accumulator in registers stored straight to global memory, so
  the shared.dyn pitfall above cannot arise) and software pipelining: A and B tiles copied with
  cp.async into ``shared.dyn`` buffers (up to the opt-in limit, 227 KiB on sm_90), S - 1 tiles ahead
  of the tensor cores, S = 2, 3 or 4 (``PIPELINE_STAGES``), and fragments one k-step ahead. TVM's
  rule fixes S = 3 with constant annotations (no trace instruction turns a sampled integer into the
  stage array), so each S is a design space of its own (``pipeline_variants``); sampling takes the
  design spaces in turn, so S is drawn like any other choice, but mutation keeps it. TVM's
  ``get_mma_intrin_group`` (m16n8k16 ldmatrix/mma intrinsics with ``warp``-scope fragments) does not
  fit this rule: the rule takes its mma path only for compute intrinsics named ``mma_sync*`` and
  handles the others as wmma, and with that group it gives no tensorized design space at all (tried
  on gemm 512^3: three SIMT sketches). So the m16n8k8 group TVM registers for the rule is used.
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
- ``splitk_tc``: skinny fp16 GEMM (2 <= M <= 31) only, over etune's tensor-core split-K templates
  (kernels/gemm_splitk.py: K cut into S chunks, a batched matmul over the chunks writing S x M x N fp32
  partials, then a merge kernel; S = 1 the plain GEMM in one kernel), one per S. The ``tensorcore``
  rules tile them (the chunk loop is a spatial loop: blocks over S x N tiles); ``mma`` cannot, its
  tiling takes no batch loop ("The MMA tensor core only supports SSR loops now"). TVM's wmma software
  pipeline is turned into cp.async stages (``pipeline_variants``): on sim, gemm:16,11008,4096 is
  latency-bound without it (best of 32: 44.6 us, 20.4 mJ, 1.03x the vendor stand-in's energy) and
  DRAM-bound with it (best of 32: 40.9 us, 16.4 mJ, 0.83x; ``tensorcore``: 61.0 us, 1.16x).
- ``flash_mma``: attention prefill in fp16 with head_dim a multiple of 16, over etune's thread-level
  FlashAttention-2 templates (kernels/attention_mma.py: S, P and O in mma.sync register fragments),
  one per (warps, row tiles per warp, key tile, cp.async stages). Each template is already a complete
  schedule (threads bound, fragments laid out by hand), so its design space is one point: the
  choices are the templates, which sampling takes in turn. No rule touches them.
- ``gemm_mma``: fp16 GEMM with fp32 accumulation, N and K multiples of 8, over etune's thread-level
  mma.sync GEMM templates (kernels/gemm_mma.py: m16n8k16, A and B by cp.async and ldmatrix): for
  M >= 32 64x64-class warp tiles in registers, one template per (block tile, warp grid, stages);
  for 2 <= M <= 32 K split across a block's warps and summed through shared memory, one kernel,
  one template per (columns per block, warps, stages). One point each, as ``flash_mma``.
- ``gemm_wgmma``: fp16 GEMM with fp32 accumulation, M >= 64, N and K multiples of 8, on sm_90 targets
  only, over etune's thread-level Hopper templates (kernels/gemm_wgmma.py: ``wgmma.mma_async``
  m64nNk16 with A and B from shared memory through matrix descriptors, cp.async stages), one
  template per (block tile, warpgroups, stages), built for sm_90a. One point each, as ``gemm_mma``.
"""
from __future__ import annotations

import importlib
import inspect
import sys

from tvm.s_tir.meta_schedule import schedule_rule as sr

from etune.kernels import attention_mma, gemm_mma, gemm_splitk, gemm_wgmma

from . import splitk

RULE_SETS = ("tensorcore", "mma", "simt", "fused", "splitk", "rowsoftmax", "splitk_tc", "flash_mma", "gemm_mma",
             "gemm_wgmma")
# Rule sets over thread-level templates: complete schedules, each a design space of one point.
THREAD_LEVEL_RULE_SETS = ("flash_mma", "gemm_mma", "gemm_wgmma")
# Rule sets whose design spaces allocate shared.dyn, and so may use the opt-in shared-memory limit;
# the others allocate static shared memory only, and VerifyGPUCode checks them against 48 KiB.
# (``fused``: the flash prefill templates hold their tiles in shared.dyn where the target allows more.)
DYNAMIC_SHARED_RULE_SETS = ("tensorcore", "mma", "fused", "splitk_tc", *THREAD_LEVEL_RULE_SETS)
# Software-pipeline depths of the ``mma`` rule set: tiles in shared memory at once.
PIPELINE_STAGES = (2, 3, 4)


def rule_set_applies(rule_set: str, workload) -> bool:
    """Whether a rule set gives a design space of its own for ``workload``."""
    if rule_set == "splitk":
        return splitk.applies(workload)
    if rule_set == "splitk_tc":
        return gemm_splitk.applies(workload)
    if rule_set == "rowsoftmax":
        return workload.family == "softmax"
    if rule_set == "flash_mma":
        return attention_mma.applies(workload)
    if rule_set == "gemm_mma":
        return gemm_mma.applies(workload)
    if rule_set == "gemm_wgmma":  # the target (sm_90) is checked where the templates are made
        return gemm_wgmma.applies(workload)
    if rule_set == "mma":
        # TVM 0.27's mma path tiles exactly three loops (i, j, k) and generates no design space unless
        # M and N are multiples of 32 (M = 16, 48 or 100, N = 16 or 48 fail in its tiling: "the factor
        # at position 0 is -1"); K may be any multiple of 16 it pads to.
        params = workload.params
        return (workload.family == "gemm" and params.get("dtype") == "float16"
                and int(params.get("M", 0)) % 32 == 0 and int(params.get("N", 0)) % 32 == 0)
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

    # A process that compiled a module before it first sampled has etune's copy of the accumulator
    # layout (build.register_mma_layouts), which TVM's module registers itself and may not replace.
    from .build import forget_mma_layouts

    forget_mma_layouts()
    inspect.stack = shallow_stack
    try:
        return importlib.import_module("tvm.s_tir.tensor_intrin.cuda")
    finally:
        inspect.stack = original


def _tensor_core_tiling(groups: list, reuse_write, software_pipeline: bool):
    """MultiLevelTilingTensorCore with the tiling etune uses for both tensor-core paths."""
    return sr.MultiLevelTilingTensorCore(
        intrin_groups=groups,
        structure="SSSRRSRS",
        tile_binds=["blockIdx.y", "blockIdx.x", "threadIdx.y"],
        max_innermost_factor=4,
        vector_load_lens=[1, 2, 3, 4, 8, 16],
        reuse_read=sr.ReuseType(req="must", levels=[4], scope="shared.dyn"),
        reuse_write=reuse_write,
        use_software_pipeline=software_pipeline,
    )


def _wmma_tiling(software_pipeline: bool = False):
    get_wmma_intrin_group = tensor_intrinsics().get_wmma_intrin_group

    groups = [
        get_wmma_intrin_group(
            load_scope="shared.dyn", store_scope="shared", in_dtype="float16", out_dtype=out, trans_b=trans_b
        )
        for out in ("float32", "float16")
        for trans_b in (False, True)
    ]
    return _tensor_core_tiling(groups, sr.ReuseType(req="must", levels=[2], scope="shared"), software_pipeline)


def _mma_tiling():
    tensor_intrinsics()  # registers the m16n8k8 intrinsics
    groups = [
        {"init": f"mma_init_m16n8k8_{acc}", "load_a": "mma_load_m16n8k8_f16_A_shared_dyn",
         "load_b": "mma_load_m16n8k8_f16_B_shared_dyn", "compute": f"mma_sync_m16n8k8_f16f16{acc}",
         "store": f"mma_store_m16n8k8_{acc}_global"}
        for acc in ("f32", "f16")
    ]
    # The mma path writes the accumulator from registers (m16n8k8.matrixC) to global memory.
    return _tensor_core_tiling(groups, sr.ReuseType(req="no", levels=[], scope=""), software_pipeline=True)


def _annotations(insts, key: str) -> list:
    return [inst for inst in insts if inst.kind.name == "Annotate" and str(inst.attrs[0]) == key]


def _annotation_key(inst) -> str | None:
    return str(inst.attrs[0]) if inst.kind.name == "Annotate" else None


def _per_depth(trace, rewrite) -> list:
    """One variant of ``trace`` per pipeline depth D in PIPELINE_STAGES, each instruction replaced by
    ``rewrite(inst, D)`` (a list of instructions); the trace alone if ``rewrite`` gives None for one
    (not the pipeline it knows)."""
    from tvm.s_tir.schedule import Trace

    variants = []
    for stages in PIPELINE_STAGES:
        edited = []
        for inst in trace.insts:
            replaced = rewrite(inst, stages)
            if replaced is None:
                return [(None, trace)]
            edited.extend(replaced)
        variants.append((f"stages={stages}", Trace(edited, {})))
    return variants


def _async_mma_variants(trace) -> list:
    """For ``mma``: TVM's rule annotates the outer k loop (the one with
    ``software_pipeline_async_stages``) with stages [0, 0, 1, 2, 2] over its five statements after the
    inner pipeline is expanded: the A and B cp.async copies, then the inner pipeline's prologue
    (fragment loads of the next tile), body and epilogue. Stages [0, 0, D - 2, D - 1, D - 1] keep that
    order and put the copies D - 1 iterations ahead, with D shared buffers of each tile."""
    from tvm.s_tir.schedule import Instruction

    loops = [inst.inputs[0] for inst in _annotations(trace.insts, "software_pipeline_async_stages")]
    if len(loops) != 1:  # not the pipeline this function knows: leave it alone
        return [(None, trace)]

    def rewrite(inst, stages):
        if _annotation_key(inst) != "software_pipeline_stage" or not inst.inputs[0].same_as(loops[0]):
            return [inst]
        if [int(v) for v in inst.inputs[1]] != [0, 0, 1, 2, 2]:
            return None
        return [Instruction(inst.kind, [inst.inputs[0], [0, 0, stages - 2, stages - 1, stages - 1]],
                            inst.attrs, inst.outputs)]

    return _per_depth(trace, rewrite)


def _async_wmma_variants(trace) -> list:
    """For ``splitk_tc``: TVM's wmma pipeline (A and B tiles through registers into double-buffered
    shared memory, ``manifest_shared_memory_local_stage``, and wmma fragments one k-step ahead) made a
    cp.async pipeline of depth D (tiles in shared memory at once). Kept from TVM's: the copies in
    stage 0 and the tensor-core loop D - 1 iterations behind; dropped: the register stage (cp.async
    copies global to shared directly) and the fragment pipeline of the inner loop (with it, lowering
    fails: "fragment_info_" check, multi-buffered wmma fragments). On sim the tiles then stream with
    the copies of D - 1 stages on the way instead of one load per thread (gemm:16,11008,4096:
    DRAM-bound instead of latency-bound)."""
    from tvm.s_tir.schedule import Instruction

    staged = _annotations(trace.insts, "software_pipeline_stage")
    outer = [inst.inputs[0] for inst in staged if len(inst.inputs[1]) == 7]
    inner = [inst.inputs[0] for inst in staged if len(inst.inputs[1]) == 3]
    if len(outer) != 1 or len(inner) != 1:  # not the pipeline this function knows: leave it alone
        return [(None, trace)]
    outer, inner = outer[0], inner[0]

    def rewrite(inst, stages):
        key = _annotation_key(inst)
        if key == "tirx.manifest_shared_memory_local_stage":
            return []
        if key not in ("software_pipeline_stage", "software_pipeline_order"):
            return [inst]
        if inst.inputs[0].same_as(inner):
            return []
        if not inst.inputs[0].same_as(outer):
            return [inst]
        if key == "software_pipeline_stage":  # three statements: the A copy, the B copy, the k loop
            return [Instruction(inst.kind, [outer, [0, 0, stages - 1]], inst.attrs, inst.outputs)]
        return [Instruction(inst.kind, [outer, [0, 1, 2]], inst.attrs, inst.outputs),
                Instruction(inst.kind, [outer, [0]], ["software_pipeline_async_stages"], [])]

    return _per_depth(trace, rewrite)


def pipeline_variants(rule_set: str, trace) -> list:
    """[(label, trace)]: the design spaces one generated trace stands for. TVM's rules fix the
    software pipeline's depth with constant annotations (no trace instruction turns a sampled integer
    into a stage array), so ``mma`` and ``splitk_tc`` give one design space per depth in
    PIPELINE_STAGES (``_async_mma_variants``, ``_async_wmma_variants``). Other rule sets: the trace
    as it is."""
    if rule_set == "mma":
        return _async_mma_variants(trace)
    if rule_set == "splitk_tc":
        return _async_wmma_variants(trace)
    return [(None, trace)]


def postprocs(rule_set: str, kind: str):
    """The postprocessors of a rule set: TVM's defaults for ``kind``, except that ``fused`` (and the
    thread-level templates, whose threads are bound at launch and whose loops may depend on the
    block, like the causal key loop) drops
    RewriteUnboundBlock and DisallowDynamicLoop. The fused rules bind every block themselves, and
    RewriteUnboundBlock aborts ("blockIdx is bound but threadIdx is not") on the prefill template's
    granule block, whose threads are bound inside it. The causal prefill's key loop has a length that
    depends on the query tile (it stops at the diagonal): etune's analysis counts such a loop at its
    mean length; MetaSchedule's own features (energy_model's optional ``per_store``) do not expect one."""
    from tvm.s_tir.meta_schedule.postproc import Postproc

    if rule_set not in ("fused", *THREAD_LEVEL_RULE_SETS):
        return kind
    dropped = ("RewriteUnboundBlock", "DisallowDynamicLoop")
    return [p for p in Postproc.create(kind) if type(p).__name__ not in dropped]


def schedule_rules(rule_set: str, cross_thread_reduction: bool = True) -> list:
    """The rules of a rule set. ``cross_thread_reduction=False`` drops the rule that, in TVM 0.27,
    aborts design-space generation for multi-block modules such as attention ("Unable to get the
    extent of threadIdx.x" when an earlier block was fused into a reduction without a thread binding)."""
    generic = _generic_rules(cross_thread_reduction)
    if rule_set == "tensorcore":
        return [sr.ApplyCustomRule(), _wmma_tiling(), _simt_tiling(), *generic]
    if rule_set == "splitk_tc":
        # wmma with TVM's software pipeline, which ``pipeline_variants`` turns into cp.async stages.
        return [sr.ApplyCustomRule(), _wmma_tiling(software_pipeline=True), _simt_tiling(), *generic]
    if rule_set == "mma":
        return [sr.ApplyCustomRule(), _mma_tiling(), _simt_tiling(), *generic]
    if rule_set == "simt":
        return [sr.ApplyCustomRule(), _simt_tiling(), *generic]
    if rule_set == "fused":
        from .attention_rules import register

        register()
        tensor_intrinsics()  # TuneContext imports it otherwise, without the fast path
        return [sr.ApplyCustomRule()]
    if rule_set in THREAD_LEVEL_RULE_SETS:
        tensor_intrinsics()  # TuneContext imports it otherwise, without the fast path
        return []  # the templates are complete schedules
    if rule_set == "splitk":
        # The rule schedules the reduction and its epilogue completely; nothing else is left to bind.
        return [splitk.SplitKRule()]
    if rule_set == "rowsoftmax":
        from .softmax_rules import register

        register()
        tensor_intrinsics()  # TuneContext imports it otherwise, without the fast path (~30 s)
        return [sr.ApplyCustomRule()]
    raise ValueError(f"unknown rule set {rule_set!r}; known: {', '.join(RULE_SETS)}")
