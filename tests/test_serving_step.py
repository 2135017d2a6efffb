"""The serving path of attention_varlen: the CPU's paged rows executor and ``VarlenStep``.

``run_paged`` (the ATen provider's CPU path) against float64 on random token tables over
caches laid out as vLLM lays them (K and V halves of one ``[blocks, block_size, Hkv, 2D]``
tensor, head-major blocks, layers interleaved); it reads only the blocks of the step's rows.
``VarlenStep`` (one per serving step, run by every layer) chooses the provider once per layer
signature and refuses runs that do not match it.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import kv_layouts, packed_reference, varlen_cpu_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xy_inductor
from xy_inductor.kernels import aten
from xy_inductor.kernels.aten.menus import ATTENTION_MENU
from xy_inductor.kernels.aten.paged import group_dtype, run_paged
from xy_inductor.kernels.aten.plan_executor import run_plan
from xy_inductor.kernels.attention_plan import plan_attention
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.runtime import providers
from xy_inductor.runtime.serving import SlotWrites, VarlenStep, row_kinds

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relayout(k: torch.Tensor, v: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same paged ``[blocks, block_size, Hkv, D]`` caches, stored another way."""
    if layout == "separate":
        return k, v
    if layout == "halves":  # vLLM's per-layer view: one tensor, K then V in each slot
        both = torch.cat([k, v], dim=-1)
        return both[..., : k.shape[-1]], both[..., k.shape[-1] :]
    if layout == "head-major":  # blocks stored [Hkv, block_size, D]
        return (
            k.transpose(1, 2).contiguous().transpose(1, 2),
            v.transpose(1, 2).contiguous().transpose(1, 2),
        )
    if layout == "layers":  # blocks of three layers interleaved block by block: [B, L, ...]
        stack = torch.stack([torch.randn_like(k), k, torch.randn_like(k)], dim=1)
        vstack = torch.stack([torch.randn_like(v), v, torch.randn_like(v)], dim=1)
        return stack[:, 1], vstack[:, 1]
    raise ValueError(layout)


def _case(data, rows, group, dtype, seed, block_size):
    kv_lens = data.draw(st.lists(st.integers(1, 300), min_size=rows, max_size=rows))
    q_lens = [
        data.draw(st.sampled_from([1, kv, max(1, kv // 3), min(kv, 5), min(kv, 40)]))
        for kv in kv_lens
    ]  # decode, prefill, chunked/prefix-cached prefill, verify, a middle-sized chunk
    hkv = 2 if group <= 2 else 1
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hkv * group, 64, generator=gen).to(dtype)
    ks = [torch.randn(kv, hkv, 64, generator=gen).to(dtype) for kv in kv_lens]
    vs = [torch.randn(kv, hkv, 64, generator=gen).to(dtype) for kv in kv_lens]
    _, (k, v, table) = kv_layouts(ks, vs, kv_lens, block_size, hkv, 64, gen)
    return q_lens, kv_lens, q, ks, vs, k.to(dtype), v.to(dtype), table.to(torch.int32)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    rows=st.integers(1, 5),
    group=st.sampled_from([1, 2, 4]),
    block_size=st.sampled_from([16, 32, 128]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 64)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    layout=st.sampled_from(["separate", "halves", "head-major", "layers"]),
    seed=st.integers(0, 2**16),
)
def test_paged_rows_match_float64(
    data, rows, group, block_size, causal, window, dtype, layout, seed
):
    q_lens, kv_lens, q, ks, vs, k, v, table = _case(data, rows, group, dtype, seed, block_size)
    k, v = relayout(k, v, layout)
    plan = plan_attention(
        q_lens, kv_lens, causal=causal, window=window, kv_heads=k.shape[2], menu=_menu()
    )
    out = torch.full((sum(q_lens), q.shape[1], 64), float("nan")).to(dtype)  # poison
    got = run_paged(
        plan, q, k, v, kv_lens, block_table=table, block_size=block_size, scale=0.125, out=out
    )
    assert not got.isnan().any(), "an output element was not written"
    want = packed_reference(q, ks, vs, q_lens, kv_lens, causal, window, 0.125)
    err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def _menu():
    return ATTENTION_MENU


def _huge_cache(blocks: torch.Tensor, copies: int) -> torch.Tensor:
    """``copies`` logical repetitions of ``blocks`` without memory: a view whose block stride is
    0. Copying it whole would need ``copies`` times the memory and fail at once."""
    one = blocks[:1]
    return one.expand(copies, *one.shape[1:])


@pytest.mark.parametrize("executor", ["rows", "plan"])
def test_executors_read_only_the_blocks_of_the_step(executor):
    # 2**32 blocks of 16 slots × 2 heads × 64 floats: 32 TiB if anything copied the cache.
    gen = torch.Generator().manual_seed(3)
    block = torch.randn(1, 16, 2, 64, generator=gen)
    k, v = _huge_cache(block, 2**32), _huge_cache(-block, 2**32)
    q_lens, kv_lens = [1, 20, 7], [40, 20, 30]
    table = torch.randint(0, 2**32, (3, 3), generator=gen)
    q = torch.randn(sum(q_lens), 4, 64, generator=gen)
    ks = [block[0].repeat(3, 1, 1)[:kv] for kv in kv_lens]
    vs = [-block[0].repeat(3, 1, 1)[:kv] for kv in kv_lens]
    plan = plan_attention(q_lens, kv_lens, causal=True, kv_heads=2, menu=_menu())
    run = run_paged if executor == "rows" else run_plan
    got = run(plan, q, k, v, kv_lens, block_table=table, block_size=16, scale=0.125)
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


# -- VarlenStep ----------------------------------------------------------------------------------


def _step_inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_lens, kv_lens = [37, 1, 20, 5, 0], [37, 90, 75, 61, 12]
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).to(dtype)
    ks = [torch.randn(kv, 2, 64, generator=gen).to(dtype) for kv in kv_lens]
    vs = [torch.randn(kv, 2, 64, generator=gen).to(dtype) for kv in kv_lens]
    _, (k, v, table) = kv_layouts(ks, vs, kv_lens, 16, 2, 64, gen)
    k, v = relayout(k.to(dtype), v.to(dtype), "halves")
    return q_lens, kv_lens, q, ks, vs, k, v, table.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 16])
