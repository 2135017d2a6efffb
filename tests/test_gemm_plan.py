"""SmoothGEMM planning: tile menus, the cost model, M buckets, max_tokens, shape guards."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import capture

import xy_inductor
from xy_inductor.kernels.gemm_plan import tile_cost
from xy_inductor.kernels.triton.menus import GEMM_MENU
from xy_inductor.lowering import LoweringOptions, lower_graph
from xy_inductor.lowering.linear_to_gemm import LinearToGemm
from xy_inductor.runtime.ops import gemm_impl
from xy_inductor.runtime.providers import plan_gemm
from xy_inductor.shape_guards import check_shapes

# Linear shapes (N, K) of Llama-2-7B and Qwen2.5-7B, and odd ones.
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (4608, 3584), (37, 129)]


@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_buckets_cover_one_to_max_tokens_without_gaps(n, k, dtype):
    plan = plan_gemm(n, k, dtype=dtype, max_tokens=8192)
    assert plan.buckets[0].lo == 1
    assert plan.buckets[-1].hi == 8192
    for a, b in zip(plan.buckets, plan.buckets[1:], strict=False):
        assert b.lo == a.hi + 1
        assert a.tile != b.tile  # neighbours with one tile would be one bucket


@pytest.mark.parametrize(("n", "k"), [(4096, 4096), (22016, 4096), (37, 129)])
def test_each_m_gets_a_tile_of_least_cost(n, k):
    menu = GEMM_MENU
    plan = plan_gemm(n, k, dtype=torch.bfloat16, max_tokens=2048)
    fitting = [t for t in menu.tiles if t.smem_bytes(2) <= menu.smem_limit]
    for m in [*range(1, 300), 511, 512, 513, 1000, 1024, 2047, 2048]:
        chosen = plan.tile_for(m)
        best = min(tile_cost(menu, t, m, n, k, 2) for t in fitting)
        assert tile_cost(menu, chosen, m, n, k, 2) == pytest.approx(best)


def test_small_m_gets_small_tiles_and_large_m_large_ones():
    plan = plan_gemm(4096, 4096, max_tokens=8192)
    assert plan.tile_for(1).block_m == 16  # decode: least padding
    assert plan.tile_for(4096).block_m == 128


def test_tiles_that_do_not_fit_shared_memory_are_not_planned():
    menu = GEMM_MENU
    plan = plan_gemm(4096, 4096, dtype=torch.float32)
    for tile in plan.tiles():
        assert tile.smem_bytes(4) <= menu.smem_limit
    assert any(t.smem_bytes(4) > menu.smem_limit for t in menu.tiles)  # some were skipped


def test_plans_are_cached_and_lookups_check_their_range():
    assert plan_gemm(4096, 4096) is plan_gemm(4096, 4096)
    plan = plan_gemm(64, 64, max_tokens=100)
    with pytest.raises(ValueError, match=r"M in 1\.\.100: got M=101"):
        plan.tile_for(101)
    assert plan.covers(100) and not plan.covers(101)


def test_plan_is_printable_per_bucket():
    text = str(plan_gemm(4096, 4096, max_tokens=512))
    assert "N=4096 K=4096" in text and "m16n64k128" in text
    assert text.count("\n") == len(plan_gemm(4096, 4096, max_tokens=512).buckets) + 1


def test_aten_plan_is_one_bucket_served_by_the_library():
    plan = plan_gemm(4096, 4096, provider="aten", max_tokens=300)
    assert [(b.lo, b.hi, b.tile) for b in plan.buckets] == [(1, 300, None)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0, "k": 4}, "n must be a positive int"),
        ({"n": 4, "k": 4.0}, "k must be a positive int"),
        ({"n": 4, "k": 4, "max_tokens": 0}, "max_tokens must be a positive int"),
        ({"n": 4, "k": 4, "dtype": torch.int32}, "dtype must be a floating-point"),
        ({"n": 4, "k": 4, "provider": "cuda"}, "provider must be one of"),
    ],
)
def test_plan_gemm_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_gemm(**kwargs)


# -- max_tokens at run time ------------------------------------------------------------------


def test_m_above_max_tokens_is_counted_warned_once_and_correct():
    w = torch.randn(8, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (4, 5, 9, 30):
            x = torch.randn(m, 16)
            torch.testing.assert_close(gemm_impl(x, w, None, 4), F.linear(x, w))
    assert xy_inductor.stats().gemm_over_max_tokens == 3
    assert [str(w.message).split(";")[0] for w in caught] == [
        "xyserve.gemm: M=5 rows is above max_tokens=4 (N=8, K=16)"
    ]


def test_m_over_max_tokens_never_recompiles():
    model = nn.Sequential(nn.Linear(16, 8)).eval()
    compiled = xy_inductor.compile(model, max_tokens=8)
    with torch.no_grad():
        for m in (3, 4, 9, 40, 2, 100):
            x = torch.randn(m, 16)
            torch.testing.assert_close(compiled(x), model(x))
    assert xy_inductor.stats().backend_compiles == 1
    assert xy_inductor.stats().gemm_over_max_tokens == 3


def test_bad_max_tokens_in_the_op_is_a_clear_error():
    with pytest.raises(ValueError, match="max_tokens must be a positive int, got 0"):
        gemm_impl(torch.randn(2, 4), torch.randn(3, 4), None, 0)


def test_lowering_writes_max_tokens_into_each_gemm_and_its_uuid():
    gm, _ = capture(nn.Linear(8, 4).eval(), torch.randn(3, 8))
    lower_graph(gm, LoweringOptions(max_tokens=512))
    gemms = [n for n in gm.graph.nodes if n.target is torch.ops.xyserve.gemm.default]
    assert [n.kwargs["max_tokens"] for n in gemms] == [512]
    assert (
        LinearToGemm(LoweringOptions(max_tokens=512)).uuid()
        != LinearToGemm(LoweringOptions()).uuid()
    )


# -- symbolic shape guards --------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):  # x [B, L, 32]: M = B * L
        return self.proj(x).softmax(-1)


def _checks(x: torch.Tensor, max_tokens: int, mark=None):
    if mark is not None:
        mark(x)
    gm, _ = capture(_Block().eval(), x, dynamic=None if mark else True)
    lower_graph(gm, LoweringOptions(max_tokens=max_tokens))
    return check_shapes(gm, max_tokens)


def test_gemm_m_is_a_product_of_size_symbols_and_unbounded_is_not_covered():
    (check,) = _checks(torch.randn(2, 5, 32), 8192)
    assert check.op == "gemm" and check.size == "M"
    assert re.fullmatch(r"s\d+\*s\d+", check.expr)  # B * L, two distinct symbols
    assert check.hi is None and check.covered is False
    assert "NOT covered" in str(check)


def test_mark_dynamic_bounds_inside_max_tokens_are_covered():
    def mark(x):
        torch._dynamo.mark_dynamic(x, 0, min=1, max=4)
        torch._dynamo.mark_dynamic(x, 1, min=2, max=512)

    (check,) = _checks(torch.randn(2, 5, 32), 4096, mark)
    # Dynamo raises a lower bound of 1 to 2 (it specialises sizes 0 and 1): M >= 2 * 2.
    assert (check.lo, check.hi, check.covered) == (4, 2048, True)
    (check,) = _checks(torch.randn(2, 5, 32), 1024, mark)
    assert check.covered is False


def test_static_sizes_are_numbers():
    gm, _ = capture(_Block().eval(), torch.randn(2, 5, 32), dynamic=False)
    lower_graph(gm, LoweringOptions())
    (check,) = check_shapes(gm, 16)
    assert (check.expr, check.lo, check.hi, check.covered) == ("10", 10, 10, True)


def test_attention_lengths_are_reported():
    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=False)

    q = torch.randn(1, 2, 7, 8)
    k = v = torch.randn(1, 2, 9, 8)
    gm, _ = capture(attn, q, k, v)
    lower_graph(gm, LoweringOptions())
    checks = check_shapes(gm, 8192)
    assert [(c.op, c.size, c.covered) for c in checks] == [
        ("attention", "Lq", None),
        ("attention", "Lk", None),
    ]


def test_explain_reports_gemms_max_tokens_does_not_cover():
    with torch.no_grad():
        report = xy_inductor.explain(_Block().eval(), torch.randn(2, 5, 32))
    assert len(report.uncovered) == 1
    assert "M = " in report.uncovered[0] and "NOT covered" in report.uncovered[0]
    assert "dynamic sizes" in str(report)


def test_shape_checks_add_no_guards():
    # New B and L after the first call: one graph, no recompile (batch 1 would specialise).
    compiled = xy_inductor.compile(_Block().eval())
    with torch.no_grad():
        compiled(torch.randn(2, 5, 32))
        with torch.compiler.set_stance("fail_on_recompile"):
            for b, length in ((3, 7), (4, 300), (2, 9000)):
                compiled(torch.randn(b, length, 32))
    assert xy_inductor.stats().backend_compiles == 1
