"""The lowering passes: op counts before/after, numerics, look-alikes, reasons, idempotence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, capture, count_calls, randn, rel_error, run

from xy_inductor.lowering import (
    PASSES,
    FuseSiblingGemms,
    LinearToGemm,
    ManualAttention,
    SdpaToAttention,
    lower_graph,
)
from xy_inductor.lowering.linear_to_gemm import LINEAR
from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.sdpa_to_attention import SDPA

GEMM = torch.ops.xyserve.gemm.default
ATTENTION = torch.ops.xyserve.attention.default
SIZES = (1, 7, 37, 129)


def test_pass_list_is_explicit_and_ordered():
    assert [(flag, cls) for flag, cls in PASSES] == [
        ("lower_attention", SdpaToAttention),
        ("lower_manual_attention", ManualAttention),
        ("lower_linear", LinearToGemm),
        ("fuse_siblings", FuseSiblingGemms),
    ]


# -- SDPA -> xyserve.attention ---------------------------------------------------------------


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_gqa_mask_scale(q, k, v, mask):
    # Keyword order and a positional mask, as in Hugging Face's sdpa_attention_forward.
    return F.scaled_dot_product_attention(q, k, v, mask, scale=0.2, enable_gqa=True)


def sdpa_positional(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", SIZES)
@pytest.mark.parametrize("variant", ["causal", "gqa_bool_mask", "float_mask_positional"])
def test_sdpa_pass_counts_and_numerics(dtype, length, variant):
    b, hq, hkv, d = 2, 8, 2, 16
    q = randn(b, hq, length, d, dtype=dtype, seed=1)
    if variant == "causal":
        fn, k, v = (
            sdpa_causal,
            randn(b, hq, length, d, dtype=dtype, seed=2),
            randn(b, hq, length, d, dtype=dtype, seed=3),
        )
        args = (q, k, v)
    elif variant == "gqa_bool_mask":
        fn = sdpa_gqa_mask_scale
        k, v = (
            randn(b, hkv, length + 3, d, dtype=dtype, seed=2),
            randn(b, hkv, length + 3, d, dtype=dtype, seed=3),
        )
        mask = torch.ones(length, length + 3, dtype=torch.bool).tril(3)[None, None]
        args = (q, k, v, mask)
    else:
        fn = sdpa_positional
        k, v = (
            randn(b, hq, length, d, dtype=dtype, seed=2),
            randn(b, hq, length, d, dtype=dtype, seed=3),
        )
        args = (q, k, v, randn(1, 1, length, length, dtype=dtype, seed=4))
    # Static sizes: with dynamic=True the head counts of raw q/k/v inputs would be symbols
    # (covered by test_sdpa_pass_leaves_symbolic_gqa_heads).
    gm, inputs = capture(fn, *args, dynamic=False)
    expected = run(gm, inputs)
    assert (count_calls(gm, SDPA), count_calls(gm, ATTENTION)) == (1, 0)

    p = SdpaToAttention()
    sites = p(gm)
    assert p.matched == 1 and [s.lowered for s in sites] == [True]
    assert (count_calls(gm, SDPA), count_calls(gm, ATTENTION)) == (0, 1)
    out = run(gm, inputs)
    assert rel_error(out, expected) < TOLERANCE[dtype]
    reference = fn(*(a.double() if a.is_floating_point() else a for a in args))
    assert rel_error(out, reference) < TOLERANCE[dtype]


def test_sdpa_pass_lowers_dynamic_sizes_with_equal_heads():
    args = (randn(2, 4, 7, 16), randn(2, 4, 9, 16, seed=1), randn(2, 4, 9, 16, seed=2))
    gm, inputs = capture(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), *args)
    expected = run(gm, inputs)
    assert [s.lowered for s in SdpaToAttention()(gm)] == [True]
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]


def test_sdpa_pass_lowers_symbolic_gqa_heads_that_sdpa_proved():
    # Head counts of raw inputs are symbols under dynamic=True; SDPA's own trace asserts that
    # Hq is a multiple of Hkv, which is what the pass needs to lower without a new guard.
    args = (randn(2, 8, 7, 16), randn(2, 2, 7, 16, seed=1), randn(2, 2, 7, 16, seed=2))
    gm, inputs = capture(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), *args
    )
    expected = run(gm, inputs)
    assert [s.lowered for s in SdpaToAttention()(gm)] == [True]
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]


def manual_attention(q, k, v):
    # Looks like attention, but is not an SDPA call: this pass must leave it alone.
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v


def test_sdpa_pass_ignores_manual_attention():
    args = (randn(1, 2, 7, 16), randn(1, 2, 7, 16, seed=1), randn(1, 2, 7, 16, seed=2))
    gm, _ = capture(manual_attention, *args)
    before = gm.code
    p = SdpaToAttention()
    assert p(gm) == [] and p.matched == 0
    assert gm.code == before


@pytest.mark.parametrize(
    ("fn", "args", "reason"),
    [
        (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1),
            (randn(1, 2, 7, 16), randn(1, 2, 7, 16), randn(1, 2, 7, 16)),
            "dropout_p=0.1",
        ),
        (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            (randn(2, 7, 16), randn(2, 7, 16), randn(2, 7, 16)),
            "takes [B, H, L, D]",
        ),
        (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
            (randn(2, 1, 2, 7, 16), randn(2, 1, 2, 7, 16), randn(2, 1, 2, 7, 16)),
            "are 5/5/5-D",
        ),
    ],
    ids=["dropout", "3d", "5d"],
)
def test_sdpa_pass_leaves_unsupported_calls_with_a_reason(fn, args, reason):
    gm, _ = capture(fn, *args)
    before = gm.code
    sites = SdpaToAttention()(gm)
    assert len(sites) == 1 and not sites[0].lowered and reason in sites[0].reason
    assert gm.code == before


# -- the pipeline -----------------------------------------------------------------------------


def block(x, w_q, w_o):
    b, length, _ = x.shape
    q = F.linear(x, w_q).view(b, length, 2, 8).transpose(1, 2)
    a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return F.linear(a.transpose(1, 2).reshape(b, length, 16), w_o)


def test_lowering_is_idempotent():
    args = (randn(2, 7, 16), randn(16, 16, seed=1), randn(16, 16, seed=2))
    gm, _ = capture(block, *args)
    first = lower_graph(gm, LoweringOptions())
    code = gm.code
    second = lower_graph(gm, LoweringOptions())
    counts = {
        "sdpa_to_attention": 1,
        "manual_attention": 0,
        "linear_to_gemm": 2,
        "fuse_siblings": 0,
    }
    assert first.matches == counts
    assert second.matches == {name: 0 for name in counts}
    assert gm.code == code
    assert [(s.kind, s.lowered) for s in second.sites] == [(s.kind, s.lowered) for s in first.sites]


def test_disabled_pass_reports_its_sites_with_the_option():
    gm, _ = capture(block, randn(2, 7, 16), randn(16, 16, seed=1), randn(16, 16, seed=2))
    report = lower_graph(gm, LoweringOptions(lower_linear=False))
    assert report.count("attention", lowered=True) == 1
    assert report.count("linear", lowered=False) == 2
    assert all(
        s.reason == "disabled by option lower_linear=False"
        for s in report.sites
        if s.kind == "linear"
    )
    assert count_calls(gm, LINEAR) == 2


def test_skip_reason_lists_sites_without_rewriting():
    gm, _ = capture(block, randn(2, 7, 16), randn(16, 16, seed=1), randn(16, 16, seed=2))
    code = gm.code
    report = lower_graph(gm, LoweringOptions(), skip_reason="needs gradients")
    assert report.fallback == "needs gradients" and gm.code == code
    assert (
        report.count("attention"),
        report.count("linear"),
        report.count("linear", lowered=True),
    ) == (1, 2, 0)


# -- repeat_kv absorption -----------------------------------------------------------------------


def repeat_kv(x, n):
    # transformers' repeat_kv: what its SDPA path runs whenever there is a mask
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def sdpa_on_repeated_kv(q, k, v, mask):
    return F.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask)


def sdpa_on_repeat_interleave(q, k, v, mask):
    k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_repeat_also_returned(q, k, v, mask):
    k = repeat_kv(k, 4)
    return F.scaled_dot_product_attention(q, k, repeat_kv(v, 4), attn_mask=mask), k


def gqa_inputs(length=7):
    q = randn(2, 8, length, 16, seed=1)
    k, v = randn(2, 2, length, 16, seed=2), randn(2, 2, length, 16, seed=3)
    return q, k, v, torch.ones(length, length, dtype=torch.bool).tril()[None, None]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("fn", [sdpa_on_repeated_kv, sdpa_on_repeat_interleave])
def test_sdpa_pass_reads_kv_unrepeated(fn, dynamic):
    gm, inputs = capture(fn, *gqa_inputs(), dynamic=dynamic)
    expected = run(gm, inputs)
    assert [s.lowered for s in SdpaToAttention()(gm)] == [True]
    (node,) = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert [node.args[i].meta["example_value"].shape[1] for i in (1, 2)] == [2, 2]
    assert not any(n.target in ("expand", "reshape", "repeat_interleave") for n in gm.graph.nodes)
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]


def test_repeat_used_elsewhere_stays_for_its_other_user():
    gm, inputs = capture(sdpa_repeat_also_returned, *gqa_inputs(), dynamic=False)
    expected = run(gm, inputs)
    SdpaToAttention()(gm)
    (node,) = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert node.args[1].meta["example_value"].shape[1] == 2  # attention reads K unrepeated
    assert sum(n.target == "reshape" for n in gm.graph.nodes) == 1  # the returned repeat stays
    with torch.no_grad():
        out, k = gm(*inputs)
    assert k.shape[1] == 8 and rel_error(out, expected) < TOLERANCE[torch.float32]


def test_kv_repeated_differently_is_lowered_without_absorbing():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(
            q, repeat_kv(k, 4), v.repeat_interleave(4, dim=1).contiguous()
        )

    q, k, v, _ = gqa_inputs()
    gm, inputs = capture(fn, q, k, v, dynamic=False)
    expected = run(gm, inputs)
    assert [s.lowered for s in SdpaToAttention()(gm)] == [True]
    (node,) = [n for n in gm.graph.nodes if n.target is ATTENTION]
    assert node.args[1].meta["example_value"].shape[1] == 8
    assert rel_error(run(gm, inputs), expected) < TOLERANCE[torch.float32]


def graph_with_fakes(fn, *fakes):
    """``fn`` traced by FX, its inputs given traced values: graphs that mix devices only exist
    on machines with accelerators, but the passes' checks only read these values."""
    gm = torch.fx.symbolic_trace(fn)
    for node, value in zip(
        [n for n in gm.graph.nodes if n.op == "placeholder"], fakes, strict=True
    ):
        node.meta["example_value"] = value
    return gm


