"""Meta-attention: the planner's tables, and the CPU executor against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xy_inductor.kernels.cpu_attention import run_plan
from xy_inductor.runtime.attention_plan import (
    AttentionMenu,
    TokenTable,
    choose_q_tile,
    plan_attention,
    symmetric_round_robin,
    tiles_from_mask,
)

MENU = AttentionMenu(q_tiles=(1, 16, 64), kv_chunk=32, workers=4)


def visible(q_len: int, kv_len: int, causal: bool, window: int | None) -> torch.Tensor:
    """[q_len, kv_len] bool: which keys each query of a row may see."""
    qpos = torch.arange(q_len)[:, None] + kv_len - q_len
    kpos = torch.arange(kv_len)[None, :]
    ok = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        ok &= kpos <= qpos
    if window is not None:
        ok &= kpos > qpos - window
    return ok


# -- token table and task table ----------------------------------------------------------------


def test_rows_get_small_tiles_for_decode_and_large_for_prefill():
    table = TokenTable.build([1, 5, 40, 500], [900, 905, 40, 500], (1, 16, 64, 128))
    assert table.q_tile == (1, 16, 64, 128)
    assert table.q_start == (0, 1, 6, 46)
    assert choose_q_tile(129, (16, 128)) == 128


def test_bad_rows_are_rejected_with_the_row():
    with pytest.raises(
        ValueError, match=r"row 1: expected 0 <= q_len <= kv_len.*q_len=9, kv_len=4"
    ):
        plan_attention([1, 9], [4, 4], causal=True)
    with pytest.raises(ValueError, match="q_lens has 2 rows but kv_lens has 1"):
        TokenTable.build([1, 2], [3], (16,))
    with pytest.raises(ValueError, match="window must be a positive int"):
        plan_attention([1], [4], causal=True, window=0)


def test_symmetric_round_robin_deals_back_and_forth():
    assert symmetric_round_robin(10, 4) == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.integers(1, 300), st.integers(0, 300), st.sampled_from(["full", "one", "some"])
        ),
        min_size=1,
        max_size=5,
    ),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 80)),
)
def test_plan_covers_every_visible_pair_once_and_schedules_no_hidden_tile(rows, causal, window):
    kv_lens = [kv for kv, _, _ in rows]
    q_lens = [
        kv if kind == "full" else 1 if kind == "one" else max(1, min(q, kv)) for kv, q, kind in rows
    ]
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=2, menu=MENU)
    assert plan.table.q_len == tuple(q_lens)
    for r, (ql, kl) in enumerate(zip(q_lens, plan.table.kv_len, strict=True)):
        want = visible(ql, kl, causal, window)
        covered = torch.zeros(ql, kl, dtype=torch.int64)
        for i in (plan.row == r).nonzero().flatten().tolist():
            q0, t, k0, k1 = (int(x[i]) for x in (plan.q0, plan.q_tile, plan.k0, plan.k1))
            block = want[q0 : q0 + t, k0:k1]
            assert block.any(), f"row {r}: tile q{q0}+{t} k[{k0},{k1}) is fully hidden"
            covered[q0 : q0 + t, k0:k1] += 1
        assert (covered[want] == 1).all()  # each visible pair exactly once
    # The task table holds every tile once per KV head, heaviest first.
    assert plan.task_tile.numel() == 2 * plan.tiles
    assert sorted(zip(plan.task_tile.tolist(), plan.task_head.tolist(), strict=True)) == [
        (i, h) for i in range(plan.tiles) for h in range(2)
    ]


def test_causal_prefill_skips_the_upper_triangle_and_balances_workers():
    plan = plan_attention(
        [2048], [2048], causal=True, kv_heads=8, menu=AttentionMenu((128,), 128, 4)
    )
    assert plan.tiles == 16 * 17 // 2 and plan.skipped == 16 * 15 // 2
    assert max(plan.worker_load) <= 1.05 * min(plan.worker_load)


def test_decode_steps_share_a_plan_until_a_chunk_boundary():
    a = plan_attention([1, 1], [100, 200], causal=True, menu=MENU)
    b = plan_attention([1, 1], [101, 201], causal=True, menu=MENU)
    c = plan_attention([1, 1], [129, 201], causal=True, menu=MENU)  # 129 needs a 5th chunk
    assert a is b and a is not c
    a.check([1, 1], [101, 201])
    with pytest.raises(ValueError, match="another shape class"):
        a.check([1, 1], [129, 201])
    with pytest.raises(ValueError, match="q_lens"):
        a.check([2, 1], [100, 200])


def test_tiles_from_mask_keeps_blocks_with_any_allowed_pair():
    mask = torch.zeros(2, 1, 40, 70, dtype=torch.bool)
    mask[0, 0, 5, 69] = True
    mask[1, 0, 33:, :10] = True
    blocks = tiles_from_mask(mask, 16, 32)
    assert blocks.shape == (2, 3, 3)
    assert blocks[0].nonzero().tolist() == [[0, 2]]
    assert blocks[1].nonzero().tolist() == [[2, 0]]
    additive = torch.where(mask, 0.0, float("-inf"))
    assert torch.equal(tiles_from_mask(additive, 16, 32), blocks)


# -- the CPU executor against float64 ---------------------------------------------------------


def reference(q, ks, vs, q_lens, kv_lens, causal, window, scale, masks=None):
    """Plain float64 attention row by row: q packed [Tq, Hq, D], ks[r] [kv_len, Hkv, D]."""
    outs, start = [], 0
    for r, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qr = q[start : start + ql].double().transpose(0, 1)
        g = q.shape[1] // ks[r].shape[1]
        kr = ks[r].double().transpose(0, 1).repeat_interleave(g, 0)
        vr = vs[r].double().transpose(0, 1).repeat_interleave(g, 0)
        s = (qr @ kr.transpose(-1, -2) * scale).masked_fill(
            ~visible(ql, kl, causal, window), float("-inf")
        )
        if masks is not None:
            s = s.masked_fill(~masks[r], float("-inf"))
        m = s.amax(-1, keepdim=True)
        p = torch.exp(s - torch.where(torch.isinf(m), 0, m))
        denom = p.sum(-1, keepdim=True)
        outs.append(((p @ vr) / torch.where(denom > 0, denom, 1)).transpose(0, 1))
        start += ql
    return torch.cat(outs)


def _layouts(ks, vs, kv_lens, block_size, hkv, d, gen):
    """The same keys as a dense [B, Hkv, L, D] cache and as a shuffled paged cache."""
    rows, longest = len(kv_lens), max(kv_lens)
    dense_k = torch.randn(rows, hkv, longest, d, generator=gen)  # garbage past each length
    dense_v = torch.randn(rows, hkv, longest, d, generator=gen)
    blocks = sum(math.ceil(kv / block_size) for kv in kv_lens) + 2
    paged_k = torch.randn(blocks, block_size, hkv, d, generator=gen)
    paged_v = torch.randn(blocks, block_size, hkv, d, generator=gen)
    order = torch.randperm(blocks, generator=gen).tolist()
    table = torch.zeros(rows, math.ceil(longest / block_size), dtype=torch.int64)
    for r, kv in enumerate(kv_lens):
        dense_k[r, :, :kv] = ks[r].transpose(0, 1)
        dense_v[r, :, :kv] = vs[r].transpose(0, 1)
        for j in range(math.ceil(kv / block_size)):
            b = table[r, j] = order.pop()
            n = min(block_size, kv - j * block_size)
            paged_k[b, :n] = ks[r][j * block_size : j * block_size + n]
            paged_v[b, :n] = vs[r][j * block_size : j * block_size + n]
    return (dense_k, dense_v), (paged_k, paged_v, table)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    head_dim=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 64)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_executor_matches_float64_for_random_token_tables(
    data, rows, group, head_dim, block_size, causal, window, dtype, seed
):
    kv_lens = data.draw(st.lists(st.integers(1, 300), min_size=rows, max_size=rows))
    q_lens = [
        data.draw(st.sampled_from([1, kv, max(1, kv // 3), min(kv, 5)])) for kv in kv_lens
    ]  # decode, prefill, chunked/prefix-cached prefill, verify rows
    hkv = 2 if group <= 2 else 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hkv * group, head_dim, generator=gen).to(dtype)
    ks = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    vs = [torch.randn(kv, hkv, head_dim, generator=gen).to(dtype) for kv in kv_lens]
    dense, paged = _layouts(ks, vs, kv_lens, block_size, hkv, head_dim, gen)
    menu = AttentionMenu(
        q_tiles=(1, 16, 64), kv_chunk=data.draw(st.sampled_from([32, 64])), workers=3
    )
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=menu)
    scale = head_dim**-0.5
    want = reference(q, ks, vs, q_lens, kv_lens, causal, window, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for layout in ("dense", "paged"):
        out = torch.full((sum(q_lens), hkv * group, head_dim), float("nan")).to(dtype)  # poison
        if layout == "dense":
            got = run_plan(
                plan, q, dense[0].to(dtype), dense[1].to(dtype), kv_lens, scale=scale, out=out
            )
        else:
            k, v, table = paged
            got = run_plan(
                plan,
                q,
                k.to(dtype),
                v.to(dtype),
                kv_lens,
                scale=scale,
                block_table=table,
                block_size=block_size,
                out=out,
            )
        assert not got.isnan().any(), f"{layout}: an output element was not written"
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < tolerance, f"{layout}: relative error {err:.2e}"


def test_rows_with_every_key_masked_are_zero_like_sdpa():
    gen = torch.Generator().manual_seed(0)
    b, h, lq, lk, d = 2, 2, 20, 50, 64
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, h, lk, d, generator=gen)
    v = torch.randn(b, h, lk, d, generator=gen)
    mask = torch.rand(b, 1, lq, lk, generator=gen) > 0.5
    mask[0, :, 3] = False  # a query that sees nothing
    mask[1, :, 10:] = False  # padded query rows
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    plan = plan_attention([lq] * b, [lk] * b, causal=False, kv_heads=h, menu=MENU)
    packed = q.transpose(1, 2).reshape(b * lq, h, d)
    out = torch.full((b * lq, h, d), float("nan"))
    got = run_plan(plan, packed, k, v, [lk] * b, scale=d**-0.5, mask=mask, out=out)
    got = got.view(b, lq, h, d).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[0, :, 3] == 0).all() and (got[1, :, 10:] == 0).all()


def test_additive_mask_matches_sdpa():
    gen = torch.Generator().manual_seed(1)
    b, h, lq, lk, d = 2, 4, 33, 70, 64
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, 2, lk, d, generator=gen)
    v = torch.randn(b, 2, lk, d, generator=gen)
    bias = torch.randn(b, h, lq, lk, generator=gen)  # ALiBi-like, per head
    bias[:, :, :, 60:] = float("-inf")
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    plan = plan_attention([lq] * b, [lk] * b, causal=False, kv_heads=2, menu=MENU)
    packed = q.transpose(1, 2).reshape(b * lq, h, d)
    got = run_plan(plan, packed, k, v, [lk] * b, scale=d**-0.5, mask=bias)
    torch.testing.assert_close(got.view(b, lq, h, d).transpose(1, 2), want, rtol=1e-5, atol=1e-5)


# -- dense cache, rows known by their lengths (the fast CPU paths) ------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 64)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_dense_rows_match_float64_with_left_or_right_padding(
    data, rows, group, causal, window, dtype, seed
):
    from xy_inductor.kernels.cpu_attention import run_dense

    length = data.draw(st.integers(1, 300))
    lq = data.draw(st.integers(1, length))
    kv_lens = data.draw(st.lists(st.integers(1, length), min_size=rows, max_size=rows))
    q_lens = [
        data.draw(st.sampled_from([1, min(kv, lq), max(1, min(kv, lq) // 2), min(kv, lq, 5)]))
        for kv in kv_lens
    ]
    kv_start = [
        data.draw(st.sampled_from([0, length - kv])) for kv in kv_lens
    ]  # right / left padding
    q_end = [data.draw(st.sampled_from([ql, lq])) for ql in q_lens]
    hkv, d = (2 if group <= 2 else 1), 64
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, hkv * group, lq, d, generator=gen).to(dtype)
    k = torch.randn(rows, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(rows, hkv, length, d, generator=gen).to(dtype)
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=MENU)
    out = torch.full(q.shape, float("nan")).to(dtype)  # poison
    got = run_dense(
        plan, q, k, v, q_end=q_end, kv_start=kv_start, kv_lens=kv_lens, scale=d**-0.5, out=out
    )
    assert not got.isnan().any()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for r in range(rows):
        lo, hi = q_end[r] - q_lens[r], q_end[r]
        keys = slice(kv_start[r], kv_start[r] + kv_lens[r])
        want = reference(
            q[r, :, lo:hi].transpose(0, 1), [k[r, :, keys].transpose(0, 1)],
            [v[r, :, keys].transpose(0, 1)], [q_lens[r]], [kv_lens[r]], causal, window, d**-0.5,
        )  # fmt: skip
        mine = got[r, :, lo:hi].transpose(0, 1)
        err = ((mine.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < tolerance, f"row {r}: relative error {err:.2e}"
        assert (got[r, :, :lo] == 0).all() and (got[r, :, hi:] == 0).all()  # padding slots


def test_long_row_by_diagonals_computes_exactly_the_planned_tiles():
    from xy_inductor.kernels.cpu_attention import attend_long_row

    gen = torch.Generator().manual_seed(3)
    for ql, kl, window in ((256, 256, None), (200, 330, None), (256, 256, 40)):
        q = torch.randn(ql, 4, 64, generator=gen)
        k = torch.randn(2, kl, 64, generator=gen)
        v = torch.randn(2, kl, 64, generator=gen)
        got, blocks = attend_long_row(q, k, v, causal=True, window=window, tile=32, scale=0.125)
        want = reference(
            q, [k.transpose(0, 1)], [v.transpose(0, 1)], [ql], [kl], True, window, 0.125
        )
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
        plan = plan_attention(
            [ql], [kl], causal=True, window=window, menu=AttentionMenu((32,), 32, 1)
        )
        assert blocks == plan.tiles


@pytest.mark.parametrize(("lq", "lk"), [(40, 40), (24, 70)])
def test_plans_from_a_dense_mask_skip_hidden_tiles_and_stay_exact(lq, lk):
    gen = torch.Generator().manual_seed(4)
    b, h, d = 2, 2, 64
    # A sliding window of 9 plus one far-away key: most tiles hidden, some partly visible.
    i, j = torch.arange(lq)[:, None] + (lk - lq), torch.arange(lk)[None, :]
    mask = ((j <= i) & (j > i - 9)) | (j == 3)
    mask = mask[None, None].expand(b, 1, lq, lk).clone()
    mask[1, 0, 5] = False  # a query that sees nothing
    menu = AttentionMenu(q_tiles=(1, 8), kv_chunk=8, workers=4)
    plan = plan_attention([lq] * b, [lk] * b, causal=False, kv_heads=h, menu=menu, mask=mask)
    assert plan.skipped > plan.tiles  # the window hides most of the grid
    for r in range(b):  # every allowed pair is in exactly one scheduled tile
        covered = torch.zeros(lq, lk, dtype=torch.int64)
        for t in (plan.row == r).nonzero().flatten().tolist():
            q0, size, k0, k1 = (int(x[t]) for x in (plan.q0, plan.q_tile, plan.k0, plan.k1))
            covered[q0 : q0 + size, k0:k1] += 1
        assert (covered[mask[r, 0]] == 1).all()
    q = torch.randn(b, h, lq, d, generator=gen)
    k = torch.randn(b, h, lk, d, generator=gen)
    v = torch.randn(b, h, lk, d, generator=gen)
    packed = q.transpose(1, 2).reshape(b * lq, h, d)
    got = run_plan(plan, packed, k, v, [lk] * b, scale=d**-0.5, mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got.view(b, lq, h, d).transpose(1, 2), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plans rows of"):
        plan_attention([lq, 3], [lk, lk], causal=False, mask=mask)
