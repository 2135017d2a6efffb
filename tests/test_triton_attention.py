"""The Triton meta-attention kernel and provider, under ``TRITON_INTERPRET=1`` without CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from test_attention_plan import _layouts, reference

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl
from xy_inductor.kernels import cpu
from xy_inductor.kernels import triton as triton_provider
from xy_inductor.kernels.triton_attention import menu_for, triton_attention
from xy_inductor.runtime import providers
from xy_inductor.runtime.attention_plan import plan_attention
from xy_inductor.runtime.providers import Provider

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(data, rows, group, head_dim, block_size, causal, window, dtype, seed, longest):
    kv_lens = data.draw(st.lists(st.integers(1, longest), min_size=rows, max_size=rows))
    q_lens = [data.draw(st.sampled_from([1, kv, max(1, kv // 3), min(kv, 5)])) for kv in kv_lens]
    hkv = 2 if group <= 2 else 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hkv * group, head_dim, generator=gen).to(dtype)
    ks = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    vs = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    dense, paged = _layouts(ks, vs, kv_lens, block_size, hkv, head_dim, gen)
    menu = menu_for(group, workers=3, kv_chunk=data.draw(st.sampled_from([32, 64])))
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=menu)
    want = reference(q, ks, vs, q_lens, kv_lens, causal, window, head_dim**-0.5)
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
    plan = plan_attention([3, 2], [0, 5], causal=False, kv_heads=1, menu=menu_for(1, 2))
    q = torch.randn(5, 1, 16, device=DEVICE)
    k = v = torch.randn(2, 1, 5, 16, device=DEVICE)
    out = torch.full((5, 1, 16), float("nan"), device=DEVICE)
    got = triton_attention(plan, q, k, v, [0, 5], scale=0.25, out=out)
    assert (got[:3] == 0).all()
    want = torch.softmax(q[3:, 0] @ k[1, 0].T * 0.25, -1) @ v[1, 0]
    torch.testing.assert_close(got[3:, 0], want, rtol=1e-5, atol=1e-5)


def test_tiles_larger_than_the_kernel_block_are_refused():
    plan = plan_attention([100], [100], causal=True, kv_heads=1)  # CPU menu: tiles of 128
    q = torch.randn(100, 4, 16, device=DEVICE)
    k = v = torch.randn(1, 1, 100, 16, device=DEVICE)
    with pytest.raises(ValueError, match="plan with menu_for"):
        triton_attention(plan, q, k, v, [100], scale=0.25)


@pytest.fixture
def triton_attention_first():
    # Only attention through Triton: the GEMMs stay on ATen (the interpreter is slow).
    only_attention = Provider(
        name="triton",
        available=lambda: True,
        kernels={"attention": triton_provider.PROVIDER.kernels["attention"]},
    )
    with providers.use_providers([only_attention, cpu.PROVIDER]):
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
    reason = triton_provider.check_attention(q, k, v, window[None, None], False, None)
    assert reason.startswith("mask is not rows of padding")
    assert triton_provider.check_attention(q, k, v, None, True, None) is None
    assert math.isfinite(float(triton_provider.run_attention(q, k, v, None, True, None).sum()))


def test_split_query_tiles_are_merged_inside_the_launch():
    # Decode rows over 200 keys in chunks of 32: every query tile is split in 7 parts.
    gen = torch.Generator().manual_seed(7)
    q_lens, kv_lens = [1, 1, 3], [200, 131, 64]
    plan = plan_attention(q_lens, kv_lens, causal=True, kv_heads=2, menu=menu_for(4, 3, 32))
    assert plan.split
    q = torch.randn(5, 8, 64, generator=gen)
    ks = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    vs = [torch.randn(n, 2, 64, generator=gen) for n in kv_lens]
    (k, v), _ = _layouts(ks, vs, kv_lens, 16, 2, 64, gen)
    out = torch.full((5, 8, 64), float("nan"), device=DEVICE)
    got = triton_attention(
        plan, q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kv_lens, scale=0.125, out=out
    )
    want = reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
    assert ((got.double().cpu() - want).norm() / want.norm()).item() < 1e-5
