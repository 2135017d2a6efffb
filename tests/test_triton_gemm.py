"""The Triton SmoothGEMM kernels and provider. On a machine without CUDA they run on CPU tensors
under ``TRITON_INTERPRET=1`` (set by conftest.py before Triton is imported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("triton")

import xy_inductor
from xy_inductor.kernels import aten
from xy_inductor.kernels import triton as triton_provider
from xy_inductor.kernels.calls import GemmCall
from xy_inductor.kernels.triton import gemm as tg
from xy_inductor.kernels.triton.menus import GEMM_MENU
from xy_inductor.runtime import providers
from xy_inductor.runtime.providers import Accept, plan_gemm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILES = GEMM_MENU.tiles
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
# Around every block_m of the menu, plus large odd values.
SOME_M = [1, 2, 3, 7, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129, 255, 257, 300, 1000, 1031]


def _check(tile, m, n, k, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(DEVICE)
    w = torch.randn(n, k, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=DEVICE)  # poison
    got = tg.triton_gemm(x, w, b, tile, out=out)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.data_ptr() == out.data_ptr()
    assert not got.isnan().any(), "an output element was not written"
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < TOLERANCE[dtype], f"{tile.name} M={m} N={n} K={k} {dtype}: rel err {err:.2e}"


@pytest.mark.parametrize("tile", TILES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_tile_is_exact_for_m_around_its_block_sizes(tile, dtype):
    for m in SOME_M:
        _check(tile, m, 80, 96, dtype, bias=m % 2 == 1, seed=m)


@pytest.mark.slow
@pytest.mark.parametrize("tile", TILES, ids=lambda t: t.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_tile_is_exact_for_every_m_up_to_300(tile, dtype):
    for m in range(1, 301):
        _check(tile, m, 48, 64, dtype, seed=m)


@pytest.mark.parametrize("tile", [TILES[0], TILES[-1]], ids=lambda t: t.name)
@pytest.mark.parametrize(("n", "k"), [(37, 129), (1, 17), (200, 5)])
def test_odd_n_and_k_are_masked(tile, n, k):
    for m in (1, 19, 130):
        _check(tile, m, n, k, torch.float32)


def test_leading_dims_and_views_are_served():
    x = torch.randn(2, 3, 40, device=DEVICE)
    w = torch.randn(24, 40, device=DEVICE)
    torch.testing.assert_close(tg.triton_gemm(x, w, None, TILES[0]), F.linear(x, w))
    wt = torch.randn(40, 24, device=DEVICE)  # GPT-2 Conv1D weight, used transposed
    torch.testing.assert_close(tg.triton_gemm(x, wt.t(), None, TILES[0]), F.linear(x, wt.t()))
    assert tg.triton_gemm(x[:, :0], w, None, TILES[0]).shape == (2, 0, 24)


def test_bad_out_is_a_clear_error():
    with pytest.raises(ValueError, match=r"out must be a contiguous \[2, 3\]"):
        tg.triton_gemm(torch.randn(2, 4), torch.randn(3, 4), None, TILES[0], torch.empty(3, 2))


def test_row_offsets_past_2_to_the_31_do_not_wrap():
    # Regression: offs_m * stride_xm (and offs_n * stride_wn, offs_m * stride_om) were int32;
    # on a large-vocabulary lm_head with a raised max_tokens, M x N passes 2**31 elements. Here
    # row 2 of x lies 2**31 elements past row 0 (each factor fits int32, the product does
    # not); a wrapped offset read the buffer's start instead (max error 175.8). The buffer is 8
    # GiB of address space, of which only the pages written are ever touched.
    k, n = 16, 64
    big = torch.empty(2**32 + 4 * k, dtype=torch.bfloat16, device=DEVICE)
    x = big[2**31 :].as_strided((3, k), (2**30, 1))
    g = torch.Generator().manual_seed(3)
    x.copy_(torch.randn(3, k, generator=g).to(torch.bfloat16))
    big[: 4 * k] = -7.0  # where a wrapped offset would read
    w = torch.randn(n, k, generator=g).to(torch.bfloat16).to(DEVICE)
    got = tg.triton_gemm(x, w, None, TILES[0])
    want = F.linear(x.double(), w.double())
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < 1e-2


def test_inputs_that_are_not_rows_are_refused_not_copied():
    x = torch.randn(8, 2, 32, device=DEVICE).transpose(0, 1)  # [2, 8, 32]: rows do not collapse
    assert triton_provider.row_stride(x) is None
    assert triton_provider.row_stride(torch.randn(4, 64, device=DEVICE)[:, ::2]) is None
    assert triton_provider.row_stride(torch.randn(4, 3, 64, device=DEVICE)[:, 1:2]) == 192
    with pytest.raises(ValueError, match="not a view of \\[M, K\\] rows"):
        tg.triton_gemm(x, torch.randn(8, 32, device=DEVICE), None, TILES[0])


# -- the provider --------------------------------------------------------------------------


@pytest.fixture
def triton_first():
    with providers.use_providers([triton_provider.PROVIDER, aten.PROVIDER]):
        yield


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(48, 80)
        self.down = nn.Linear(80, 48, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def test_provider_serves_compiled_gemms_and_declines_above_max_tokens(triton_first):
    model = _Mlp().eval().to(DEVICE)
    compiled = xy_inductor.compile(model, max_tokens=64)
    with torch.no_grad():
        for m in (3, 17, 64, 65):
            x = torch.randn(m, 48, device=DEVICE)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    s = xy_inductor.stats()
    assert s.calls["gemm"] == {"triton": 6, "aten": 2}  # M=65 > max_tokens runs on ATen
    assert s.paths["gemm"] == {"triton/smoothgemm": 6, "aten/linear": 2}
    assert s.declined["gemm"] == {"triton: M above max_tokens": 2}
    assert s.gemm_over_max_tokens == 2


def test_provider_declines_what_it_cannot_serve(triton_first):
    def check(x, w, b, max_tokens):
        return triton_provider.check_gemm(GemmCall(x, w, b, max_tokens))

    x, w = torch.randn(4, 32, device=DEVICE), torch.randn(8, 32, device=DEVICE)
    accept = check(x, w, None, 8192)
    assert accept == Accept("smoothgemm", GEMM_MENU.tiles[0])  # the plan's tile for M=4
    assert check(x.double(), w.double(), None, 8192).startswith("torch.float64")
    assert check(x, w, None, 3) == "M above max_tokens"
    unaligned = torch.randn(4 * 32 + 1, device=DEVICE)[1:].view(4, 32)
    assert check(unaligned, w, None, 8192) == "input not 16-byte aligned"
    strided = torch.randn(8, 64, device=DEVICE)[:, ::2]
    assert check(x, strided, None, 8192) == "weight strided in both dims"
    assert check(strided, w, None, 8192).startswith("x is not [M, K] rows")


def _serve_after_warm_up(rows: list[int]) -> None:
    """The first request compiles nothing: the compile keys Triton computes for calls with
    these M are among those the backend warmed at compile time."""
    model = _Mlp().eval().to(DEVICE)
    compiled = xy_inductor.compile(model, max_tokens=300)
    with tg.record_launch_keys() as keys, torch.no_grad():
        compiled(torch.randn(2, 48, device=DEVICE))  # compiles the graph: warms the kernels
        warmed = set(keys)
        variants = tg.compiled_variants()
        for m in rows:
            compiled(torch.randn(m, 48, device=DEVICE))
    # Dynamo compiles a second graph for M=1 (it specialises size 1); that compile warms the
    # same variants again, so the keys stay the warmed ones.
    assert xy_inductor.stats().backend_compiles == 2
    assert xy_inductor.stats().kernels_warmed == 2 * len(warmed) > 0
    assert keys == warmed, f"compiled while serving: {keys - warmed}"
    assert tg.compiled_variants() == variants  # on CUDA: Triton's own cache did not grow
    assert xy_inductor.stats().calls["gemm"] == {"triton": 2 * (len(rows) + 1)}


def test_warm_up_compiles_every_variant_serving_needs(triton_first):
    # Both sides of every bucket edge of the two GEMMs' plans (M = 1…300), and odd values.
    plans = [plan_gemm(n, k, dtype=torch.float32, max_tokens=300) for n, k in ((80, 48), (48, 80))]
    edges = {b.lo for plan in plans for b in plan.buckets}
    rows = sorted({1, 7, 37, 129, 255, 300} | {m for e in edges for m in (e - 1, e) if m >= 1})
    _serve_after_warm_up(rows)


@pytest.mark.slow
def test_warm_up_compiles_every_variant_m_1_to_300_needs(triton_first):
    _serve_after_warm_up(list(range(1, 301)))


def test_compile_key_ignores_m_but_not_tile_or_dtype():
    w = torch.randn(64, 96, device=DEVICE)
    with tg.record_launch_keys() as keys:
        for m in (1, 2, 16, 17, 32, 33, 127):
            tg.triton_gemm(torch.randn(m, 96, device=DEVICE), w, None, TILES[0])
        assert len(keys) == 1
        tg.triton_gemm(torch.randn(5, 96, device=DEVICE), w, None, TILES[1])
        tg.triton_gemm(torch.randn(5, 96, device=DEVICE).bfloat16(), w.bfloat16(), None, TILES[0])
        assert len(keys) == 3
