"""torch.ops.xyserve.gemm / .attention: fake implementations, numerics, errors, providers.

The numeric tests run each of the op's own paths (ATen's SDPA call and planned rows, the Triton
kernels under the interpreter) against float64 references, and check through ``stats().paths``
that the path they meant to test is the one that ran."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TOLERANCE, rel_error

import xy_inductor
from xy_inductor.kernels import aten
from xy_inductor.kernels.calls import attention_output
from xy_inductor.runtime import providers
from xy_inductor.runtime.providers import Accept, OpKernel, Provider

gemm = torch.ops.xyserve.gemm.default
attention = torch.ops.xyserve.attention.default
SIZES = (1, 7, 37, 129)


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


# -- gemm ---------------------------------------------------------------------------------------


def _triton_first():
    pytest.importorskip("triton")
    from xy_inductor.kernels import triton

    return providers.use_providers([triton.PROVIDER, aten.PROVIDER])


# Each path: the providers in force, and what stats().paths must then show for the op.
GEMM_PATHS = {
    "aten": (lambda: providers.use_providers([aten.PROVIDER]), "aten/linear"),
    "triton": (_triton_first, "triton/smoothgemm"),
}


@pytest.mark.parametrize("path", list(GEMM_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_matches_float64_linear(path, dtype, m, bias):
    k, n = 37, 129
    x, w = randn(m, k, dtype=dtype, seed=1), randn(n, k, dtype=dtype, seed=2)
    b = randn(n, dtype=dtype, seed=3) if bias else None
    use, expected = GEMM_PATHS[path]
    with use():
        out = gemm(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (m, n) and out.is_contiguous()
    assert rel_error(out, ref) < TOLERANCE[dtype]
    assert xy_inductor.stats().paths["gemm"] == {expected: 1}


@pytest.mark.parametrize("shape", [(37,), (3, 37), (2, 7, 37), (2, 3, 1, 37)])
def test_gemm_keeps_leading_dims(shape):
    x, w = randn(*shape), randn(7, 37, seed=1)
    assert gemm(x, w, None).shape == (*shape[:-1], 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_opcheck(dtype, bias):
    x, w = randn(2, 7, 37, dtype=dtype), randn(129, 37, dtype=dtype, seed=1)
    b = randn(129, dtype=dtype, seed=2) if bias else None
    torch.library.opcheck(gemm, (x, w, b))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((randn(3, 8), randn(2, 4, 8), None), "weight must be \\[N, K\\], got 3-D"),
        ((randn(3, 8), randn(4, 9), None), "x has K=8 but weight is \\[N, K\\] with K=9"),
        ((randn(3, 8), randn(4, 8, dtype=torch.bfloat16), None), "x and weight dtypes differ"),
        ((randn(3, 8), randn(4, 8), randn(5)), "bias must be \\[N=4\\]"),
        ((randn(()), randn(4, 8), None), "at least 1 dim"),
    ],
)
def test_gemm_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        gemm(*args)


# -- attention ----------------------------------------------------------------------------------


def attention_reference(q, k, v, mask=None, is_causal=False, scale=None):
    """Float64 attention in plain PyTorch: repeat K/V per query head, mask, softmax."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        lq, lk = q.shape[2], k.shape[2]
        mask = torch.ones(lq, lk, dtype=torch.bool).tril()
    if mask is not None:
        scores = (
            scores.masked_fill(~mask, float("-inf"))
            if mask.dtype == torch.bool
            else scores + mask.double()
        )
    return scores.softmax(-1) @ v


CASES = [
    # (B, Hq, Hkv, Lq, Lk, mask kind, causal)
    (1, 4, 4, 7, 7, None, True),
    (2, 8, 2, 37, 37, None, True),
    (1, 8, 1, 1, 129, None, False),
    (2, 8, 4, 1, 37, "bool4d", False),
    (2, 4, 2, 7, 37, "bool2d", False),
    (1, 8, 8, 129, 129, "float", False),
    (3, 8, 2, 37, 129, "bool_batch", False),
    (3, 8, 2, 37, 37, "padded", False),  # a left-padded batch, as Hugging Face builds it
    (2, 4, 1, 7, 40, "padded_float", False),  # prefill of 7 over a static cache of 40 slots
]
# Masks that are rows of padding: the planned paths run them (others fall back to SDPA).
ROW_KINDS = (None, "padded", "padded_float")


