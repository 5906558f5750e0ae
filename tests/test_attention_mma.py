"""FlashAttention-2 prefill with mma.sync register fragments (kernels/attention_mma.py).

Without a GPU the PrimFunc cannot run (its PTX has no llvm lowering), so its data flow is checked
through ``emulate``: the same algorithm lane by lane with PTX's ldmatrix and mma semantics, using
the layout functions the PrimFunc uses. The PrimFunc itself is checked for its lowered structure,
its nvcc build for sm_90 (no spills), its place in the fused design spaces and its sim figures
(model outputs). On a GPU, built templates are compared with the reference.
"""
import random
import re

import numpy as np
import pytest
import tvm

from etune.kernels import attention_mma, parse_spec
from etune.kernels.attention_mma import (emulate, flash_prefill_mma, fragment_registers, mma_prefill_configs,
                                        mma_prefill_funcs, mma_shared_bytes, query_tile)
from etune.search_space import ScheduleSpace, gpu_spec
from etune.search_space.rules import rule_set_applies
from etune.search_space.analysis import kernel_launches, lower_device_functions, walk


def inputs_for(spec, seed=0):
    workload = parse_spec(spec)
    rng = np.random.default_rng(seed)
    return workload, [rng.standard_normal(t.shape).astype("float16") for t in workload.inputs]


@pytest.mark.parametrize("spec, warps, rows, keys", [
    ("attention:1,2,40,70,32", 4, 1, 32),  # both lengths past a tile
    ("attention:1,1,70,100,64,causal", 4, 1, 64),  # causal, kv_len > q_len: skipped tiles and a diagonal
    ("attention:2,1,33,33,16,causal", 8, 1, 32),  # square causal
    ("attention:1,2,150,90,32", 4, 2, 32),  # Q reloaded from shared memory per key tile
    ("attention:1,1,70,130,48,causal", 2, 2, 64),
])
def test_emulated_kernel_matches_the_reference(spec, warps, rows, keys):
    workload, (q, k, v) = inputs_for(spec)
    out = emulate(q, k, v, workload.params["causal"], warps, rows, keys)
    ok, error = workload.check([out], workload.reference([q, k, v]))
    assert ok, error


@pytest.mark.parametrize("layout", ["k_ldmatrix_address", "v_ldmatrix_address", "q_ldmatrix_address",
                                    "p_fragment_index"])
def test_emulation_fails_when_a_layout_is_wrong(monkeypatch, layout):
    """The emulation is a check of the layouts: one of them off (two rows or elements swapped) and the
    output is wrong."""
    correct = getattr(attention_mma, layout)

    def swapped(*args):
        result = correct(*args)
        if layout == "p_fragment_index":
            return result ^ 1  # neighbouring columns exchanged
        return (result[0] ^ 1, result[1])  # neighbouring rows exchanged

    monkeypatch.setattr(attention_mma, layout, swapped)
    workload, (q, k, v) = inputs_for("attention:1,1,64,64,32")
    out = emulate(q, k, v, False, 2, 2, 32)
    ok, _ = workload.check([out], workload.reference([q, k, v]))
    assert not ok


def test_configs_fit_registers_and_the_query_length():
    configs = mma_prefill_configs(2048, 2048, 128)
    assert {(w, r) for w, r, _, _ in configs} == {(4, 1), (4, 2), (8, 1), (8, 2)}
    # 128 rows x 64 keys at head_dim 128 would need 236 registers of fragments: not offered
    assert (4, 2, 64, 1) not in configs and fragment_registers(128, 2, 64) > 200
    assert all(query_tile(w, r) <= 64 for w, r, _, _ in mma_prefill_configs(40, 2048, 128))
    assert all(k == 32 for _, _, k, _ in mma_prefill_configs(2048, 2048, 256))


