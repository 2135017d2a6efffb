"""Issue 22: the mask spellings of DistilBERT and of PyTorch's own ``_sfdp`` patterns
(``torch/_inductor/fx_passes/fuse_attention.py``, ``test/inductor/test_fused_attention.py``),
lowered by the manual-attention pass with eager's numerics (``lowering/score_masks.py``).

- ``scores.masked_fill((mask == 0).view(bs, 1, 1, k_len).expand_as(scores), fill)``: the
  ``expand_as`` reads the scores' shape, which used to leave the site alone ("the shape of
  'scores' is also read").
- ``scores + bool_mask``: the bool is promoted to 0/1 in the scores' dtype; it used to be left
  alone, and must not become the op's bool keep-mask.

Each test of a lowering below failed on the code before it (the site was left alone, or, for
the bfloat16 fill, lowered with uniform weights where eager has NaN).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, capture, count_calls, randn, rel_error, run

import xy_inductor
from xy_inductor.lowering import ManualAttention, score_masks

ATTENTION = torch.ops.xyserve.attention.default


def qkv(dtype=torch.float32, b=2, h=4, lq=5, lk=6, d=8):
    return tuple(randn(b, h, n, d, dtype=dtype, seed=i) for i, n in ((1, lq), (2, lk), (3, lk)))


def padding(b=2, lk=6, pad=2):
    """DistilBERT's attention_mask [bs, k_len]: 1 attend, 0 padding (left padding of row 1)."""
    mask = torch.ones(b, lk)
    mask[1, :pad] = 0
    return mask


# -- the spellings, as each source writes them ---------------------------------------------------


def distilbert(q, k, v, mask):
    # DistilBERT's MultiHeadSelfAttention in later transformers 4.x: q pre-divided, the padding mask
    # expanded as the scores, a 0-d tensor fill of finfo.min, nn.Dropout in eval.
    bs, _, _, dim_per_head = q.shape
    k_length = k.size(2)
    q = q / math.sqrt(dim_per_head)
    scores = torch.matmul(q, k.transpose(2, 3))
    mask = (mask == 0).view(bs, 1, 1, k_length).expand_as(scores)
    scores = scores.masked_fill(mask, torch.tensor(torch.finfo(scores.dtype).min))
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=0.1, training=False)
    return torch.matmul(weights, v)


def distilbert_minus_inf(q, k, v, mask):
    # DistilBERT in earlier transformers 4.x: the same with a -inf fill, no dropout.
    bs, _, _, dim_per_head = q.shape
    q = q / math.sqrt(dim_per_head)
    scores = torch.matmul(q, k.transpose(2, 3))
    mask = (mask == 0).view(bs, 1, 1, k.size(2)).expand_as(scores)
    scores = scores.masked_fill(mask, -float("inf"))
    return torch.matmul(F.softmax(scores, dim=-1), v)


def sfdp_15(q, k, v, mask):
    # PyTorch's _sfdp_pattern_15 ("for DistilBert"): the scale on the scores, the fill a
    # torch.full of -inf in q's dtype.
    bs, k_len = q.size(0), k.size(-2)
    scores = q @ k.transpose(-2, -1)
    scores = scores.div(math.sqrt(q.size(-1)))
    fill_value = torch.full((), -float("inf"), dtype=q.dtype, device=q.device)
    mask = (mask == 0).view((bs, 1, 1, k_len)).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, fill_value), dim=-1) @ v


def sfdp_20(q, k, v, mask):
    # PyTorch's _sfdp_pattern_20 ("for DistilBert with dropout transformers==4.44.2").
    bs, k_len = q.size(0), k.size(-2)
    q = q.div(math.sqrt(q.size(-1)))
    scores = q @ k.transpose(-2, -1)
    fill_value = torch.full((), -float("inf"), dtype=q.dtype, device=q.device)
    mask = (mask == 0).view((bs, 1, 1, k_len)).expand_as(scores)
    weights = torch.softmax(scores.masked_fill(mask, fill_value), dim=-1)
    return F.dropout(weights, 0.1, training=False) @ v


def where_expanded(q, k, v, mask):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = (mask != 0).view(q.size(0), 1, 1, -1)
    return torch.softmax(torch.where(keep.expand_as(s), s, float("-inf")), dim=-1) @ v


def sfdp_5_v1(q, k, v, _):
    # PyTorch's test_fused_attention.py: a bool mask "filled" with -inf stays bool (all True),
    # then is added to the scores: +1 everywhere.
    attn_mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril(0)
    attn_mask = attn_mask.masked_fill(torch.logical_not(attn_mask), -float("inf"))
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))) + attn_mask
    return torch.softmax(s, dim=-1) @ v