def padded(b, lq, lk):
    """Left-padded causal rows: row r has lq - 2r queries over lk - 2r keys ending at slot lk."""
    keep = torch.zeros(b, 1, lq, lk, dtype=torch.bool)
    for r in range(b):
        n, m = lq - 2 * r, lk - 2 * r
        for i in range(n):
            keep[r, 0, lq - n + i, lk - m : lk - m + m - n + i + 1] = True
    return keep


def make_mask(kind, b, hq, lq, lk, dtype):
    if kind is None:
        return None
    if kind == "padded":
        return padded(b, lq, lk)
    if kind == "padded_float":
        return torch.zeros(b, 1, lq, lk, dtype=dtype).masked_fill(~padded(b, lq, lk), -math.inf)
    keep = randn(b, 1, lq, lk, seed=9) > -0.5
    keep[..., 0] = True  # every query keeps at least one key
    if kind == "bool4d":
        return keep
    if kind == "bool2d":
        return keep[0, 0]
    if kind == "bool_batch":
        return keep[:, :, :1]  # [B, 1, 1, Lk]: broadcast over heads and queries
    return (randn(1, hq, lq, lk, seed=10) * 0.5).to(dtype)


ATTENTION_PATHS = {
    # ATen as shipped: these calls are too small to plan, one SDPA call each.
    "sdpa": lambda: providers.use_providers([aten.PROVIDER]),
    # ATen planning every call whose mask is rows: each sequence at its own length.
    "rows": lambda: providers.use_providers([aten.provider(planned_min_scores=0)]),
    "triton": _triton_first,
}


def expected_path(path: str, kind: str | None, causal: bool, lq: int, lk: int) -> str:
    rows = kind in ROW_KINDS and not (causal and lq != lk)
    if path == "sdpa" or not rows:
        return "aten/sdpa"
    return "aten/rows" if path == "rows" else "triton/rows"


@pytest.mark.parametrize("path", list(ATTENTION_PATHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "hq", "hkv", "lq", "lk", "kind", "causal"), CASES)
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_matches_float64_reference(path, dtype, b, hq, hkv, lq, lk, kind, causal, scale):
    q = randn(b, hq, lq, 64, dtype=dtype, seed=1)
    k, v = randn(b, hkv, lk, 64, dtype=dtype, seed=2), randn(b, hkv, lk, 64, dtype=dtype, seed=3)
    mask = make_mask(kind, b, hq, lq, lk, dtype)
    with ATTENTION_PATHS[path]():
        out = attention(q, k, v, mask, causal, scale)
    assert out.shape == (b, hq, lq, 64) and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "output must be laid out [B, Lq, H, D]"
    want = attention_reference(q, k, v, mask, causal, scale)
    if kind in ("padded", "padded_float"):
        # Padding query slots see no key: the op writes zeros there, as SDPA does.
        want = torch.where(torch.isnan(want), 0.0, want)
    assert rel_error(out, want) < TOLERANCE[dtype]
    assert xy_inductor.stats().paths["attention"] == {expected_path(path, kind, causal, lq, lk): 1}


