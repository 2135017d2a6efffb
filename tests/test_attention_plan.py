"""Meta-attention: the planner's tables, and the CPU executor against a float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import kv_layouts, packed_reference, visible
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xy_inductor.kernels.aten.attention import run_dense
from xy_inductor.kernels.aten.plan_executor import run_plan
from xy_inductor.kernels.attention_plan import (
    AttentionMenu,
    TokenTable,
    choose_q_tile,
    plan_attention,
    symmetric_round_robin,
)

MENU = AttentionMenu(q_tiles=(1, 16, 64), kv_chunk=32, workers=4)


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
        plan_attention([1, 9], [4, 4], causal=True, menu=MENU)
    with pytest.raises(ValueError, match="q_lens has 2 rows but kv_lens has 1"):
        TokenTable.build([1, 2], [3], (16,))
    with pytest.raises(ValueError, match="window must be a positive int"):
        plan_attention([1], [4], causal=True, window=0, menu=MENU)


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


# -- the CPU executor against float64 ---------------------------------------------------------


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
    dense, paged = kv_layouts(ks, vs, kv_lens, block_size, hkv, head_dim, gen)
    menu = AttentionMenu(
        q_tiles=(1, 16, 64), kv_chunk=data.draw(st.sampled_from([32, 64])), workers=3
    )
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=menu)
    scale = head_dim**-0.5
    want = packed_reference(q, ks, vs, q_lens, kv_lens, causal, window, scale)
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


# -- dense cache, rows known by their lengths (the fast CPU paths) ------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rows=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_dense_rows_match_float64_with_left_or_right_padding(
    data, rows, group, causal, dtype, seed
):
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
    plan = plan_attention(q_lens, kv_lens, causal=causal, kv_heads=hkv, menu=MENU)
    out = torch.full(q.shape, float("nan")).to(dtype)  # poison
    got = run_dense(
        plan, q, k, v, q_end=q_end, kv_start=kv_start, kv_lens=kv_lens, scale=d**-0.5, out=out
    )
    assert not got.isnan().any()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for r in range(rows):
        lo, hi = q_end[r] - q_lens[r], q_end[r]
        keys = slice(kv_start[r], kv_start[r] + kv_lens[r])
        want = packed_reference(
            q[r, :, lo:hi].transpose(0, 1), [k[r, :, keys].transpose(0, 1)],
            [v[r, :, keys].transpose(0, 1)], [q_lens[r]], [kv_lens[r]], causal, None, d**-0.5,
        )  # fmt: skip
        mine = got[r, :, lo:hi].transpose(0, 1)
        err = ((mine.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err < tolerance, f"row {r}: relative error {err:.2e}"
        assert (got[r, :, :lo] == 0).all() and (got[r, :, hi:] == 0).all()  # padding slots


def test_dense_rows_are_refused_a_window():
    plan = plan_attention([4], [4], causal=True, window=2, menu=MENU)
    q = k = v = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="without a window"):
        run_dense(plan, q, k, v, q_end=[4], kv_start=[0], kv_lens=[4], scale=0.25)


def test_a_plan_keeps_what_providers_derive_from_it():
    plan = plan_attention([1, 1], [100, 200], causal=True, menu=MENU)
    plan.cache["x"] = 1
    same = plan_attention([1, 1], [101, 201], causal=True, menu=MENU)  # next decode step
    assert same is plan and same.cache["x"] == 1


def test_plans_built_are_counted_once_per_shape_class():
    import xy_inductor
    from xy_inductor.kernels.attention_plan import _plan

    _plan.cache_clear()  # plans are process-wide; start from none
    xy_inductor.reset_stats()
    plan_attention([1, 1], [1000, 2000], causal=True, menu=MENU)
    for step in range(5):  # later decode steps of the same class: no new plan
        plan_attention([1, 1], [1001 + step, 2001 + step], causal=True, menu=MENU)
    assert xy_inductor.stats().attention_plans == 1