def sfdp_5_v2(q, k, v, _):
    # The same test's all-False bool mask added (pytorch/pytorch#100318).
    attn_mask = torch.zeros(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).bool()
    s = (q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))) + attn_mask
    return torch.softmax(s, dim=-1) @ v


def bool_bias(q, k, v, keep):
    # A bool mask given as an input and added: +1 where keep is True.
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(s + keep, dim=-1) @ v


def bool_bias_expanded_in_place(q, k, v, keep):
    s = torch.matmul(q, k.transpose(-2, -1)) * 0.25
    s += keep.expand_as(s)
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def bool_bias_twice(q, k, v, keep):
    # 0, 1 or 2 added: a bool mask kept bool in the rewrite would OR the two instead.
    s = torch.add(keep, q @ k.transpose(-2, -1))
    return torch.softmax(s + keep.flip(-1), dim=-1) @ v


def _keep(seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 1, 5, 6, generator=g) > 0.5


SPELLINGS = {
    "distilbert": (distilbert, padding),
    "distilbert_minus_inf": (distilbert_minus_inf, padding),
    "sfdp_15": (sfdp_15, padding),
    "sfdp_20": (sfdp_20, padding),
    "where_expanded": (where_expanded, padding),
    "sfdp_5_v1": (sfdp_5_v1, _keep),
    "sfdp_5_v2": (sfdp_5_v2, _keep),
    "bool_bias": (bool_bias, _keep),
    "bool_bias_expanded_in_place": (bool_bias_expanded_in_place, _keep),
    "bool_bias_twice": (bool_bias_twice, _keep),
}


def _reference(fn, args):
    return fn(*(a.double() if a.is_floating_point() else a for a in args))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_spelling_is_lowered_with_eager_numerics(name, dtype, dynamic):
    fn, mask = SPELLINGS[name]
    args = (*qkv(dtype), mask())
    gm, inputs = capture(fn, *args, dynamic=dynamic)
    expected = run(gm, inputs)
    assert count_calls(gm, ATTENTION) == 0
    p = ManualAttention()
    sites = p(gm)
    assert p.matched == 1 and [s.lowered for s in sites] == [True], sites
    assert count_calls(gm, ATTENTION) == 1
    left = {str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")}
    assert not left & {"expand_as", "softmax"}, gm.code
    assert not any("softmax" in t or "matmul" in t or "tensor" in t for t in left), gm.code
    out = run(gm, inputs)
    assert not torch.isnan(out).any()
    assert rel_error(out, expected) < TOLERANCE[dtype]
    assert rel_error(out, _reference(fn, args)) < TOLERANCE[dtype]


def test_bool_mask_added_reaches_the_op_as_a_bias_not_a_keep_mask():
    gm, _ = capture(bool_bias, *qkv(), _keep(), dynamic=False)
    ManualAttention()(gm)
    (op,) = [n for n in gm.graph.nodes if n.target is ATTENTION]
    mask = op.args[3].meta["example_value"]
    assert mask.dtype == torch.float32


def test_distilbert_through_the_backend():
    args = (*qkv(torch.bfloat16), padding())
    with torch.no_grad():
        expected = distilbert(*args)
        out = torch.compile(distilbert, backend="xyserve")(*args)
    assert xy_inductor.stats().sites_lowered == {"attention": 1}
    assert rel_error(out, expected) < TOLERANCE[torch.bfloat16]


# -- rows with every key masked ------------------------------------------------------------------


def test_fully_padded_row_with_finfo_min_keeps_eager_uniform_weights():
    # DistilBERT's finfo.min fill stays additive: a padded-out sequence gets eager's uniform
    # weights, not zeros.
    args = (*qkv(), padding(pad=6))
    gm, inputs = capture(distilbert, *args, dynamic=False)
    expected = run(gm, inputs)
    assert [s.lowered for s in ManualAttention()(gm)] == [True]
    torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fn", "dtype"),
    [(distilbert_minus_inf, torch.float32), (sfdp_15, torch.bfloat16)],
    ids=["distilbert-minus-inf", "sfdp-15"],
)
def test_fully_padded_row_with_minus_inf_is_the_known_difference(fn, dtype):
    # Eager's softmax gives NaN there, the op 0 (manual_attention.py's docstring); every other
    # row is eager's.
    args = (*qkv(dtype), padding(pad=6))
    gm, inputs = capture(fn, *args, dynamic=False)
    expected = run(gm, inputs)
    assert [s.lowered for s in ManualAttention()(gm)] == [True]
    out = run(gm, inputs)
    assert torch.isnan(expected[1]).all() and (out[1] == 0).all()
    assert rel_error(out[0], expected[0]) < TOLERANCE[dtype]


def where_float32_min_on_bfloat16(q, k, v, keep):
    s = q @ k.transpose(-1, -2)
    return torch.softmax(torch.where(keep, s, torch.finfo(torch.float32).min), dim=-1) @ v


