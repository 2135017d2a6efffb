"""Horizontal fusion of sibling GEMMs: counts, numerics, and never stale weights."""

from __future__ import annotations

import pytest
import torch
from helpers import TOLERANCE, capture, count_calls, rel_error, run

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl
from xy_inductor.config import XyConfig
from xy_inductor.lowering import FuseSiblingGemms, LoweringOptions, lower_graph
from xy_inductor.runtime import providers

GEMM = torch.ops.xyserve.gemm.default
FUSED = torch.ops.xyserve.gemm_fused.default


def test_fusion_is_off_by_default():
    assert XyConfig().fuse_siblings is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_fuses_qkv_and_gate_up(dtype):
    model = wl.tiny_model("llama").to(dtype)
    ids, mask = wl.prompt_batch([7, 4], model.config.vocab_size, seed=0)
    gm, inputs = capture(model, input_ids=ids, attention_mask=mask, dynamic=False)
    expected = run(gm, inputs)
    report = lower_graph(gm, LoweringOptions(fuse_siblings=True))
    layers = model.config.num_hidden_layers
    assert report.matches["fuse_siblings"] == 2 * layers  # q/k/v and gate/up in each layer
    assert count_calls(gm, FUSED) == 2 * layers
    assert count_calls(gm, GEMM) == 2 * layers + 1  # o_proj, down_proj, lm_head
    assert report.count("linear", lowered=True) == 7 * layers + 1  # sites counted before fusing
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[dtype]


def test_fusion_uses_the_pass_hooks_and_lists_no_sites_of_its_own():
    assert "__call__" not in vars(FuseSiblingGemms)  # the base class's match loop runs it
    model = wl.tiny_model("llama")
    ids, mask = wl.prompt_batch([5], model.config.vocab_size, seed=0)
    gm, _ = capture(model, input_ids=ids, attention_mask=mask, dynamic=False)
    lower_graph(gm, LoweringOptions())
    fuse = FuseSiblingGemms(LoweringOptions(max_tokens=512))
    assert fuse(gm, skip_reason="listed only") == [] and fuse.matched == 0
    assert fuse(gm) == [] and fuse.matched == 2 * model.config.num_hidden_layers
    fused = [n for n in gm.graph.nodes if n.target is FUSED]
    assert {n.kwargs["max_tokens"] for n in fused} == {8192}  # the gemms' own, kept
    assert fuse(gm) == [] and fuse.matched == 0  # a second run finds nothing left to fuse


def test_siblings_with_other_inputs_are_not_fused():
    # o_proj and down_proj read different tensors: nothing to fuse there.
    model = wl.tiny_model("gpt2")  # one Conv1D per input: c_attn already fused by the model
    ids, mask = wl.prompt_batch([6], model.config.vocab_size, seed=0)
    gm, _ = capture(model, input_ids=ids, attention_mask=mask, dynamic=False)
    report = lower_graph(gm, LoweringOptions(fuse_siblings=True))
    assert report.matches["fuse_siblings"] == 0 and count_calls(gm, FUSED) == 0


def logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


@pytest.mark.parametrize("inductor", [False, True])
def test_fused_weights_are_never_stale(inductor, monkeypatch):
    if inductor:
        # As on a machine where a GEMM provider other than ATen serves them: only then do the
        # GEMM passes run under Inductor (pipeline.LEFT_TO_INDUCTOR).
        monkeypatch.setattr(providers, "only_aten_serves", lambda op: False)
    reference = wl.tiny_model("llama")
    model = hf.accelerate(wl.copy_model(reference), fuse_siblings=True, inductor=inductor)
    ids, mask = wl.prompt_batch([9, 5], reference.config.vocab_size, seed=0)
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask))
    attn, ref_attn = model.model.layers[0].self_attn, reference.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert k.data_ptr() - q.data_ptr() == q.numel() * q.element_size(), "q/k/v in one buffer"
    assert xy_inductor.stats().fused_calls == 4 and xy_inductor.stats().unfused_calls == 0

    # In-place updates of every kind, then new storage: each call must see the current values.
    updates = [
        lambda m: m.model.layers[0].self_attn.q_proj.weight.mul_(1.5),  # under no_grad
        lambda m: m.model.layers[0].self_attn.k_proj.weight.data.add_(0.1),  # no version bump
        lambda m: m.load_state_dict({k: v * 0.9 for k, v in reference.state_dict().items()}),
    ]
    for update in updates:
        state = {k: v.clone() for k, v in reference.state_dict().items()}
        with torch.no_grad():
            update(reference)
            if update is updates[-1]:
                model.load_state_dict(reference.state_dict())
            else:
                update(model)
        assert not all(torch.equal(state[k], v) for k, v in reference.state_dict().items())
        torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask))
    fresh = torch.randn_like(ref_attn.v_proj.weight)
    attn.v_proj.weight.data, ref_attn.v_proj.weight.data = fresh.clone(), fresh.clone()
    torch.testing.assert_close(logits(model, ids, mask), logits(reference, ids, mask))
    s = xy_inductor.stats()
    assert s.unfused_calls == 1  # the group whose weight moved out of the buffer, counted
    assert s.backend_compiles == 1 and s.inductor_failures == 0


def test_generate_with_fusion_matches_eager():
    reference = wl.tiny_model("qwen2")
    model = hf.accelerate(wl.copy_model(reference), fuse_siblings=True)
    calls = ((7,), (1,), (5, 3))
    want = wl.generate_pass(reference, "dynamic", calls, 3).outputs
    got = wl.generate_pass(model, "dynamic", calls, 3).outputs
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert xy_inductor.stats().fused_calls > 0 and xy_inductor.stats().unfused_calls == 0