def test_a_step_runs_every_layer_with_one_provider_choice(dtype, window):
    q_lens, kv_lens, q, ks, vs, k, v, table = _step_inputs(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    step = VarlenStep.from_cu_seqlens(cu, torch.tensor(kv_lens, dtype=torch.int32), table)
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, window, 0.125)
    layers = 3
    for _ in range(layers):  # each layer its own cache tensors, same signature
        got = step.run(q, k.clone(), v.clone(), window=window, scale=0.125)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOLERANCE[dtype]
    stats = xy_inductor.stats()
    assert stats.varlen_steps == 1
    assert stats.varlen_step_checks == 1  # the first layer chose; the others reused it
    assert stats.paths == {"attention_varlen": {varlen_cpu_path(): layers}}
    # The same as the op, which reads the lengths from its tensors on every call.
    op = torch.ops.xyserve.attention_varlen(q, k, v, cu, torch.tensor(kv_lens), table, True, window)
    torch.testing.assert_close(got, op, rtol=0, atol=0)


def test_layers_with_another_signature_get_their_own_choice():
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    step = VarlenStep(q_lens, kv_lens, table)
    step.run(q, k, v)
    step.run(q, k, v, window=8)  # a sliding-window layer of the same step
    step.run(q[:, :4], k, v)  # fewer query heads
    step.run(q, k, v)
    assert xy_inductor.stats().varlen_step_checks == 3
    assert xy_inductor.stats().paths["attention_varlen"] == {varlen_cpu_path(): 4}


