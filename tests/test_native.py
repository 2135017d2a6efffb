"""The C++ CPU kernels of xyserve.gemm and xyserve.attention (kernels/aten/native.py): built and
loaded here, they must give what the Python path gives, bit for bit and in the same layout, be
counted as ATen's calls, leave every other call to the Python path, and keep the ops' errors.

Loading registers the kernels for the rest of the process, as it does for a user of
``inductor=True``; the Python path stays reachable through ``use_providers``, which sends every
call there."""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import dense_rows_path

import xy_inductor
from xy_inductor.kernels import aten, cpu
from xy_inductor.kernels.aten import native
from xy_inductor.runtime import ops, providers
from xy_inductor.runtime.providers import Accept, OpKernel, Provider

gemm = torch.ops.xyserve.gemm.default
attention = torch.ops.xyserve.attention.default


@pytest.fixture(scope="module", autouse=True)
def _loaded():
    if native._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    assert ops.load_native() is None, native.status()
    assert native.loaded()


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def python_path():
    """The same ATen provider, through the Python kernels (an open use_providers block)."""
    return providers.use_providers([aten.PROVIDER])


def native_counts() -> dict:
    return {k: n for k, n in native.calls().items() if n}


def _mask(kind, b, hq, lq, lk, dtype):
    if kind is None:
        return None
    keep = randn(b, 1, lq, lk, seed=9) > -0.5
    keep[..., 0] = True
    if kind == "bool4d":
        return keep
    if kind == "bool_batch":
        return keep[:, :, :1]  # [B, 1, 1, Lk], the decode mask hf.accelerate builds
    if kind == "bool2d":
        return keep[0, 0]
    return torch.zeros(1, hq, lq, lk, dtype=dtype).masked_fill(~keep[:1], -math.inf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("b", "hq", "hkv", "lq", "lk", "kind", "causal", "scale"),
    [
        (1, 8, 4, 1, 64, None, False, None),  # a decode step, GQA
        (2, 8, 4, 1, 37, "bool_batch", False, None),  # a padded batch's decode step
        (1, 4, 4, 7, 7, None, True, None),
        (2, 8, 2, 7, 37, "bool4d", False, 0.3),
        (2, 4, 2, 7, 37, "bool2d", False, None),
        (1, 8, 8, 9, 9, "float", False, None),
    ],
)
def test_attention_is_the_python_paths_bit_for_bit(dtype, b, hq, hkv, lq, lk, kind, causal, scale):
    q = randn(b, hq, lq, 32, dtype=dtype, seed=1)
    k, v = randn(b, hkv, lk, 32, dtype=dtype, seed=2), randn(b, hkv, lk, 32, dtype=dtype, seed=3)
    mask = _mask(kind, b, hq, lq, lk, dtype)
    with python_path():
        want = attention(q, k, v, mask, causal, scale)
    assert native_counts() == {}
    out = attention(q, k, v, mask, causal, scale)
    assert native_counts() == {("attention", "aten", "sdpa"): 1}
    assert torch.equal(out, want)
    assert out.stride() == want.stride() and out.transpose(1, 2).is_contiguous()
    assert xy_inductor.stats().paths["attention"] == {"aten/sdpa": 2}


def test_attention_written_in_another_layout_is_copied_into_the_promised_one():
    # A float mask sends SDPA to its math kernel, which writes [B, H, Lq, D]: the op must still
    # return [B, Lq, H, D] in memory, as its fake implementation says.
    q, k, v = randn(2, 4, 5, 16), randn(2, 4, 6, 16, seed=1), randn(2, 4, 6, 16, seed=2)
    mask = torch.zeros(2, 4, 5, 6)
    raw = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention(q, k, v, mask, False, None)
    assert torch.equal(out, raw)
    assert out.transpose(1, 2).is_contiguous()
    assert native_counts() == {("attention", "aten", "sdpa"): 1}