def test_attention_fully_masked_rows_match_sdpa():
    q, k, v = randn(1, 4, 5, 16), randn(1, 2, 6, 16, seed=1), randn(1, 2, 6, 16, seed=2)
    mask = torch.ones(1, 1, 5, 6, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 sees no key
    out = attention(q, k, v, mask, False, None)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("bias", [False, True])
def test_gemm_fused_opcheck(bias):
    x = torch.randn(5, 32)
    ws = [torch.randn(16, 32), torch.randn(8, 32)]
    bs = [torch.randn(16), torch.randn(8)] if bias else []
    torch.library.opcheck(torch.ops.xyserve.gemm_fused.default, (x, ws, bs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", [None, "bool4d", "float"])
def test_attention_opcheck(dtype, kind):
    q, k, v = (
        randn(2, 8, 7, 32, dtype=dtype),
        randn(2, 2, 9, 32, dtype=dtype, seed=1),
        randn(2, 2, 9, 32, dtype=dtype, seed=2),
    )
    torch.library.opcheck(attention, (q, k, v, make_mask(kind, 2, 8, 7, 9, dtype), False, 0.2))


def test_attention_fake_output_layout_matches_real():
    q, k, v = randn(2, 8, 7, 32), randn(2, 2, 9, 32, seed=1), randn(2, 2, 9, 32, seed=2)
    real = attention(q, k, v, None, False, None)
    expected = attention_output(q, v)
    assert real.shape == expected.shape and real.stride() == expected.stride()


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (0, 2, 1, 3), (1, 0, 2, 3), (0, 2, 3, 1)])
@pytest.mark.parametrize(
    "sizes", [(2, 3, 4, 5), (1, 3, 1, 5), (2, 1, 4, 5), (1, 1, 1, 1), (2, 3, 4, 1)]
)
def test_the_layout_check_is_transpose_then_is_contiguous(sizes, order):
    # aten._blhd replaced out.transpose(1, 2).is_contiguous() on the decode path; with one
    # query, out.is_contiguous() is used (the same thing when Lq == 1).
    base = torch.empty([sizes[i] for i in order])
    out = base.permute([order.index(i) for i in range(4)])
    assert tuple(out.shape) == sizes
    assert aten._blhd(out) == out.transpose(1, 2).is_contiguous()
    if sizes[2] == 1:
        assert out.is_contiguous() == out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize(
    ("shapes", "kwargs", "message"),
    [
        (((1, 4, 8), (1, 4, 8), (1, 4, 8)), {}, "q must be \\[B, H, L, D\\], got 3-D"),
        (((1, 6, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)), {}, "multiple of kv heads"),
        (((1, 4, 3, 8), (1, 4, 5, 8), (1, 4, 6, 8)), {}, "must share \\[B, Hkv, Lk\\]"),
        (((2, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)), {}, "batch sizes differ"),
        (((1, 4, 3, 8), (1, 4, 3, 16), (1, 4, 3, 8)), {}, "head dim 8 differs"),
        (((1, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)), {"mask": (1, 1, 3, 4)}, "does not broadcast"),
        (
            ((1, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)),
            {"mask": (1, 1, 3, 3), "causal": True},
            "not both",
        ),
        (
            ((1, 4, 3, 8), (1, 4, 3, 8), (1, 4, 3, 8)),
            {"mask_dtype": torch.int64},
            "must be bool or",
        ),
    ],
)
def test_attention_rejects_bad_arguments(shapes, kwargs, message):
    q, k, v = (randn(*s, seed=i) for i, s in enumerate(shapes))
    mask = None
    if "mask" in kwargs:
        mask = torch.ones(kwargs["mask"], dtype=torch.bool)
    if "mask_dtype" in kwargs:
        mask = torch.ones(1, 1, 3, 3, dtype=kwargs["mask_dtype"])
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, mask, kwargs.get("causal", False), None)


# -- providers ------------------------------------------------------------------------------------


def test_aten_is_the_last_provider_and_is_counted():
    assert providers.active_providers()[-1].name == "aten"
    x, w = randn(3, 8), randn(4, 8, seed=1)
    gemm(x, w, None)
    gemm(x, w, None)
    attention(
        randn(1, 2, 3, 8), randn(1, 2, 3, 8, seed=1), randn(1, 2, 3, 8, seed=2), None, True, None
    )
    calls = xy_inductor.stats().calls
    assert calls == {"gemm": {"aten": 2}, "attention": {"aten": 1}}


def _picky_provider(ran: list) -> Provider:
    def check(call):
        return "odd K" if call.x.shape[-1] % 2 else Accept("even", call.x.shape[-1])

    def run(call, accept):
        ran.append(accept.decision)  # what the checker decided, handed over unchanged
        return F.linear(call.x, call.weight, call.bias)

    return Provider(name="picky", unavailable=lambda: None, kernels={"gemm": OpKernel(check, run)})