def test_passes_leave_mixed_devices_alone():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(3, 8), torch.empty(4, 8, device="meta")
        q = torch.empty(1, 2, 5, 8)
        mask = torch.ones(1, 1, 5, 5, dtype=torch.bool, device="meta")
    gm = graph_with_fakes(lambda x, w: F.linear(x, w), x, w)
    (site,) = LinearToGemm()(gm)
    assert not site.lowered and "devices differ: cpu, meta" in site.reason
    gm = graph_with_fakes(
        lambda q, m: F.scaled_dot_product_attention(q, q, q, attn_mask=m), q, mask
    )
    (site,) = SdpaToAttention()(gm)
    assert not site.lowered and "attn_mask is on meta" in site.reason


def test_passes_leave_mixed_dtypes_alone():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(3, 8), torch.empty(4, 8, dtype=torch.bfloat16)
        q, k = torch.empty(1, 2, 5, 8), torch.empty(1, 2, 5, 8, dtype=torch.bfloat16)
    gm = graph_with_fakes(lambda x, w: F.linear(x, w), x, w)
    (site,) = LinearToGemm()(gm)
    assert not site.lowered and "dtypes differ: torch.float32, torch.bfloat16" in site.reason
    gm = graph_with_fakes(lambda q, k: F.scaled_dot_product_attention(q, k, k), q, k)
    (site,) = SdpaToAttention()(gm)
    assert not site.lowered and "dtypes differ" in site.reason