def test_a_fill_bfloat16_rounds_to_minus_inf_is_minus_inf():
    # finfo(float32).min written into bfloat16 scores is -inf: eager's row masked everywhere is
    # NaN, so the op must see -inf (0 there, the known difference), not bfloat16's finite min
    # (uniform weights: what the code before gave).
    keep = torch.ones(1, 1, 5, 6, dtype=torch.bool).tril(1)
    keep[..., 2, :] = False
    args = (*qkv(torch.bfloat16), keep)
    gm, inputs = capture(where_float32_min_on_bfloat16, *args, dynamic=False)
    expected = run(gm, inputs)
    assert [s.lowered for s in ManualAttention()(gm)] == [True]
    out = run(gm, inputs)
    assert torch.isnan(expected[:, :, 2]).all() and (out[:, :, 2] == 0).all()
    rows = [0, 1, 3, 4]
    assert rel_error(out[:, :, rows], expected[:, :, rows]) < TOLERANCE[torch.bfloat16]


# -- left alone, with a reason -------------------------------------------------------------------


def scores_returned(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v, scores


def expanded_mask_returned(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v, mask


def expand_not_outermost(q, k, v, mask):
    # The expand_as is not the fill's operand (~ after it): the scores' shape is read by a node
    # that stays. Left alone rather than followed through other ops.
    scores = q @ k.transpose(-1, -2)
    keep = (mask != 0).view(q.size(0), 1, 1, -1).expand_as(scores)
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1) @ v


def expanded_past_the_scores(q, k, v, mask):
    # Expanded to a larger tensor, not the scores: the fill broadcasts the scores themselves.
    scores = q @ k.transpose(-1, -2)
    wider = torch.zeros(3, *scores.shape)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(wider)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def condition_from_the_scores(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    return torch.softmax(scores.masked_fill((scores > 3).expand_as(scores), -1e30), -1) @ v


def integer_mask_added(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    return torch.softmax(scores + (mask == 0).long().view(q.size(0), 1, 1, -1), -1) @ v


def integer_tensor_fill(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, torch.tensor(-(10**9))), -1) @ v


def nan_fill(q, k, v, mask):
    scores = q @ k.transpose(-1, -2)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(scores)
    return torch.softmax(scores.masked_fill(mask, torch.tensor(float("nan"))), -1) @ v


@pytest.mark.parametrize(
    ("fn", "reason"),
    [
        (scores_returned, "'scores' is also used by 'output'"),
        (expanded_mask_returned, "'scores' is also read by"),
        (expand_not_outermost, "'scores' is also read by"),
        (expanded_past_the_scores, "broadcasts the scores"),
        (condition_from_the_scores, "also used by"),
        (integer_mask_added, "torch.int64"),
        (integer_tensor_fill, "not a large negative"),
        (nan_fill, "not a large negative"),
    ],
    ids=[
        "scores-returned",
        "expanded-mask-returned",
        "expand-not-outermost",
        "expanded-past-the-scores",
        "condition-from-scores",
        "integer-mask-added",
        "integer-fill",
        "nan-fill",
    ],
)
def test_left_alone_with_a_reason(fn, reason):
    gm, inputs = capture(fn, *qkv(), padding(), dynamic=False)
    code, expected = gm.code, run(gm, inputs)
    sites = ManualAttention()(gm)
    assert len(sites) == 1 and not sites[0].lowered and not sites[0].failed, sites
    assert reason in sites[0].reason, sites[0].reason
    assert gm.code == code
    torch.testing.assert_close(run(gm, inputs), expected, equal_nan=True)


def expanded_as_another_tensor(q, k, v, mask, other):
    scores = q @ k.transpose(-1, -2)
    mask = (mask == 0).view(q.size(0), 1, 1, -1).expand_as(other)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def test_mask_expanded_as_another_tensor_of_the_scores_shape_is_lowered_exactly():
    # Dropping an expand is exact whatever it expands to, once the fill keeps the scores' shape
    # (score_masks.broadcast_wrapper): the mask broadcasts to the scores with the same values.
    q, k, v = qkv()
    args = (q, k, v, padding(), torch.zeros(2, 4, 5, 6))
    gm, inputs = capture(expanded_as_another_tensor, *args, dynamic=False)
    expected = run(gm, inputs)
    assert [s.lowered for s in ManualAttention()(gm)] == [True]
    assert not any(n.target == "expand_as" for n in gm.graph.nodes)
    torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)


def test_pass_uuid_covers_score_masks(monkeypatch):
    # Compile caches key on the pass's uuid: a change of what score_masks.py matches must show.
    before = ManualAttention().uuid()
    source = inspect.getsource
    monkeypatch.setattr(
        inspect, "getsource", lambda m: source(m) + ("# changed" if m is score_masks else "")
    )
    assert ManualAttention().uuid() != before
