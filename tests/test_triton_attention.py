"""The Triton meta-attention kernel and provider, under ``TRITON_INTERPRET=1`` without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from helpers import kv_layouts, packed_reference

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl
from xy_inductor.kernels import aten
from xy_inductor.kernels import triton as triton_provider
from xy_inductor.kernels.aten.menus import ATTENTION_MENU
from xy_inductor.kernels.attention_plan import AttentionMenu, plan_attention
from xy_inductor.kernels.calls import DenseAttention
from xy_inductor.kernels.triton.attention import triton_attention
from xy_inductor.kernels.triton.menus import attention_menu
from xy_inductor.runtime import providers
from xy_inductor.runtime.providers import Accept, Provider

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernel_menu(group: int, workers: int, kv_chunk: int = 512) -> AttentionMenu:
    return attention_menu(group, workers, kv_chunk)


def _case(data, rows, group, head_dim, block_size, causal, window, dtype, seed, longest):
    kv_lens = data.draw(st.lists(st.integers(1, longest), min_size=rows, max_size=rows))
    q_lens = [data.draw(st.sampled_from([1, kv, max(1, kv // 3), min(kv, 5)])) for kv in kv_lens]
    hkv = 2 if group <= 2 else 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hkv * group, head_dim, generator=gen).to(dtype)
    ks = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    vs = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    dense, paged = kv_layouts(ks, vs, kv_lens, block_size, hkv, head_dim, gen)
    menu = kernel_menu(group, workers=3, kv_chunk=data.draw(st.sampled_from([32, 64])))
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=menu)
    want = packed_reference(q, ks, vs, q_lens, kv_lens, causal, window, head_dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for layout in ("dense", "paged"):
        out = torch.full((sum(q_lens), hkv * group, head_dim), float("nan")).to(dtype)  # poison
        if layout == "dense":
            k, v, extra = dense[0], dense[1], {}
        else:
            k, v, table = paged
            extra = {"block_table": table.to(DEVICE), "block_size": block_size}
        got = triton_attention(
            plan, q.to(DEVICE), k.to(dtype).to(DEVICE), v.to(dtype).to(DEVICE), kv_lens,
            scale=head_dim**-0.5, out=out.to(DEVICE), **extra,
        )  # fmt: skip
        assert not got.isnan().any(), f"{layout}: an output element was not written"
        err = ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < tolerance, f"{layout}: relative error {err:.2e}"


STRATEGY = {
    "data": st.data(),
    "rows": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 4, 8]),
    "head_dim": st.sampled_from([64, 128]),
    "block_size": st.sampled_from([16, 32]),
    "causal": st.booleans(),
    "window": st.one_of(st.none(), st.integers(1, 64)),
    "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    "seed": st.integers(0, 2**16),
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**STRATEGY)
def test_kernel_matches_float64_for_random_token_tables(**kw):
    _case(**kw, longest=96)


@pytest.mark.slow
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**STRATEGY)
def test_kernel_matches_float64_for_token_tables_up_to_300(**kw):
    _case(**kw, longest=300)


def test_a_row_with_no_keys_reads_zeros_like_sdpa():
    # Non-causal rows may have no keys at all: every key is masked, SDPA gives zeros.
    plan = plan_attention([3, 2], [0, 5], causal=False, kv_heads=1, menu=kernel_menu(1, 2))
    q = torch.randn(5, 1, 16, device=DEVICE)
    k = v = torch.randn(2, 1, 5, 16, device=DEVICE)
    out = torch.full((5, 1, 16), float("nan"), device=DEVICE)
    got = triton_attention(plan, q, k, v, [0, 5], scale=0.25, out=out)
    assert (got[:3] == 0).all()
    want = torch.softmax(q[3:, 0] @ k[1, 0].T * 0.25, -1) @ v[1, 0]
    torch.testing.assert_close(got[3:, 0], want, rtol=1e-5, atol=1e-5)


def test_tiles_larger_than_the_kernel_block_are_refused():
    cpu_menu = ATTENTION_MENU  # tiles of 128
    plan = plan_attention([100], [100], causal=True, kv_heads=1, menu=cpu_menu)
    q = torch.randn(100, 4, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 100, 16, device=DEVICE)
    with pytest.raises(ValueError, match="plan with attention_menu"):
        triton_attention(plan, q, k, v, [100], scale=0.25)


@pytest.fixture
def triton_attention_first():
    # Only attention through Triton: the GEMMs stay on ATen (the interpreter is slow).
    only_attention = Provider(
        name="triton",
        unavailable=lambda: None,
        kernels={"attention": triton_provider.PROVIDER.kernels["attention"]},
    )
    with providers.use_providers([only_attention, aten.PROVIDER]):
        yield


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU model through the interpreter; CUDA runs the rest"
)
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_generate_tokens_are_unchanged_with_the_triton_kernel(triton_attention_first, cache):
    reference_model = wl.tiny_llama(num_hidden_layers=2)
    calls = ((7,), (5, 3))
    expected = wl.generate_pass(reference_model, cache, calls, 3).outputs
    model = hf.accelerate(wl.copy_model(reference_model))
    got = wl.generate_pass(model, cache, calls, 3).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    calls_by = xy_inductor.stats().calls["attention"]
    assert calls_by.get("triton", 0) > 0 and "aten" not in calls_by


def test_provider_declines_masks_that_are_not_rows(triton_attention_first):
    q = k = v = torch.randn(1, 2, 8, 16, device=DEVICE)
    window = torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(
        -3
    )
    call = DenseAttention(q, k, v, window[None, None], False, None)
    reason = triton_provider.check_attention(call)
    assert reason.startswith("mask is not rows of padding")
    call = DenseAttention(q, k, v, None, True, None)
    accept = triton_provider.check_attention(call)
    assert isinstance(accept, Accept) and accept.path == "rows"
    assert math.isfinite(float(triton_provider.run_attention(call, accept).sum()))


def test_split_query_tiles_are_merged_by_a_second_launch():
    # Decode rows over 200 keys in chunks of 32: every query tile is split in 7 parts.
    gen = torch.Generator().manual_seed(7)
    q_lens, kv_lens = [1, 1, 3], [200, 131, 64]
    plan = plan_attention(q_lens, kv_lens, causal=True, kv_heads=2, menu=kernel_menu(4, 3, 32))
    assert plan.split
    q = torch.randn(5, 8, 64, generator=gen)
    ks = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    vs = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    (k, v), _ = kv_layouts(ks, vs, kv_lens, 16, 2, 64, gen)
    out = torch.full((5, 8, 64), float("nan"), device=DEVICE)
    got = triton_attention(
        plan, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kv_lens, scale=0.125, out=out
    )
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
    assert ((got.double().cpu() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("strided", ["q", "k", "v"])
def test_inputs_strided_in_the_head_dim_are_declined_not_misread(strided):
    # Regression: the kernel assumed stride(-1) == 1 and neither checker tested it; a q with
    # stride(-1) == 2 was accepted and gave a max error of 1.65.
    gen = torch.Generator().manual_seed(11)
    args, (q, ks, vs) = varlen_inputs(gen)
    q_, k_, v_ = args[:3]
    wide = {"q": q_, "k": k_, "v": v_}[strided]
    spread = torch.zeros(*wide.shape[:-1], 2 * wide.shape[-1], dtype=wide.dtype)
    spread[..., ::2] = wide
    view = spread[..., ::2]
    assert view.stride(-1) == 2 and torch.equal(view, wide)
    args = (*(view if a is wide else a for a in args[:3]), *args[3:])
    with providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER]):
        got = torch.ops.xyserve.attention_varlen(*args)
    want = packed_reference(q, ks, vs, [5, 1, 9], [5, 40, 30], True, None, 64**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    stats = xy_inductor.stats()
    assert stats.paths["attention_varlen"] == {"aten/rows": 1}
    reason = "triton: q, k or v not contiguous in the head dim (it would need a copy)"
    assert stats.declined["attention_varlen"] == {reason: 1}
    plan = plan_attention([5, 1, 9], [5, 40, 30], causal=True, kv_heads=2, menu=kernel_menu(2, 4))
    with pytest.raises(ValueError, match=f"{strided} must be contiguous in its last dim"):
        triton_attention(plan, *args[:3], [5, 40, 30], scale=0.125, block_table=args[5],
                         block_size=16)  # fmt: skip


def varlen_inputs(gen):
    """A prefill, a decode and a chunked-prefill row over a paged cache (blocks of 16)."""
    q_lens, kv_lens = [5, 1, 9], [5, 40, 30]
    q = torch.randn(sum(q_lens), 4, 64, generator=gen)
    ks = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    vs = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    _, (k, v, table) = kv_layouts(ks, vs, kv_lens, 16, 2, 64, gen)
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    return (q, k, v, cu, kv, table), (q, ks, vs)


def test_tables_are_built_once_per_plan_and_shared_by_layers():
    gen = torch.Generator().manual_seed(12)
    args, _ = varlen_inputs(gen)
    args = tuple(a.to(DEVICE) for a in args)
    with providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER]):
        first = torch.ops.xyserve.attention_varlen(*args)
        menu = kernel_menu(2, triton_provider._menu(args[0], 2).workers)
        plan = plan_attention([5, 1, 9], [5, 40, 30], causal=True, kv_heads=2, menu=menu)
        tables, rows = (
            plan.cache[("triton", args[0].device)],
            plan.cache[("triton rows", args[0].device)],
        )
        for _ in range(3):  # the next layers of the step
            torch.testing.assert_close(torch.ops.xyserve.attention_varlen(*args), first)
        assert plan.cache[("triton", args[0].device)] is tables
        assert plan.cache[("triton rows", args[0].device)] is rows
        # The next decode step (one more key per row, same shape class): same plan and tables,
        # new row arrays.
        longer = (
            *args[:4],
            args[4] + torch.tensor([0, 1, 0], dtype=torch.int32, device=DEVICE),
            args[5],
        )
        torch.ops.xyserve.attention_varlen(*longer)
        assert plan.cache[("triton", args[0].device)] is tables
        assert plan.cache[("triton rows", args[0].device)] is not rows
    assert xy_inductor.stats().paths["attention_varlen"] == {"triton/plan": 5}