def test_a_step_keeps_the_lengths_it_was_built_with():
    # The lengths are read once, when the step is built: what happens to the tensors after
    # (vLLM reuses its buffers for the next step) does not change the step.
    q_lens, kv_lens, q, ks, vs, k, v, table = _step_inputs()
    seq_lens = torch.tensor(kv_lens)
    step = VarlenStep([*q_lens], seq_lens, table)
    seq_lens.fill_(1)
    got = step.run(q, k, v, scale=0.125)
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda t: VarlenStep([1, 2], [3], t), "q_lens has 2 rows but kv_lens has 1"),
        (lambda t: VarlenStep([1, 9], [4, 4], t[:2]), "row 1 has 9 queries and kv_len 4"),
        (lambda t: VarlenStep([1], [4], t), "block_table has 5 rows for 1 sequences"),
        (lambda t: VarlenStep([1], [4], t[0]), "block_table must be a 2-D integer tensor"),
        (lambda t: VarlenStep.from_cu_seqlens([0, 3, 2], [3, 3], t[:2]), "must rise from 0"),
    ],
)
def test_bad_steps_are_clear_errors(build, message):
    table = _step_inputs()[-1]
    with pytest.raises(ValueError, match=message):
        build(table)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q[1:], k, v), "q has 62 tokens but the step's rows hold 63"),
        (lambda q, k, v: (q[:, :3], k, v), "q heads \\(3\\) must be a multiple of kv heads"),
        (lambda q, k, v: (q, k[..., :32], v), "q head dim 64 differs from k_cache head dim 32"),
        (lambda q, k, v: (q.double(), k, v), "q and k_cache differ"),
        (lambda q, k, v: (q, k[:, :8], v[:, :8]), "the block table holds 48 keys per row"),
    ],
)
def test_runs_that_do_not_match_the_step_are_clear_errors(change, message):
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    step = VarlenStep(q_lens, kv_lens, table)
    with pytest.raises(ValueError, match=message):
        step.run(*change(q, k, v))


def test_block_table_width_is_checked_against_the_longest_row():
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    assert table.shape[1] == math.ceil(max(kv_lens) / 16)
    step = VarlenStep(q_lens, kv_lens, table[:, :-1])
    with pytest.raises(ValueError, match="kv_len 90 but the block table holds 80 keys"):
        step.run(q, k, v)


def test_a_step_range_checks_the_block_ids_its_rows_read():
    # vLLM's cache layout (K and V halves of one tensor) is indexed block by block: a negative
    # id wrapped around to the last block and gave another sequence's keys, silently.
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    table = table.clone()
    table[2, 4] = -1  # row 2: 75 keys in blocks 0 … 4
    step = VarlenStep(q_lens, kv_lens, table)
    with pytest.raises(
        ValueError,
        match=(
            "VarlenStep.run: block_table\\[2, 4\\] = -1 is not a block of the cache; expected "
            f"ids in \\[0, {k.shape[0]}\\) for the 5 blocks holding row 2's 75 keys"
        ),
    ):
        step.run(q, k, v)


def _probe(out: torch.Tensor) -> Provider:
    """A provider whose attention_varlen accepts every call and returns ``out``."""
    kernel = OpKernel(lambda call: Accept("probe"), lambda call, accept: out)
    return Provider("probe", lambda: None, {"attention_varlen": kernel})


def test_a_decision_is_not_reused_under_another_provider_list_at_a_recycled_address():
    # The step's decisions were keyed on id() of the provider list: a list freed after a layer
    # ran, and a new one allocated at its address, got the first list's provider.
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    step = VarlenStep(q_lens, kv_lens, table)
    marker = torch.full((q.shape[0], 8, 64), 7.0)
    probe = _probe(marker)
    first = (aten.PROVIDER,)  # use_providers keeps a tuple as it is
    with providers.use_providers(first):
        step.run(q, k, v)
    address = id(first)
    del first
    lists = []  # new lists until one lands at the freed list's address (if one can)
    for _ in range(200):
        lists.append((probe,))
        if id(lists[-1]) == address:
            break
    with providers.use_providers(lists[-1]):
        assert step.run(q, k, v) is marker


def test_paged_rows_are_not_reused_for_another_block_table_at_a_recycled_address():
    # run_paged kept the rows it derived from a block table under id(table): a table freed
    # after a layer, and another allocated at its address, got the first table's blocks.
    q_lens, kv_lens, q, ks, vs, k, v, table = _step_inputs()
    plan = plan_attention(q_lens, kv_lens, causal=True, kv_heads=2, menu=_menu())
    perm = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(1))
    k2, v2 = k[perm.argsort()], v[perm.argsort()]  # block b of k is block perm[b] of k2
    moved_table = perm[table.long()].to(table.dtype)
    cache: dict = {}
    first = table.clone()
    run_paged(plan, q, k, v, kv_lens, block_table=first, block_size=16, scale=0.125, cache=cache)
    address = id(first)
    del first
    moved = []  # new tables until one lands at the freed table's address (if one can)
    for _ in range(200):
        moved.append(moved_table.clone())
        if id(moved[-1]) == address:
            break
    got = run_paged(
        plan, q, k2, v2, kv_lens, block_table=moved[-1], block_size=16, scale=0.125, cache=cache
    )
    want = packed_reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


# -- SlotWrites: a step's new K/V into the paged cache -------------------------------------------


