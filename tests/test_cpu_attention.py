"""The CPU provider's native meta-attention kernel (``kernels/cpu``) against float64.

Every case runs ``xyserve.attention_varlen`` through the provider registry and asserts which
provider and path ran. Skipped as a whole where the library cannot be built here (the reason is
shown): the ATen tests cover those machines.
"""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_reference

import xy_inductor
from xy_inductor.kernels import aten
from xy_inductor.kernels import cpu as cpu_provider
from xy_inductor.kernels.aten import native
from xy_inductor.kernels.aten.menus import PLANNED_MIN_SCORES
from xy_inductor.kernels.attention_plan import rows_from_mask
from xy_inductor.kernels.calls import VarlenAttention
from xy_inductor.kernels.cpu import build
from xy_inductor.runtime import providers

varlen = torch.ops.xyserve.attention_varlen.default

_REASON = build.why_not_loaded()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"CPU kernels: {_REASON}")

# Relative error (norm) against float64 per dtype: fp32 accumulates in fp32; half precision
# rounds its inputs (already rounded here) and the output once.
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# The many-row kernels take over above this many rows per task; cases cross it both ways.
FEW_ROWS = 8


def _case(rng: random.Random, dtype: torch.dtype):
    """A random step: mixed rows (decode, prefill, chunked/prefix-cached, verify, no queries),
    GQA group, head sizes, block size, window, causality, a shuffled block table, and a cache
    whose unused blocks and slots past every row's length are NaN."""
    hkv = rng.choice([1, 2, 3])
    group = rng.choice([1, 2, 4, 5, 8])
    d = rng.choice([64, 80, 96, 128, 256])
    dv = d if rng.random() < 0.8 else rng.choice([64, 128])
    bs = rng.choice([16, 32, 64, 128])
    causal = rng.random() < 0.85
    window = rng.choice([None, None, 1, 7, 100])
    rows = rng.randint(1, 6)
    q_lens, kv_lens = [], []
    for _ in range(rows):
        kind = rng.choice(["decode", "prefill", "chunk", "verify", "empty"])
        if kind == "decode":
            q, kv = 1, rng.randint(1, 1500)
        elif kind == "prefill":
            q = rng.randint(2, 90)
            kv = q
        elif kind == "chunk":
            q = rng.randint(2, 70)
            kv = q + rng.randint(1, 600)
        elif kind == "verify":
            q = rng.randint(2, 5)
            kv = q + rng.randint(0, 300)
        else:
            q, kv = 0, rng.randint(0, 50)
        q_lens.append(q)
        kv_lens.append(kv)
    if sum(q_lens) == 0:
        q_lens[0], kv_lens[0] = 1, max(kv_lens[0], 1)
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    hq = hkv * group
    blocks_of = [math.ceil(kv / bs) for kv in kv_lens]
    n_blocks = sum(blocks_of) + 3
    order = torch.randperm(n_blocks, generator=gen).tolist()
    width = max(max(blocks_of), 1) + rng.randint(0, 2)
    table = torch.full((rows, width), -1, dtype=rng.choice([torch.int32, torch.int64]))
    # One tensor, K then V in each slot (vLLM's layout), poisoned everywhere first.
    cache = torch.full((n_blocks, bs, hkv, d + dv), float("nan"), dtype=dtype)
    ks, vs = [], []
    for r, kv in enumerate(kv_lens):
        k = torch.randn(kv, hkv, d, generator=gen).to(dtype)
        v = torch.randn(kv, hkv, dv, generator=gen).to(dtype)
        ks.append(k)
        vs.append(v)
        for j in range(blocks_of[r]):
            b = table[r, j] = order.pop()
            n = min(bs, kv - j * bs)
            cache[b, :n, :, :d] = k[j * bs : j * bs + n]
            cache[b, :n, :, d:] = v[j * bs : j * bs + n]
    table[table < 0] = 0  # entries past a row's blocks are never read
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    return q, cache[..., :d], cache[..., d:], q_lens, kv_lens, table, causal, window, ks, vs