def lowered(spec, **config):
    workload = parse_spec(spec)
    p = workload.params
    func = flash_prefill_mma(p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"], p["causal"], **config)
    return workload, tvm.IRModule({"main": func})


def calls(func):
    names = []
    walk(func.body, lambda node: names.append(node.op.name)
         if type(node).__name__ == "Call" and hasattr(node.op, "name") else None)
    return names


@pytest.mark.parametrize("stages", [1, 2])
def test_lowered_structure_one_kernel_register_fragments(stages):
    workload, mod = lowered("attention:1,2,200,300,128,causal", warps=4, row_tiles=2, key_tile=32, stages=stages)
    (name, func), = lower_device_functions(mod, gpu_spec("h100").tvm_target())
    names = calls(func)
    assert names.count("tirx.ptx_legacy.mma") > 0 and names.count("tirx.ptx_legacy.ldmatrix") > 0
    assert "tirx.s_tir.cp_async_raw" in names and "tirx.ptx.cp_async_wait_group" in names
    (launch,) = kernel_launches(mod, gpu_spec("h100").tvm_target())
    # no global intermediate: global traffic is Q, K, V in and O out; the shared tiles are K/V per
    # stage and Q (two row tiles per warp)
    assert launch.shared_bytes == mma_shared_bytes(128, 4, 2, 32, stages)
    assert launch.grid == (2 * -(-200 // 128), 1, 1) and launch.block == (128, 1, 1)
    # cp.async stages keep more bytes on the way per thread
    assert launch.async_copy_bytes_in_flight == stages * 2 * (32 * 128 * 2 // 128)


@pytest.mark.slow
def test_builds_for_sm_90_without_spills(built_templates, no_spills):
    built = built_templates([ScheduleSpace("attention:1,2,200,300,128,causal", rule_sets=["flash_mma"])])
    assert len(built) == len(mma_prefill_configs(2048, 2048, 128))  # every template offered at head_dim 128
    no_spills(built)


def test_offered_as_one_point_each_and_sampled():
    space = ScheduleSpace("attention:1,2,256,256,64", rule_sets=["flash_mma"])
    assert len(space.design_spaces) == len(mma_prefill_configs(256, 256, 64))
    assert all(len(d.trace.insts) == 0 and d.template.startswith("flash_prefill_mma") for d in space.design_spaces)
    sampled = space.sample(len(space.design_spaces), seed=1)
    assert {c.design_space for c in sampled} == {d.index for d in space.design_spaces}
    # one point each: nothing more to draw, nothing to mutate
    assert space.sample(1, seed=2, exclude={c.structural_hash for c in sampled}, max_attempts=20) == []
    assert space.mutate(sampled[0], random.Random(0)) is None


def test_not_offered_for_decode_or_odd_head_dims():
    for spec in ("attention:8,32,1,4096,128", "attention:1,2,200,64,40", "gemm:64,64,64"):
        assert not rule_set_applies("flash_mma", parse_spec(spec))
    # 48 KiB without the opt-in: only the templates whose stages fit
    funcs = mma_prefill_funcs(parse_spec("attention:1,2,300,256,128"))
    assert funcs and all(mma_shared_bytes(128, *map(int, re.findall(r"\d+", name[len("flash_prefill_mma_"):])))
                         <= 48 * 1024 for name in funcs)


def test_sim_prefill_beats_the_wmma_templates():
    """On sim (model outputs), the best register-fragment template uses well under the energy of the
    best wmma template, whose S and P V tiles go through shared memory."""
    from etune.measurements.sim import simulate

    spec = "attention:1,8,1024,1024,128"
    workload = parse_spec(spec)
    gpu = gpu_spec("h100")

    def energy(mod):
        return simulate(kernel_launches(mod, gpu.tvm_target()), workload, gpu).energy_j

    mma = min(energy(d.mod) for d in ScheduleSpace(spec, rule_sets=["flash_mma"]).design_spaces)
    fused = ScheduleSpace(spec, rule_sets=["fused"])
    wmma = min(energy(c.schedule.mod) for c in fused.sample(16, seed=0)
               if fused.design_spaces[c.design_space].template.startswith("flash_prefill_wmma"))
    assert mma < 0.7 * wmma


@pytest.mark.gpu
def test_templates_match_the_reference_on_gpu(templates_match_on_gpu):
    templates_match_on_gpu("flash_mma", ("attention:1,2,200,300,128,causal", "attention:2,2,130,130,64"))