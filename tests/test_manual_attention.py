"""The manual-attention pass: hand-written softmax(q kᵀ) v in the forms real models use."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, capture, count_calls, randn, rel_error, run

import xy_inductor
from xy_inductor.lowering import (
    LoweringOptions,
    ManualAttention,
    lower_graph,
    manual_attention_match,
)

ATTENTION = torch.ops.xyserve.attention.default
SIZES = (1, 7, 37, 129)


def repeat_kv(x, n):
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)


# Each variant is written the way a model family writes it.


def llama_eager(q, k, v, mask):
    # transformers' eager_attention_forward (Llama, Qwen2, Mistral, Gemma, Phi-3): repeat_kv,
    # * scaling, additive mask, softmax in float32, cast back, dropout in eval.
    k, v = repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.1, training=False)
    return torch.matmul(w, v)


def gpt2_classic(q, k, v, mask):
    # GPT-2 before transformers 5: / torch.full scale, where() with the causal buffer and
    # finfo.min, then the padding mask, softmax, .type(v.dtype).
    w = torch.matmul(q, k.transpose(-1, -2))
    w = w / torch.full([], v.size(-1) ** 0.5, dtype=w.dtype, device=w.device)
    lq, lk = q.size(-2), k.size(-2)
    causal = torch.ones(lk, lk, dtype=torch.bool, device=q.device).tril()[
        None, None, lk - lq : lk, :lk
    ]
    w = torch.where(causal, w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
    w = w + mask
    w = torch.softmax(w, dim=-1).type(v.dtype)
    return w @ v


def masked_fill_minus_inf(q, k, v, mask):
    # A hand-written causal attention: masked_fill with -inf (a bool mask for the op).
    w = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    lq, lk = q.shape[-2], k.shape[-2]
    causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)
    w = w.masked_fill(~causal, float("-inf"))
    return w.softmax(-1) @ v


def scale_folded_into_q(q, k, v, mask):
    # T5-style: the scale is applied to q beforehand, the chain has no scaling at all; the
    # bias is an ALiBi-like additive [1, H, Lq, Lk] tensor.
    q = q * q.shape[-1] ** -0.5
    w = torch.matmul(q, k.permute(0, 1, 3, 2)) + mask
    return torch.matmul(torch.softmax(w.float(), dim=-1).to(q.dtype), v)


VARIANTS = {
    "llama_eager": (llama_eager, 2, "additive"),
    "gpt2_classic": (gpt2_classic, 1, "additive"),
    "masked_fill_minus_inf": (masked_fill_minus_inf, 1, None),
    "scale_folded_alibi": (scale_folded_into_q, 1, "alibi"),
}


def make_inputs(variant, length, dtype, b=2, hq=4, d=16):
    _fn, groups, mask_kind = VARIANTS[variant]
    lk = length + 3 if variant != "gpt2_classic" else length
    q = randn(b, hq, length, d, dtype=dtype, seed=1)
    k = randn(b, hq // groups, lk, d, dtype=dtype, seed=2)
    v = randn(b, hq // groups, lk, d, dtype=dtype, seed=3)
    if mask_kind == "additive":  # padding of row 1, as Hugging Face builds it
        keep = torch.ones(b, 1, length, lk, dtype=torch.bool)
        # Key 1, not key 0: with GPT-2's causal fill a query that sees no key at all would have
        # dtype-dependent results (finfo.min differs between float32 and the float64 reference).
        keep[1, :, :, 1 % lk] = lk == 1
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)
    elif mask_kind == "alibi":
        slopes = torch.tensor([2.0**-i for i in range(1, hq + 1)])[:, None, None]
        mask = (
            slopes * -(torch.arange(lk)[None, None] - torch.arange(length)[None, :, None]).abs()
        )[None].to(dtype)
    else:
        mask = torch.zeros(())
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_manual_attention_counts_and_numerics(variant, length, dtype):
    fn = VARIANTS[variant][0]
    args = make_inputs(variant, length, dtype)
    gm, inputs = capture(fn, *args, dynamic=False)
    expected = run(gm, inputs)
    softmaxes = sum(n.op != "placeholder" and "softmax" in str(n.target) for n in gm.graph.nodes)
    assert softmaxes == 1 and count_calls(gm, ATTENTION) == 0
    p = ManualAttention()
    sites = p(gm)
    assert p.matched == 1 and [s.lowered for s in sites] == [True], sites
    assert count_calls(gm, ATTENTION) == 1
    assert not any("softmax" in str(n.target) or "matmul" in str(n.target) for n in gm.graph.nodes)
    assert not any(n.target in ("expand", "reshape") for n in gm.graph.nodes), "repeat_kv absorbed"
    out = run(gm, inputs)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    reference = fn(*(a.double() if a.is_floating_point() else a for a in args))
    assert rel_error(out, reference) < TOLERANCE[dtype]


def test_manual_attention_with_dynamic_sizes():
    args = make_inputs("llama_eager", 9, torch.float32)
    gm, inputs = capture(llama_eager, *args, dynamic=True)
    expected = run(gm, inputs)
    assert [s.lowered for s in ManualAttention()(gm)] == [True]
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]


def test_fully_masked_rows_keep_eager_results():
    # finfo.min fills give uniform weights on a row with every key masked; a bool mask would
    # give zeros. The additive replay keeps eager's answer.
    q, k, v, _ = make_inputs("llama_eager", 5, torch.float32)
    keep = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    keep[0, :, 2, :] = False
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min)
    gm, inputs = capture(llama_eager, q, k, v, mask, dynamic=False)
    expected = run(gm, inputs)
    ManualAttention()(gm)
    torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)


# -- left alone, with a reason ------------------------------------------------------------------


def returns_probabilities(q, k, v):
    w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
    return w @ v, w  # output_attentions=True


def soft_capped(q, k, v):
    w = q @ k.transpose(-1, -2) * 0.25
    w = torch.tanh(w / 50.0) * 50.0  # Gemma 2's logit soft-capping
    return torch.softmax(w, dim=-1) @ v


def softmax_over_queries(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


def training_dropout(q, k, v):
    return F.dropout(torch.softmax(q @ k.transpose(-1, -2), dim=-1), p=0.1, training=True) @ v


def tensor_scale(q, k, v, s):
    return torch.softmax((q @ k.transpose(-1, -2)) * s, dim=-1) @ v


@pytest.mark.parametrize(
    ("fn", "extra", "reason"),
    [
        (returns_probabilities, (), "probabilities are also used by"),
        (soft_capped, (), "logit soft-capping"),
        (softmax_over_queries, (), "not the last"),
        (training_dropout, (), "dropout in training mode"),
        (tensor_scale, (randn(1, 4, 7, 1, seed=5),), "scaled by a tensor"),
    ],
    ids=[
        "probabilities-returned",
        "soft-capping",
        "softmax-dim",
        "training-dropout",
        "tensor-scale",
    ],
)
def test_unsupported_attention_is_left_alone_with_a_reason(fn, extra, reason):
    args = (
        randn(1, 4, 7, 16, seed=1),
        randn(1, 4, 7, 16, seed=2),
        randn(1, 4, 7, 16, seed=3),
        *extra,
    )
    gm, inputs = capture(fn, *args, dynamic=False)
    torch.manual_seed(0)  # the training-dropout case draws a random mask
    before, expected = gm.code, run(gm, inputs)
    sites = ManualAttention()(gm)
    assert len(sites) == 1 and not sites[0].lowered and reason in sites[0].reason, sites
    assert gm.code == before
    torch.manual_seed(0)
    torch.testing.assert_close(run(gm, inputs), expected)


def router(x, w):
    # A softmax that is not attention (an MoE router): not a site at all.
    return torch.softmax(F.linear(x, w), dim=-1) @ w


def test_softmax_that_is_not_attention_is_not_a_site():
    gm, _ = capture(router, randn(3, 8), randn(8, 8, seed=1), dynamic=False)
    assert ManualAttention()(gm) == []


def test_pipeline_counts_each_attention_once_and_is_idempotent():
    args = make_inputs("llama_eager", 7, torch.float32)
    gm, _ = capture(llama_eager, *args, dynamic=False)
    first = lower_graph(gm, LoweringOptions())
    code = gm.code
    second = lower_graph(gm, LoweringOptions())
    assert (first.count("attention"), first.count("attention", lowered=True)) == (1, 1)
    assert (second.count("attention"), second.count("attention", lowered=True)) == (1, 1)
    assert first.matches["manual_attention"] == 1 and second.matches["manual_attention"] == 0
    assert gm.code == code


def test_option_disables_the_pass_with_a_reason():
    args = make_inputs("llama_eager", 7, torch.float32)
    with torch.no_grad():
        report = xy_inductor.explain(xy_inductor.compile(llama_eager), *args)
        compiled = xy_inductor.compile(llama_eager, lower_manual_attention=False)
        compiled(*args)
    assert report.attention_lowered == 1
    assert xy_inductor.stats().sites_unlowered == {"attention": 1}


def test_pass_uuid_covers_its_matcher(monkeypatch):
    # The pattern lives in its own module: a change there must change the pass's uuid.
    before = ManualAttention().uuid()
    source = inspect.getsource
    monkeypatch.setattr(
        inspect,
        "getsource",
        lambda m: source(m) + ("# changed" if m is manual_attention_match else ""),
    )
    assert ManualAttention().uuid() != before