def _run(q, k, v, q_lens, kv_lens, table, causal, window):
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    kv = torch.tensor(kv_lens, dtype=torch.int32)
    return varlen(q, k, v, cu, kv, table, causal, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_mixed_steps_match_float64(dtype):
    rng = random.Random(f"cpu-attention-{dtype}")
    ran = 0
    for _ in range(40):
        q, k, v, q_lens, kv_lens, table, causal, window, ks, vs = _case(rng, dtype)
        if window is not None and any(n > m for n, m in zip(q_lens, kv_lens, strict=True)):
            continue  # a window needs queries to be the row's last tokens
        xy_inductor.reset_stats()
        got = _run(q, k, v, q_lens, kv_lens, table, causal, window)
        want = packed_reference(q, ks, vs, q_lens, kv_lens, causal, window, q.shape[2] ** -0.5)
        assert torch.isfinite(got).all()
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        case = (q_lens, kv_lens, q.shape[1], k.shape[2], q.shape[2], v.shape[3], k.shape[1])
        assert err < TOLERANCE[dtype], (case, causal, window, err)
        assert xy_inductor.stats().paths["attention_varlen"] == {"cpu/paged": 1}
        ran += 1
    assert ran >= 30


def _fixed(dtype=torch.float32, q_lens=(1, 40, 3, 1), kv_lens=(700, 40, 300, 1300), group=4):
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(1)
    hkv, d, bs = 2, 128, 32
    blocks_of = [math.ceil(kv / bs) for kv in kv_lens]
    cache = torch.randn(sum(blocks_of) + 1, bs, hkv, 2 * d, generator=gen).to(dtype)
    order = list(range(cache.shape[0]))
    rng.shuffle(order)
    table = torch.zeros(len(kv_lens), max(blocks_of), dtype=torch.int32)
    for r, n in enumerate(blocks_of):
        for j in range(n):
            table[r, j] = order.pop()
    q = torch.randn(sum(q_lens), hkv * group, d, generator=gen).to(dtype)
    return q, cache[..., :d], cache[..., d:], list(q_lens), list(kv_lens), table


def test_a_non_causal_row_over_an_empty_cache_gives_zeros():
    q, k, v, _, _, table = _fixed()
    got = _run(q[:5], k, v, [3, 2], [0, 5], table[:2], False, None)
    assert torch.equal(got[:3], torch.zeros_like(got[:3]))
    assert got[3:].abs().sum() > 0
    assert xy_inductor.stats().paths["attention_varlen"] == {"cpu/paged": 1}


def test_results_are_bitwise_identical_for_any_thread_count():
    q, k, v, q_lens, kv_lens, table = _fixed(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(q, k, v, q_lens, kv_lens, table, True, None)
        torch.set_num_threads(max(threads, 2))
        many = _run(q, k, v, q_lens, kv_lens, table, True, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_long_rows_are_split_and_merged():
    q, k, v, q_lens, kv_lens, table = _fixed()
    call = VarlenAttention(q, k, v, q_lens, kv_lens, table, True, None, None)
    accept = cpu_provider.check_attention_varlen(call)
    assert accept.path == "paged"
    assert accept.decision.tables.parts > 0 and accept.decision.tables.merges.shape[0] > 0
    got = cpu_provider.run_attention_varlen(call, accept)
    with providers.use_providers([aten.PROVIDER]):
        want = _run(q, k, v, q_lens, kv_lens, table, True, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_steps_of_one_class_share_a_plan_and_tables():
    q, k, v, _, _, table = _fixed(q_lens=(1, 1), kv_lens=(600, 900))
    first = VarlenAttention(q[:2], k, v, (1, 1), (600, 900), table, True, None, None)
    later = VarlenAttention(q[:2], k, v, (1, 1), (601, 901), table, True, None, None)
    a = cpu_provider.check_attention_varlen(first)
    b = cpu_provider.check_attention_varlen(later)
    assert a.decision.plan is b.decision.plan
    assert a.decision.tables is b.decision.tables
    assert b.decision.kv_len.tolist() == [601, 901]


def test_a_block_outside_the_cache_is_an_error_not_a_read():
    q, k, v, q_lens, kv_lens, table = _fixed()
    call = VarlenAttention(q, k, v, q_lens, kv_lens, table, True, None, None)
    accept = cpu_provider.check_attention_varlen(call)
    bad = table.clone()
    bad[1, 0] = k.shape[0]  # one past the last block
    call = VarlenAttention(q, k, v, q_lens, kv_lens, bad, True, None, None)
    with pytest.raises(RuntimeError, match="row 1 names a block outside the cache"):
        cpu_provider.run_attention_varlen(call, accept)
    bad[1, 0] = -1
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_provider.run_attention_varlen(call, accept)
    # Through the op the runtime's check names the entry first.
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] = -1"):
        _run(q, k, v, q_lens, kv_lens, bad, True, None)


def test_lengths_past_the_block_table_are_an_error():
    q, k, v, q_lens, kv_lens, table = _fixed()
    call = VarlenAttention(q, k, v, q_lens, kv_lens, table, True, None, None)
    accept = cpu_provider.check_attention_varlen(call)
    narrow = VarlenAttention(q, k, v, q_lens, kv_lens, table[:, :2], True, None, None)
    with pytest.raises(RuntimeError, match="keys from slot 0 but its block table holds"):
        cpu_provider.run_attention_varlen(narrow, accept)


def test_unservable_calls_are_declined_and_aten_serves_them():
    gen = torch.Generator().manual_seed(0)
    d = 40  # not a multiple of the vector width
    cache = torch.randn(4, 16, 2, 2 * d, generator=gen)
    q = torch.randn(3, 4, d, generator=gen)
    table = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    got = _run(q, cache[..., :d], cache[..., d:], [3], [40], table, True, None)
    keys = cache[:3].reshape(48, 2, 2 * d)[:40]
    want = packed_reference(q, [keys[..., :d]], [keys[..., d:]], [3], [40], True, None, d**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    stats = xy_inductor.stats()
    assert stats.paths["attention_varlen"] == {"aten/rows": 1}
    assert stats.declined["attention_varlen"] == {
        "cpu: head sizes 40/40 are not multiples of 16": 1
    }


def test_the_provider_is_listed_in_front_of_aten_and_the_cpp_path_still_loads():
    names = [p.name for p in providers.default()]
    assert names.index("cpu") < names.index("aten")
    # The CPU provider serves neither gemm nor dense attention: the C++ fast path's rules hold.
    assert native._why_not(providers.default()) in (None, "disabled by XYSERVE_NATIVE=0")


def _unavailable_in_child(env: dict[str, str]) -> str:
    code = "from xy_inductor.kernels.cpu import build; print(build.why_unavailable())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    return out.stdout.strip()


def test_unavailable_says_why():
    assert _unavailable_in_child({"XYSERVE_CPU_ATTN": "0"}) == "disabled by XYSERVE_CPU_ATTN=0"
    assert _unavailable_in_child({"CXX": "/nonexistent/c++"}).startswith("no C++ compiler")
    assert _unavailable_in_child({}) == "None"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_packed_sequences_match_float64(dtype):
    rng = random.Random(f"cpu-packed-{dtype}")
    for _ in range(12):
        hkv, group = rng.choice([1, 2]), rng.choice([1, 4, 6])
        d = rng.choice([64, 96, 128])
        causal = rng.random() < 0.8
        window = rng.choice([None, 5, 40]) if causal else None
        lens = [rng.randint(1, 300) for _ in range(rng.randint(1, 4))]
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        t = sum(lens)
        q = torch.randn(t, hkv * group, d, generator=gen).to(dtype)
        k = torch.randn(t, hkv, d, generator=gen).to(dtype)
        v = torch.randn(t, hkv, d, generator=gen).to(dtype)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        xy_inductor.reset_stats()
        got = torch.ops.xyserve.attention_packed(q, k, v, cu, causal, window, None)
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
        ks, vs = [k[a:b] for a, b in bounds], [v[a:b] for a, b in bounds]
        want = packed_reference(q, ks, vs, lens, lens, causal, window, d**-0.5)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOLERANCE[dtype], (lens, hkv, group, d, causal, window, err)
        assert xy_inductor.stats().paths["attention_packed"] == {"cpu/packed": 1}


def _padded(dtype, lens, hq=8, hkv=2, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, length = len(lens), max(lens)
    q = torch.randn(b, length, hq, d, generator=gen).to(dtype).transpose(1, 2)  # HF's layout
    k = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=gen).to(dtype)
    pos = torch.arange(length)
    keep = pos[None, :] >= torch.tensor([length - n for n in lens])[:, None]
    causal = pos[:, None] >= pos[None, :]
    mask = causal[None, None] & keep[:, None, None, :]
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_left_padded_batches_run_as_rows_and_match_aten(dtype):
    q, k, v, mask = _padded(dtype, [64, 300, 1, 517])
    got = torch.ops.xyserve.attention(q, k, v, mask)
    assert xy_inductor.stats().paths["attention"] == {"cpu/dense": 1}
    with providers.use_providers([aten.PROVIDER]):
        want = torch.ops.xyserve.attention(q, k, v, mask)
    assert xy_inductor.stats().paths["attention"] == {"cpu/dense": 1, "aten/rows": 1}
    torch.testing.assert_close(
        got, want, **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2})
    )
    # Against float64: the padding query slots are zeros, the rest SDPA on the real tokens.
    ref = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True
    ).nan_to_num(0)
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype]
    assert got.transpose(1, 2).is_contiguous()  # the op's promised [B, Lq, Hq, Dv] layout