def test_attention_worth_planning_goes_to_the_python_path():
    # Above PLANNED_MIN_SCORES a padded batch runs as planned rows, which only Python does.
    b, lq = 2, 512
    q, k, v = randn(b, 4, lq, 16), randn(b, 2, lq, 16, seed=1), randn(b, 2, lq, 16, seed=2)
    assert b * lq * lq >= aten.PLANNED_MIN_SCORES
    keep = torch.ones(lq, lq, dtype=torch.bool).tril().expand(b, 1, lq, lq).clone()
    keep[1, :, :, :100] = False  # row 1 left-padded by 100: its padding slots see no key
    out = attention(q, k, v, keep, False, None)
    assert native_counts() == {}
    assert xy_inductor.stats().paths["attention"] == {dense_rows_path(): 1}
    with python_path():
        torch.testing.assert_close(out, attention(q, k, v, keep, False, None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37,), (1, 1, 64), (3, 37), (2, 7, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_is_the_python_paths_bit_for_bit(dtype, shape, bias):
    k = shape[-1]
    x, w = randn(*shape, dtype=dtype, seed=1), randn(29, k, dtype=dtype, seed=2)
    b = randn(29, dtype=dtype, seed=3) if bias else None
    with python_path():
        want = gemm(x, w, b)
    out = gemm(x, w, b)
    assert native_counts() == {("gemm", "aten", "linear"): 1}
    assert torch.equal(out, want) and out.stride() == want.stride()
    assert xy_inductor.stats().paths["gemm"] == {"aten/linear": 2}


def test_gemm_over_max_tokens_is_counted_by_the_python_path():
    x, w = randn(5, 8), randn(4, 8, seed=1)
    with pytest.warns(UserWarning, match="max_tokens"):
        out = gemm(x, w, None, 4)
    assert torch.equal(out, F.linear(x, w))
    assert native_counts() == {}
    assert xy_inductor.stats().gemm_over_max_tokens == 1


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: gemm(randn(3, 8), randn(4, 9), None), "x has K=8 but weight is"),
        (
            lambda: gemm(randn(3, 8), randn(4, 8, dtype=torch.bfloat16), None),
            "x and weight dtypes differ",
        ),
        (lambda: gemm(randn(3, 8), randn(4, 8), randn(5)), "bias must be \\[N=4\\]"),
        (
            lambda: attention(randn(1, 2, 3, 8), randn(1, 2, 3, 4), randn(1, 2, 3, 8)),
            "q head dim 8 differs from k head dim 4",
        ),
        (
            lambda: attention(
                randn(1, 2, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), torch.ones(3, 3, 3, 3)
            ),
            "does not broadcast",
        ),
    ],
)
def test_bad_arguments_get_the_python_paths_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_differentiating_is_a_clear_error_and_no_grad_runs():
    x, w = randn(3, 8), torch.nn.Parameter(randn(4, 8, seed=1))
    q = randn(1, 2, 3, 8).requires_grad_()
    k, v = randn(1, 2, 3, 8, seed=1), randn(1, 2, 3, 8, seed=2)
    for call in (lambda: gemm(x, w, None), lambda: attention(q, k, v, None, True, None)):
        with pytest.raises(RuntimeError, match="inference op and has no backward"):
            call()
        with torch.no_grad():
            assert not call().requires_grad
        with torch.inference_mode():
            assert not call().requires_grad
    assert native_counts() == {("gemm", "aten", "linear"): 2, ("attention", "aten", "sdpa"): 2}


@pytest.mark.parametrize("op", ["gemm", "attention"])
def test_opcheck_with_the_cpp_kernels(op):
    if op == "gemm":
        args = (randn(2, 7, 37), randn(29, 37, seed=1), randn(29, seed=2))
    else:
        args = (randn(2, 8, 7, 32), randn(2, 2, 9, 32, seed=1), randn(2, 2, 9, 32, seed=2))
        args += (randn(2, 1, 7, 9, seed=3) > 0, False, 0.2)
    torch.library.opcheck(getattr(torch.ops.xyserve, op).default, args)


def _recording_provider(ran: list) -> Provider:
    def run(call, accept):
        ran.append(threading.get_ident())
        return F.linear(call.x, call.weight, call.bias)

    return Provider(
        name="recording",
        unavailable=lambda: None,
        kernels={"gemm": OpKernel(lambda call: Accept("linear"), run)},
    )


