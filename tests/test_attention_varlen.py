"""torch.ops.xyserve.attention_varlen: packed mixed batches over a paged KV cache."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import cpu_kernels_built, kv_layouts, packed_reference

import xy_inductor
from xy_inductor.kernels import aten, cpu
from xy_inductor.runtime import providers

varlen = torch.ops.xyserve.attention_varlen.default

# Prefill, decode, chunked prefill (keys before the queries), verify (5 draft tokens).
Q_LENS = [37, 1, 20, 5]
KV_LENS = [37, 90, 75, 61]


def _inputs(dtype=torch.float32, group=4, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hkv, d = 2, 64
    q = torch.randn(sum(Q_LENS), hkv * group, d, generator=gen).to(dtype)
    ks = [torch.randn(kv, hkv, d, generator=gen).to(dtype) for kv in KV_LENS]
    vs = [torch.randn(kv, hkv, d, generator=gen).to(dtype) for kv in KV_LENS]
    _, (k, v, table) = kv_layouts(ks, vs, KV_LENS, block_size, hkv, d, gen)
    cu = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32)
    args = (q, k.to(dtype), v.to(dtype), cu, torch.tensor(KV_LENS, dtype=torch.int32), table)
    return args, (q, ks, vs)


@pytest.mark.parametrize("window", [None, 16])
def test_mixed_batch_matches_float64_on_the_aten_provider(window):
    args, (q, ks, vs) = _inputs()
    with providers.use_providers([aten.PROVIDER]):
        got = varlen(*args, True, window)
    want = packed_reference(q, ks, vs, Q_LENS, KV_LENS, True, window, 64**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    assert xy_inductor.stats().paths["attention_varlen"] == {"aten/rows": 1}


def test_mixed_batch_on_the_triton_kernel():
    pytest.importorskip("triton")
    from xy_inductor.kernels import triton as triton_provider

    args, (q, ks, vs) = _inputs(dtype=torch.bfloat16, block_size=32)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER]):
        got = varlen(*(a.to(device) for a in args)).cpu()
    want = packed_reference(q, ks, vs, Q_LENS, KV_LENS, True, None, 64**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2
    assert xy_inductor.stats().paths["attention_varlen"] == {"triton/plan": 1}


def test_opcheck():
    args, _ = _inputs()
    torch.library.opcheck(varlen, (*args, True, 16, 0.1))


def test_traces_with_symbolic_token_counts():
    args, _ = _inputs()
    compiled = torch.compile(
        lambda *a: varlen(*a) * 2, backend="eager", dynamic=True, fullgraph=True
    )
    torch.testing.assert_close(compiled(*args), varlen(*args) * 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: (a[0][:, :, :32], *a[1:]), "head dim 32 differs"),
        (lambda a: (*a[:3], a[3][:-1], *a[4:]), "cu_seqlens_q needs rows \\+ 1"),
        (lambda a: (*a[:3], a[3].flip(0), *a[4:]), "must rise from 0"),
        (lambda a: (*a[:4], a[4] + 1000, a[5]), "row 0 has 37 queries and kv_len 1037"),
        (lambda a: (*a[:4], a[4].float(), a[5]), "kv_lens must be a 1-D integer tensor"),
        (lambda a: (*a[:5], a[5][:2]), "block_table has 2 rows for 4 sequences"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    args, _ = _inputs()
    with pytest.raises(ValueError, match=message):
        varlen(*change(args))


@pytest.mark.parametrize("bad", [-1, "blocks", 2**31 + 5])
def test_block_ids_a_row_reads_are_range_checked(bad):
    # A negative id wrapped around on the CPU (another block's keys, silently); an id past the
    # cache raised an IndexError from deep inside, or read out of bounds on a GPU.
    args, _ = _inputs()
    k = args[1]
    table = args[5].clone()
    bad = k.shape[0] if bad == "blocks" else bad
    table[1, 2] = bad  # row 1 has 90 keys: blocks 0 … 5 of 16 slots
    with pytest.raises(
        ValueError,
        match=(
            f"block_table\\[1, 2\\] = {bad} is not a block of the cache; expected ids in "
            f"\\[0, {k.shape[0]}\\) for the 6 blocks holding row 1's 90 keys"
        ),
    ):
        varlen(*args[:5], table)


def test_block_table_entries_past_a_rows_keys_are_not_checked():
    # vLLM pads each row of its table past the row's blocks; those entries are never read.
    args, (q, ks, vs) = _inputs()
    table = args[5].clone()
    table[0, 3:] = -1  # row 0 has 37 keys: blocks 0 … 2
    table[3, 4:] = 10**9  # row 3 has 61 keys: blocks 0 … 3
    got = varlen(*args[:5], table)
    want = packed_reference(q, ks, vs, Q_LENS, KV_LENS, True, None, 64**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


# -- xyserve.attention_packed: a prompt batch without its padding --------------------------------

packed_op = torch.ops.xyserve.attention_packed.default
PACKED_LENS = [5, 40, 1, 17]


def _packed(dtype=torch.float32, seed=0, d=64):
    gen = torch.Generator().manual_seed(seed)
    t = sum(PACKED_LENS)
    q = torch.randn(t, 8, d, generator=gen).to(dtype)
    k = torch.randn(t, 2, d, generator=gen).to(dtype)
    v = torch.randn(t, 2, d, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(PACKED_LENS).cumsum(0).tolist()])
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    return (q, k, v, cu), ([k[a:b] for a, b in bounds], [v[a:b] for a, b in bounds])


@pytest.mark.parametrize("provider", ["aten", "triton", "cpu"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_rows_match_float64(provider, window, dtype):
    (q, k, v, cu), (ks, vs) = _packed(dtype)
    if provider == "cpu":
        if not cpu_kernels_built():
            pytest.skip("the CPU provider's kernels do not build here")
        use = providers.use_providers([cpu.PROVIDER, aten.PROVIDER])
    elif provider == "triton":
        pytest.importorskip("triton")
        from xy_inductor.kernels import triton as triton_provider

        use = providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER])
    else:
        use = providers.use_providers([aten.PROVIDER])
    with use:
        got = packed_op(q, k, v, cu, True, window, None)
    want = packed_reference(q, ks, vs, PACKED_LENS, PACKED_LENS, True, window, 64**-0.5)
    assert ((got.double() - want).norm() / want.norm()).item() < (
        1e-5 if dtype == torch.float32 else 1e-2
    )
    path = {"aten": "aten/rows", "triton": "triton/plan", "cpu": "cpu/packed"}[provider]
    assert xy_inductor.stats().paths["attention_packed"] == {path: 1}


@pytest.mark.parametrize("dv", [8, 96])
@pytest.mark.parametrize("window", [None, 7])
def test_packed_rows_with_another_value_head_size(dv, window):
    # DeepSeek's MLA: value heads smaller than query and key heads. ATen's fused flash kernel
    # takes one head size, and the packed path raised (Q/K/V should have the same head size).
    (q, k, v, cu), _ = _packed()
    v = torch.randn(v.shape[0], 2, dv, generator=torch.Generator().manual_seed(5))
    bounds = list(itertools.pairwise(cu.tolist()))
    with providers.use_providers([aten.PROVIDER]):
        got = packed_op(q, k, v, cu, True, window, None)
    want = packed_reference(q, [k[a:b] for a, b in bounds], [v[a:b] for a, b in bounds],
                     PACKED_LENS, PACKED_LENS, True, window, 64**-0.5)  # fmt: skip
    assert got.shape == (q.shape[0], 8, dv)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5


def test_packed_op_checks_and_traces():
    (q, k, v, cu), _ = _packed()
    torch.library.opcheck(packed_op, (q, k, v, cu, True, None, 0.1))
    with pytest.raises(ValueError, match="k has 62 tokens, q 63"):
        packed_op(q, k[:-1], v, cu, True, None, None)
    with pytest.raises(ValueError, match="must rise from 0 to the 63 packed tokens"):
        packed_op(q, k, v, cu.flip(0), True, None, None)
    with pytest.raises(ValueError, match="window must be >= 1"):
        packed_op(q, k, v, cu, True, 0, None)
