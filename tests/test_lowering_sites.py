"""Issue 9: lowering that is never wrong and never blind (2 of 2; ``test_lowering_safety.py``).

Every attention site is counted, with a true reason where it is left alone, and the spellings
real models use (T5, BART's merged heads, a safe softmax over fully masked rows, ...) are lowered
with eager's numerics. Bound arguments and containment: ``test_lowering_safety.py``. Each
confirmed defect of the issue has its test in one of the two; each failed on the code before
the fix.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import capture, close, compiled_vs_eager, count_calls, qkv, randn, run

from xy_inductor.lowering import ManualAttention, SdpaToAttention, lower_graph
from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.signatures import bind

GEMM = torch.ops.xyserve.gemm.default
ATTENTION = torch.ops.xyserve.attention.default


# -- every attention site counted, with a true reason -------------------------------------------


def mask_expanded_as_scores(q, k, v, m):
    s = q @ k.transpose(-1, -2)
    s = s + m.expand_as(s)  # reads only the shape of s
    return torch.softmax(s, dim=-1) @ v


def test_mask_expanded_as_the_scores_is_lowered():
    # Before: reported as "scores used elsewhere" and left alone.
    q, k, v = qkv()
    m = randn(1, 1, 5, 6, seed=4)
    gm, inputs = capture(mask_expanded_as_scores, q, k, v, m, dynamic=False)
    expected = run(gm, inputs)
    (site,) = ManualAttention()(gm)
    assert site.lowered, site
    assert count_calls(gm, ATTENTION) == 1
    assert not any(n.target == "expand_as" for n in gm.graph.nodes)
    close(run(gm, inputs), expected)


def soft_capped_einsum(q, k, v):
    s = torch.einsum("bhqd,bhkd->bhqk", q, k)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, dim=-1), v)


def scores_returned(q, k, v):
    s = q @ k.transpose(-1, -2)
    return torch.softmax(s, dim=-1) @ v, s


def scores_filled_in_place(q, k, v, m):
    s = q @ k.transpose(-1, -2)
    s.masked_fill_(m < 0, -1e9)
    return torch.softmax(s, dim=-1) @ v


def narrowing_cast(q, k, v):
    s = (q @ k.transpose(-1, -2)).half()
    return torch.softmax(s, dim=-1).float() @ v


def wide_mask_narrow_queries(q, k, v, m):
    return torch.softmax(q @ k.transpose(-1, -2) + m, dim=-1).to(q.dtype) @ v


def softmax_without_dim(q, k, v):
    return F.softmax(q @ k.transpose(-1, -2)) @ v  # legacy implicit dim: 1 for 4-D


@pytest.mark.parametrize(
    ("fn", "extra", "dtype", "reason"),
    [
        (soft_capped_einsum, (), torch.float32, "torch.einsum"),
        (scores_returned, (), torch.float32, "is also used by"),
        (scores_filled_in_place, (randn(1, 1, 5, 6, seed=4),), torch.float32, "in place"),
        (narrowing_cast, (), torch.float32, "narrower"),
        (wide_mask_narrow_queries, (randn(1, 1, 5, 6, seed=4),), torch.bfloat16, "float32"),
        (softmax_without_dim, (), torch.float32, "dim None"),
    ],
    ids=["einsum", "scores-returned", "in-place-fill", "narrowing-cast", "wide-mask", "no-dim"],
)
@pytest.mark.filterwarnings("ignore:Implicit dimension choice for softmax")
def test_attention_sites_left_alone_are_counted_with_a_true_reason(fn, extra, dtype, reason):
    q, k, v = qkv(dtype=dtype)
    gm, inputs = capture(fn, q, k, v, *extra, dynamic=False)
    code, expected = gm.code, run(gm, inputs)
    report = lower_graph(gm, LoweringOptions())
    sites = [s for s in report.sites if s.kind == "attention"]
    assert len(sites) == 1 and not sites[0].lowered and not sites[0].failed, sites
    assert reason in sites[0].reason, sites[0].reason
    assert gm.code == code
    torch.testing.assert_close(run(gm, inputs), expected)


def router(x, w1, w2):
    # MoE router: softmax over a linear layer, then a product with a weight: not attention.
    return torch.softmax(x @ w1.t(), dim=-1) @ w2


def test_softmax_between_weights_is_not_an_attention_site():
    w1, w2 = nn.Parameter(randn(4, 8)), nn.Parameter(randn(4, 8, seed=1))
    gm, _ = capture(lambda x: router(x, w1, w2), randn(3, 8), dynamic=False)
    assert ManualAttention()(gm) == []


# -- the spellings real models use ----------------------------------------------------------------


def t5_attention(q, k, v, bias):
    # transformers' T5Attention: in-place bias, softmax in float32, type_as back, eval dropout.
    scores = torch.matmul(q, k.transpose(3, 2))
    scores += bias
    w = F.softmax(scores.float(), dim=-1).type_as(scores)
    w = F.dropout(w, p=0.1, training=False)
    return torch.matmul(w, v)


def bart_merged_heads(q, k, v, mask):
    # BART/OPT-style: batch and heads merged, torch.bmm between views.
    b, h, lq, d = q.shape
    q3 = (q * d**-0.5).reshape(b * h, lq, d)
    k3, v3 = k.reshape(b * h, -1, d), v.reshape(b * h, -1, d)
    w = torch.bmm(q3, k3.transpose(1, 2))
    w = (w.view(b, h, lq, -1) + mask).view(b * h, lq, -1)
    w = F.softmax(w, dim=-1)
    return torch.bmm(w, v3).view(b, h, lq, d).transpose(1, 2).reshape(b, lq, h * d)


def safe_softmax_fully_masked(q, k, v, keep):
    # PyTorch's own SDPA decomposition: _safe_softmax, 0 for rows with every key masked.
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    s = s.masked_fill(keep.logical_not(), float("-inf"))
    return torch.ops.aten._safe_softmax(s, -1) @ v


def scale_on_kt_and_split(q, k, v):
    s = (q * 0.5) @ (k.transpose(-1, -2).contiguous() * 0.25)
    return torch.softmax(s, dim=-1).clone() @ v.contiguous()


def expanded_bool_mask(q, k, v, keep):
    s = q @ k.mT / math.sqrt(q.shape[-1])
    s = torch.where(keep.expand(q.shape[0], q.shape[1], -1, -1), s, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def output_viewed(q, k, v, m):
    o = torch.softmax(q @ k.transpose(-1, -2) + m, dim=-1) @ v
    return o.view(q.shape[0], -1, q.shape[-1])  # needs eager's contiguous layout


def _keep(lq=5, lk=6):
    keep = torch.ones(1, 1, lq, lk, dtype=torch.bool).tril(lk - lq)
    keep[..., 2, :] = False  # one fully masked row
    return keep


SPELLINGS = {
    "t5": (t5_attention, lambda: (randn(1, 4, 5, 6, seed=4),)),
    "bart_merged": (bart_merged_heads, lambda: (randn(2, 1, 5, 6, seed=4),)),
    "safe_softmax": (safe_softmax_fully_masked, lambda: (_keep(),)),
    "scale_split": (scale_on_kt_and_split, lambda: ()),
    "expanded_bool_mask": (expanded_bool_mask, lambda: (_keep().tril(1) | torch.eye(5, 6).bool(),)),
    "output_viewed": (output_viewed, lambda: (randn(1, 4, 5, 6, seed=4),)),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spellings_seen_in_models_are_lowered_with_eager_numerics(name, dtype, dynamic):
    fn, extra = SPELLINGS[name]
    q, k, v = qkv(dtype=dtype)
    args = (q, k, v, *(e.to(dtype) if e.is_floating_point() else e for e in extra()))
    out, expected, stats = compiled_vs_eager(fn, *args, dynamic=dynamic)
    assert stats.sites_lowered == {"attention": 1} and not stats.sites_unlowered, stats
    assert not torch.isnan(out).any()
    close(out, expected, dtype)
    reference = fn(*(a.double() if a.is_floating_point() else a for a in args))
    close(out, reference, dtype)


def test_sdpa_keywords_it_does_not_know_are_refused():
    gm, _ = capture(lambda q: F.scaled_dot_product_attention(q, q, q), qkv()[0], dynamic=False)
    (node,) = [n for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention]
    node.kwargs = {**node.kwargs, "window": 4}
    assert "window" in bind(node).error
    (site,) = SdpaToAttention()(gm)
    assert not site.lowered and "window" in site.reason