def test_small_dense_calls_are_left_to_aten_and_its_cpp_path():
    q, k, v, mask = _padded(torch.float32, [30, 40])
    # Inside a use_providers block the C++ fast path asks the providers too, so the decline is
    # counted whether or not an earlier test loaded it.
    with providers.use_providers(providers.default()):
        torch.ops.xyserve.attention(q, k, v, mask)
    stats = xy_inductor.stats()
    assert stats.declined["attention"] == {
        f"cpu: fewer than {cpu_provider.DENSE_MIN_SCORES} scores (one SDPA call costs less)": 1
    }
    # The C++ fast path serves such calls without asking the providers: exact only while the
    # CPU provider declines at least what ATen would run as one SDPA call.
    assert cpu_provider.DENSE_MIN_SCORES >= PLANNED_MIN_SCORES
    assert native._why_not((cpu_provider.PROVIDER, aten.PROVIDER)) in (
        None,
        "disabled by XYSERVE_NATIVE=0",
    )


def test_masks_that_are_not_rows_of_padding_are_declined():
    q, k, v, mask = _padded(torch.float32, [300, 300, 300, 300])
    mask = mask.clone()
    mask[..., 5, 2] = False  # a hole: not a contiguous range of keys
    torch.ops.xyserve.attention(q, k, v, mask)
    assert xy_inductor.stats().declined["attention"] == {"cpu: the mask is not rows of padding": 1}