def test_an_open_use_providers_block_sends_every_call_to_python():
    ran: list[int] = []
    opened, release = threading.Event(), threading.Event()

    def other() -> None:
        with providers.use_providers([_recording_provider(ran), aten.PROVIDER]):
            gemm(randn(2, 8), randn(4, 8, seed=1), None)
            opened.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert opened.wait(10)
        gemm(randn(2, 8), randn(4, 8, seed=1), None)  # this thread's list is the default
    finally:
        release.set()
        thread.join()
    assert ran == [thread.ident]
    assert native_counts() == {}
    assert xy_inductor.stats().calls["gemm"] == {"recording": 1, "aten": 1}
    gemm(randn(2, 8), randn(4, 8, seed=1), None)  # every block closed: C++ again
    assert native_counts() == {("gemm", "aten", "linear"): 1}


def test_inductors_code_reaches_the_cpp_kernels():
    def f(q, k, v, x, w):
        return attention(q, k, v, None, False, None).sum() + gemm(x, w, None).sum()

    args = (randn(1, 8, 1, 16), randn(1, 4, 9, 16, seed=1), randn(1, 4, 9, 16, seed=2))
    args += (randn(1, 16, seed=3), randn(8, 16, seed=4))
    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    with torch.no_grad():
        got = compiled(*args)
        assert native_counts() == {("gemm", "aten", "linear"): 1, ("attention", "aten", "sdpa"): 1}
        with python_path():
            torch.testing.assert_close(got, f(*args))


def test_stats_report_the_kernels_and_reset_their_counts():
    gemm(randn(2, 8), randn(4, 8, seed=1), None)
    s = xy_inductor.stats()
    assert s.native_kernels is None and "C++ kernels       loaded" in str(s)
    assert s.calls == {"gemm": {"aten": 1}}
    xy_inductor.reset_stats()
    assert native_counts() == {} and xy_inductor.stats().calls == {}


def test_the_build_is_cached():
    path = native._build()
    built = path.stat().st_mtime_ns
    assert native._build() == path and path.stat().st_mtime_ns == built  # not compiled again


def test_why_the_kernels_would_not_load(monkeypatch):
    from xy_inductor.kernels import ascend

    only_aten = (aten.PROVIDER,)
    assert native._why_not(only_aten) is None
    monkeypatch.setenv("XYSERVE_NATIVE", "0")
    assert native._why_not(only_aten) == "disabled by XYSERVE_NATIVE=0"
    monkeypatch.delenv("XYSERVE_NATIVE")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert native._why_not(only_aten).startswith("no C++ compiler")
    monkeypatch.delenv("CXX")
    both = (ascend.PROVIDER, aten.PROVIDER)
    assert native._why_not(both) == (
        "providers other than ATen serve gemm or attention in this process (ascend, aten)"
    )
    # A provider of other ops only (the CPU provider's attention_varlen) leaves the rules exact.
    assert native._why_not((cpu.PROVIDER, aten.PROVIDER)) is None


def test_a_failed_build_is_a_reason_not_an_error(monkeypatch, tmp_path):
    # As on a machine where the compiler cannot build against torch's headers.
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_refused", None)
    monkeypatch.setenv("XYSERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    why = ops.load_native()
    assert why is not None and why.startswith("building or loading native.cpp failed")
    assert ops.load_native() == why and native.status() == why  # tried once per process
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built left to load


def test_graphs_run_as_traced_call_the_cpp_kernels():
    from xy_inductor import workload as wl

    model = wl.tiny_model("llama")
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    compiled = xy_inductor.compile(model)
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    counts = native_counts()
    layers = model.config.num_hidden_layers
    assert counts[("attention", "aten", "sdpa")] == layers  # every attention call, in C++
    assert counts[("gemm", "aten", "linear")] >= 4 * layers  # q/k/v/o at least
    assert xy_inductor.stats().paths["attention"] == {"aten/sdpa": layers}