def test_first_accepting_provider_runs_and_declines_are_counted():
    ran: list[int] = []
    aten = providers.active_providers()[-1]
    with providers.use_providers([_picky_provider(ran), aten]):
        even = gemm(randn(3, 8), randn(4, 8, seed=1), None)
        odd = gemm(randn(3, 7), randn(4, 7, seed=1), None)
    assert ran == [8]  # the picky provider ran the even-K call only
    assert even.shape == odd.shape == (3, 4)
    s = xy_inductor.stats()
    assert s.calls["gemm"] == {"picky": 1, "aten": 1}
    assert s.paths["gemm"] == {"picky/even": 1, "aten/linear": 1}
    assert s.declined["gemm"] == {"picky: odd K": 1}
    assert providers.active_providers()[-1].name == "aten"  # restored after the block


def test_no_accepting_provider_is_a_clear_error():
    with providers.use_providers([_picky_provider([])]):
        with pytest.raises(RuntimeError, match="no provider accepted the call \\(picky: odd K\\)"):
            gemm(randn(3, 7), randn(4, 7, seed=1), None)
        with pytest.raises(RuntimeError, match="no provider implements it"):
            attention(randn(1, 2, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), None, False, None)


def test_unavailable_providers_are_skipped(monkeypatch):
    import types

    absent = types.ModuleType("xy_test_absent_provider")
    absent.PROVIDER = Provider(name="absent", unavailable=lambda: "not here", kernels={})
    monkeypatch.setitem(__import__("sys").modules, "xy_test_absent_provider", absent)
    modules = ("xy_test_absent_provider", "xy_inductor.kernels.aten")
    monkeypatch.setattr(providers, "PROVIDER_MODULES", modules)
    providers.default.cache_clear()
    try:
        loaded = providers.default()
        assert [p.name for p in loaded] == ["aten"]
        assert [name for name, _ in providers.describe()] == ["absent", "aten"]  # listed, skipped
    finally:
        providers.default.cache_clear()


def test_every_provider_says_whether_it_can_run_here():
    listed = dict(providers.describe())
    assert list(listed) == ["ascend", "triton", "cpu", "aten"] and listed["aten"] is None
    assert listed["ascend"] is not None  # never installed here: it says why
    if not torch.cuda.is_available():
        assert "no CUDA device" in listed["triton"] or "not installed" in listed["triton"]


def test_a_checker_that_returns_neither_accept_nor_reason_is_a_clear_error():
    sloppy = Provider(
        name="sloppy",
        unavailable=lambda: None,
        kernels={"gemm": OpKernel(lambda call: None, lambda call, accept: None)},
    )
    with (
        providers.use_providers([sloppy, aten.PROVIDER]),
        pytest.raises(TypeError, match="sloppy provider's checker returned None"),
    ):
        gemm(randn(3, 8), randn(4, 8, seed=1), None)


def test_the_provider_list_is_local_to_a_thread():
    import threading

    seen = []
    with providers.use_providers([_picky_provider([]), aten.PROVIDER]):
        other = threading.Thread(target=lambda: seen.append(providers.active_providers()))
        other.start()
        other.join()
        assert providers.active_providers()[0].name == "picky"
    assert [p.name for p in seen[0]] == [p.name for p in providers.active_providers()]


def test_use_providers_validates_its_argument():
    with pytest.raises(ValueError, match="at least one Provider"), providers.use_providers([]):
        pass
    with (
        pytest.raises(ValueError, match="expected Provider objects"),
        providers.use_providers(["aten"]),
    ):
        pass


def test_differentiating_through_an_op_is_a_clear_error():
    x, w = randn(3, 8), torch.nn.Parameter(randn(4, 8, seed=1))
    q = randn(1, 2, 3, 8).requires_grad_()
    k, v = randn(1, 2, 3, 8, seed=1), randn(1, 2, 3, 8, seed=2)
    for call in (
        lambda: gemm(x, w, None),
        lambda: attention(q, k, v, None, True, None),
        lambda: torch.ops.xyserve.gemm_fused.default(x, [w, w], []),
    ):
        with pytest.raises(RuntimeError, match="inference op and has no backward"):
            call()
        with torch.no_grad():
            assert not call().requires_grad  # the same call without gradients runs