def test_a_causal_batch_without_mask_runs_as_rows():
    q, k, v, _ = _padded(torch.float32, [300] * 4)
    got = torch.ops.xyserve.attention(q, k, v, None, True)
    assert xy_inductor.stats().paths["attention"] == {"cpu/dense": 1}
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tier", ["avx512", "avx2"])
def test_lower_vector_tiers_match_float64_too(tier):
    # The kernels another CPU would build (no AVX512-BF16, or no AVX-512), built and run here:
    # the differential tests again, in a child with the tier forced.
    if build.TIERS.index(tier) > build.TIERS.index(build.host_tier()):
        pytest.skip(f"this CPU runs {build.host_tier()} at most")
    code = (
        "import sys, pytest; from xy_inductor.kernels.cpu import build; "
        f"assert build.tier() == {tier!r}, build.tier(); "
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[1], '-k', "
        "'random or packed or padded or bitwise']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, __file__],
        capture_output=True,
        text=True,
        env={**os.environ, "XYSERVE_CPU_ATTN_TIER": tier},
        cwd=os.path.dirname(__file__),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_a_tier_the_cpu_lacks_is_a_reason():
    assert _unavailable_in_child({"XYSERVE_CPU_ATTN_TIER": "avx1024"}).startswith(
        "XYSERVE_CPU_ATTN_TIER=avx1024: expected one of avx2, avx512, avx512_bf16"
    )


def test_a_compiler_without_avx512_bf16_falls_back_to_avx512():
    # As with GCC < 10: the avx512_bf16 tier does not compile; the avx512 one serves.
    if build.host_tier() != "avx512_bf16":
        pytest.skip(f"this CPU runs {build.host_tier()}")
    code = (
        "from xy_inductor.kernels.cpu import build\n"
        "build._TIER_FLAGS['avx512_bf16'] += ('-mno-such-flag-xyserve',)\n"
        "build.library()\n"
        "assert build.loaded_tier() == 'avx512', build.loaded_tier()\n"
        "print(build.status())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XYSERVE_CPU_ATTN_TIER"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "loaded (avx512 vectors)"
    assert "CPU attention kernels (avx512_bf16) not built" in out.stderr


def _stats_oracle(mask: torch.Tensor) -> torch.Tensor:
    """What ``mask_rows.h`` must return, by plain ATen reductions."""
    m = mask[:, 0].float()
    allowed = mask[:, 0] if mask.dtype == torch.bool else m == 0
    bad = (~allowed & ~torch.isneginf(m)).any(-1) if mask.dtype != torch.bool else None
    count = allowed.sum(-1)
    first = torch.where(count > 0, allowed.int().argmax(-1), 0)
    last = torch.where(count > 0, mask.shape[-1] - 1 - allowed.flip(-1).int().argmax(-1), 0)
    if bad is not None:
        count = torch.where(bad, -1, count)
    return torch.stack([first, last, count], -1).int()


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.bfloat16, torch.float16])
def test_the_one_pass_mask_scan_matches_aten(dtype):
    """``mask_rows.h`` against plain ATen reductions, and the rows decided from it against
    ``rows_from_mask``'s ATen passes, on masks of runs with holes, rows seeing nothing, strided
    and broadcast views, and additive values that are not rows (finite, NaN; -0.0 is 0)."""
    gen = torch.Generator().manual_seed(1)
    scan = cpu_provider._mask_stats
    decided = 0
    for case in range(60):
        b, lq, lk = 3, int(torch.randint(1, 40, (1,), generator=gen)), 70
        start = torch.randint(0, lk, (b, 1, 1), generator=gen)
        stop = start + torch.randint(0, lk, (b, 1, 1), generator=gen)
        j = torch.arange(lk)
        i = torch.arange(lq)[:, None]
        allowed = (j >= start) & (j < stop) & ((j <= start + i) | (case % 3 == 0))
        if case % 2:
            allowed &= torch.rand(b, lq, lk, generator=gen) > 0.02  # holes
        allowed = allowed[:, None]
        if dtype == torch.bool:
            mask = allowed
        else:
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf")).to(dtype)
            if case % 5 == 1:
                mask[0, 0, 0, int(torch.randint(0, lk, (1,), generator=gen))] = -1e4
            if case % 5 == 2:
                mask[-1, 0, -1, -1] = float("nan")
            if case % 5 == 3:
                mask = mask.masked_fill(allowed, -0.0)
        if case % 4 == 1:
            mask = mask[:1].expand(b, 1, lq, lk)  # one mask for the batch
        if case % 4 == 2:
            mask = mask.transpose(2, 3).contiguous().transpose(2, 3)  # keys strided
        assert torch.equal(scan(mask), _stats_oracle(mask)), case
        rows = rows_from_mask(mask, b, lq, lk, scan)
        assert rows == rows_from_mask(mask, b, lq, lk), case
        decided += rows is not None
    assert decided >= 10