@pytest.mark.parametrize(
    "slots",
    [[5, -1, 17, 63, -1], [-1, -1], [3, 4, 0], []],
    ids=["some padding", "all padding", "no padding", "no tokens"],
)
def test_slot_writes_skip_padding_slots(slots):
    # Slot -1 is padding (vLLM's reshape_and_cache skips it). As an index it wrote the token
    # into the last slot of the last block: another sequence's keys, on every device but the
    # CPU, where the backend raised instead.
    gen = torch.Generator().manual_seed(0)
    both = torch.randn(4, 16, 2, 16, generator=gen)  # vLLM's per-layer view: K then V
    k, v = both[..., :8], both[..., 8:]
    before = both.clone()
    key = torch.randn(len(slots), 2, 8, generator=gen)
    value = torch.randn(len(slots), 2, 8, generator=gen)
    SlotWrites(torch.tensor(slots, dtype=torch.int32), 16).write(k, v, key, value)
    want = before.clone()
    for i, s in enumerate(slots):
        if s >= 0:
            want[s // 16, s % 16] = torch.cat([key[i], value[i]], dim=-1)
    assert torch.equal(both, want)


def test_slot_writes_refuse_a_slot_mapping_that_is_not_integer_slots():
    with pytest.raises(ValueError, match="slot_mapping must be a 1-D integer tensor"):
        SlotWrites(torch.zeros(3), 16)


@pytest.mark.parametrize("amx", [False, True])
def test_short_rows_in_half_precision_attend_in_float32_without_amx(monkeypatch, amx):
    # ATen's CPU flash kernel is slow for a few queries in bfloat16 where the CPU has no AMX
    # tiles: there decode groups go up to float32 (and round once); with AMX they stay.
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    group_dtype.cache_clear()
    try:
        assert group_dtype(torch.float32) is torch.float32
        for half in (torch.bfloat16, torch.float16):
            assert group_dtype(half) is (half if amx else torch.float32)
        q_lens, kv_lens, q, ks, vs, k, v, table = _step_inputs(torch.bfloat16)
        cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
        got = torch.ops.xyserve.attention_varlen(q, k, v, cu, torch.tensor(kv_lens), table)
        want = packed_reference(q, ks, vs, q_lens, kv_lens, True, None, 0.125)
        assert got.dtype is torch.bfloat16
        assert ((got.double() - want).norm() / want.norm()).item() < TOLERANCE[torch.bfloat16]
    finally:
        group_dtype.cache_clear()


@pytest.mark.parametrize("only_aten", [False, True])
def test_a_step_writes_into_the_callers_output(only_aten):
    q_lens, kv_lens, q, _, _, k, v, table = _step_inputs()
    step = VarlenStep(q_lens, kv_lens, table)
    listed = [aten.PROVIDER] if only_aten else list(providers.default())
    with providers.use_providers(listed):
        want = step.run(q, k, v, scale=0.125)
        buf = torch.full((q.shape[0] + 3, q.shape[1], v.shape[3]), float("nan"))
        got = step.run(q, k, v, scale=0.125, out=buf[: q.shape[0]])
    assert got.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf[: q.shape[0]], want, rtol=0, atol=0)
    assert torch.isnan(buf[q.shape[0] :]).all()  # nothing written past it
    with pytest.raises(ValueError, match=r"out must be \[63, 8, 64\] torch.float32"):
        step.run(q, k, v, out=buf[:5])


def test_a_step_counts_its_rows_per_kind():
    q_lens, kv_lens, _, _, _, _, _, table = (
        _step_inputs()
    )  # [37, 1, 20, 5, 0] / [37, 90, 75, 61, 12]
    VarlenStep(q_lens, kv_lens, table)
    VarlenStep(q_lens, kv_lens, table, verify_max_q=5)  # an engine drafting 4 tokens
    stats = xy_inductor.stats()
    assert stats.varlen_rows == {"prefill": 2, "decode": 2, "chunk": 3, "verify": 1}
    assert stats.varlen_step_kinds == {"prefill": 2, "decode": 2, "chunk": 2, "verify": 1}
    assert "serving rows      chunk 3 (in 2 steps), decode 2 (in 2 steps)" in str(stats)
    assert row_kinds([1, 1, 3], [1, 9, 9], verify_max_q=2) == {
        "prefill": 1,
        "decode": 1,
        "chunk": 1,
    }
