"""The xyserve backend end to end on small modules: options, numerics, recompiles, fallbacks."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOLERANCE, capture, count_calls, randn, rel_error

import xy_inductor
from xy_inductor.config import (
    BACKEND_OPTIONS,
    AccelerateOptions,
    CompileOptions,
    XyConfig,
    accelerate_options,
    backend_config,
)
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.lowering import LoweringOptions
from xy_inductor.lowering.pipeline import LEFT_TO_INDUCTOR, lower_graph
from xy_inductor.runtime import providers


class Block(nn.Module):
    """One pre-norm attention block with GQA, written the way Llama-style models are."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        h = self.norm(x)
        q = self.q(h).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, length, 2, self.kv_heads, self.head_dim).unbind(2)
        a = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
        return x + self.o(a.transpose(1, 2).reshape(b, length, -1))


def make_block(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Block().to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_named_backend_lowers_and_matches_eager(dtype):
    model = make_block(dtype)
    compiled = torch.compile(model, backend="xyserve", dynamic=True)
    with torch.no_grad():
        for length in (7, 37, 129):
            x = randn(2, length, 64, dtype=dtype, seed=length)
            assert rel_error(compiled(x), model(x)) < TOLERANCE[dtype]
    s = xy_inductor.stats()
    assert s.backend_compiles == 1 and s.graphs_lowered == 1
    assert s.sites_lowered == {"attention": 1, "linear": 3}
    assert s.calls == {"attention": {"aten": 3}, "gemm": {"aten": 9}}


def test_compile_gives_one_graph_for_all_lengths_and_batches():
    model = make_block()
    compiled = xy_inductor.compile(model)
    with torch.no_grad():
        for b, length in [(2, 7), (3, 37), (2, 129), (5, 2)]:
            x = randn(b, length, 64, seed=length)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert xy_inductor.stats().backend_compiles == 1
        with torch.compiler.set_stance("fail_on_recompile"):
            for b, length in [(4, 11), (2, 300)]:
                compiled(randn(b, length, 64))
    assert xy_inductor.stats().backend_compiles == 1


def _aten_only():
    return providers.use_providers([providers.active_providers()[-1]])


def _gemm_provider(ran: list) -> Provider:
    """A GEMM provider in front of ATen, as Triton is on a GPU machine."""

    def run(call, accept):
        ran.append(tuple(call.x.shape))
        return F.linear(call.x, call.weight, call.bias)

    check = lambda call: Accept("rows")  # noqa: E731
    return Provider(name="front", unavailable=lambda: None, kernels={"gemm": OpKernel(check, run)})


def test_inductor_option_keeps_attention_opaque_and_leaves_linears_to_inductor():
    model = make_block()
    with _aten_only(), torch.no_grad():
        compiled = xy_inductor.compile(model, inductor=True)
        for length in (7, 37):
            x = randn(2, length, 64, seed=length)
            assert rel_error(compiled(x), model(x)) < TOLERANCE[torch.float32]
        gm, _ = capture(model, x)
        report = lower_graph(gm, LoweringOptions(inductor=True))
    s = xy_inductor.stats()
    assert s.backend_compiles == 1 and s.inductor_failures == 0
    # Inductor's generated code called the attention op, which ran on the ATen provider; with
    # no GEMM provider but ATen, the linear layers stayed Inductor's own mm calls.
    assert s.calls == {"attention": {"aten": 2}}
    assert s.sites_unlowered == {"linear": 3}
    reasons = [site.reason for site in report.sites if site.kind == "linear"]
    assert reasons == [LEFT_TO_INDUCTOR] * 3
    assert count_calls(gm, torch.ops.xyserve.gemm.default) == 0
    assert count_calls(gm, torch.ops.xyserve.attention.default) == 1


def test_inductor_option_lowers_linears_when_another_provider_serves_gemms():
    ran: list = []
    model = make_block()
    with providers.use_providers([_gemm_provider(ran), providers.active_providers()[-1]]):
        compiled = xy_inductor.compile(model, inductor=True)
        with torch.no_grad():
            for length in (7, 37):
                x = randn(2, length, 64, seed=length)
                assert rel_error(compiled(x), model(x)) < TOLERANCE[torch.float32]
    s = xy_inductor.stats()
    assert s.backend_compiles == 1 and s.inductor_failures == 0
    # Inductor's generated code called both ops: the GEMMs on the provider in front of ATen.
    assert s.calls == {"attention": {"aten": 2}, "gemm": {"front": 6}}
    assert ran[:3] == [(2, 7, 64), (2, 7, 64), (2, 7, 64)]


def test_inductor_failure_falls_back_to_the_lowered_graph(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    def broken(*args, **kwargs):
        # What Inductor raises for its own bugs (a lowering that asserts, say).
        raise torch._inductor.exc.InductorError(RuntimeError("simulated Inductor bug"), None)

    monkeypatch.setattr(compile_fx_module, "compile_fx", broken)
    model = make_block()
    compiled = xy_inductor.compile(model, inductor=True)
    x = randn(2, 9, 64)
    with (
        torch.no_grad(),
        pytest.warns(UserWarning, match="Inductor failed on a graph \\(InductorError: .*simulated"),
    ):
        out = compiled(x)
        expected = model(x)
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
    s = xy_inductor.stats()
    assert s.inductor_failures == 1 and s.calls["attention"] == {"aten": 1}


def test_graph_that_needs_gradients_runs_as_traced():
    model = make_block().train()
    compiled = xy_inductor.compile(model)
    x = randn(2, 9, 64)
    with pytest.warns(UserWarning, match="inference-only"):
        out = compiled(x)
    out.sum().backward()  # gradients flow: the graph is the original one
    assert model.q.weight.grad is not None
    s = xy_inductor.stats()
    assert (s.graphs_fallback, s.graphs_lowered) == (1, 0)
    assert s.sites_unlowered == {"attention": 1, "linear": 3} and s.calls == {}


# -- options ----------------------------------------------------------------------------------


def test_unknown_option_is_rejected_at_compile_time():
    with pytest.raises(ValueError, match="unknown xyserve option 'inductr'; valid options: "):
        xy_inductor.compile(make_block(), inductr=True)


def test_bad_option_value_is_rejected():
    with pytest.raises(ValueError, match="option 'inductor' expects True or False, got 'yes'"):
        xy_inductor.compile(make_block(), inductor="yes")
    with pytest.raises(ValueError, match="option 'dynamic' expects True, False or None, got 1"):
        CompileOptions(dynamic=1)


def test_unknown_option_through_torch_compile_names_it():
    # torch.compile validates nothing itself: the backend sees the options on the first call,
    # and Dynamo wraps the backend's ValueError in BackendCompilerFailed.
    compiled = torch.compile(make_block(), backend="xyserve", options={"bogus": 1})
    with pytest.raises(
        torch._dynamo.exc.BackendCompilerFailed, match="unknown xyserve option 'bogus'"
    ) as info:
        compiled(randn(1, 3, 64))
    assert isinstance(info.value.inner_exception, ValueError)


def test_torch_compile_level_options_are_not_backend_options():
    compiled = torch.compile(make_block(), backend="xyserve", options={"fullgraph": True})
    with pytest.raises(Exception, match=r"'fullgraph' is a torch\.compile argument"):
        compiled(randn(1, 3, 64))


def test_mode_is_rejected_with_the_valid_options():
    compiled = torch.compile(make_block(), backend="xyserve", mode="max-autotune")
    with pytest.raises(Exception, match=r"does not take torch\.compile\(mode='max-autotune'\)"):
        compiled(randn(1, 3, 64))


def test_backend_options_are_the_config_fields_without_front_end_ones():
    assert BACKEND_OPTIONS == (
        "lower_attention",
        "lower_manual_attention",
        "lower_linear",
        "fuse_siblings",
        "max_tokens",
        "ascend_nz_weights",
        "inductor",
        "inductor_regions",
    )


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "8192"])
def test_max_tokens_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="option 'max_tokens' expects a positive int"):
        XyConfig(max_tokens=value)


def test_each_entry_point_refuses_an_option_it_would_ignore():
    with pytest.raises(
        ValueError,
        match=r"'pack_prefill' is an xy_inductor\.hf\.accelerate option, not an xy_inductor\.",
    ):
        xy_inductor.compile(make_block(), pack_prefill=False)
    with pytest.raises(ValueError, match=r"'pack_prefill' is an .* option, not a backend option"):
        backend_config({"pack_prefill": False})
    with pytest.raises(
        ValueError, match=r"'dynamic' is not an .* option: accelerate marks the sizes"
    ):
        accelerate_options({"dynamic": True})
    assert accelerate_options({"fullgraph": True, "inductor": True}) == (
        XyConfig(inductor=True),
        AccelerateOptions(fullgraph=True),
    )


@pytest.mark.parametrize("cls", [XyConfig, CompileOptions, AccelerateOptions, LoweringOptions])
def test_option_classes_are_frozen_validated_and_documented(cls):
    options = cls()
    name = dataclasses.fields(cls)[-1].name  # a bool in each
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(options, name, getattr(options, name))
    with pytest.raises(ValueError, match=f"option '{name}' expects True or False, got 'yes'"):
        cls(**{name: "yes"})
    # Every field is followed by its docstring.
    (body,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    statements = body.body
    for i, statement in enumerate(statements):
        if isinstance(statement, ast.AnnAssign):
            after = statements[i + 1] if i + 1 < len(statements) else None
            documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            assert documented, f"{cls.__name__}.{statement.target.id} has no docstring"


def test_lowering_options_are_built_from_the_config_with_one_default_each():
    assert XyConfig().lowering_options() == LoweringOptions()
    config = XyConfig(max_tokens=512, fuse_siblings=True, inductor=True, ascend_nz_weights=True)
    assert config.lowering_options() == LoweringOptions(
        max_tokens=512, fuse_siblings=True, inductor=True
    )
    # The config's lowering fields default to LoweringOptions' (the one place they are written).
    for field in dataclasses.fields(LoweringOptions):
        assert getattr(XyConfig(), field.name) == field.default
    assert AccelerateOptions().fullgraph == CompileOptions().fullgraph


def test_options_reach_the_backend_through_torch_compile():
    model = make_block()
    compiled = torch.compile(model, backend="xyserve", options={"lower_linear": False})
    with torch.no_grad():
        compiled(randn(1, 5, 64))
    s = xy_inductor.stats()
    assert s.sites_lowered == {"attention": 1} and s.sites_unlowered == {"linear": 3}


# -- explain ----------------------------------------------------------------------------------


def test_explain_reports_sites_without_running_xyserve_kernels():
    model = make_block()
    with torch.no_grad():
        report = xy_inductor.explain(model, randn(2, 7, 64))
    assert (report.attention_total, report.attention_lowered) == (1, 1)
    assert (report.linear_total, report.linear_lowered) == (3, 3)
    assert report.graphs == 1 and report.unlowered == [] and report.fallbacks == []
    # The SDPA call has no module of its own: it is named by its line in this file.
    lines, first = inspect.getsourcelines(Block.forward)
    sdpa = first + next(i for i, text in enumerate(lines) if "scaled_dot_product" in text)
    assert {s.name for s in report.sites} == {"q", "kv", "o", f"test_backend.py:{sdpa}"}
    s = xy_inductor.stats()
    assert s.calls == {} and s.backend_compiles == 0  # explain neither runs nor counts kernels
    text = str(report)
    assert "attention" in text and "lowered" in text


def test_explain_says_why_a_site_is_left_alone():
    def fn(q, k, v, x, w):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5), F.linear(x, w)

    args = (randn(1, 2, 5, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8), randn(3, 8), randn(8))
    with torch.no_grad():
        report = xy_inductor.explain(fn, *args)
    assert report.attention_lowered == 0 and report.linear_lowered == 0
    reasons = [reason for _site, reason in report.unlowered]
    assert len(reasons) == 2
    assert any("dropout_p=0.5" in r for r in reasons)
    assert any("weight is 1-D" in r for r in reasons)
    assert "left as is: dropout_p=0.5" in str(report)


def test_explain_reports_gradient_fallback():
    report = xy_inductor.explain(make_block().train(), randn(1, 5, 64))
    assert report.linear_total == 3 and report.linear_lowered == 0
    assert len(report.fallbacks) == 1 and "inference-only" in report.fallbacks[0]
    text = str(report)
    assert text.count("inference-only") == 1  # said once, not per site
    assert "its graph runs as traced (above)" in text


def test_explain_rejects_non_callables():
    with pytest.raises(ValueError, match="expects a module or function, got int"):
        xy_inductor.explain(3)


class ScaledAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scaling = 0.3

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=self.scaling, is_causal=True)


@pytest.mark.parametrize("inductor", [False, True])
def test_scale_known_only_at_run_time_is_lowered_and_followed(inductor):
    # When a module's float attribute changes, Dynamo re-traces it as a 0-d tensor and .item():
    # the scale is then a run-time value, and the op must use the current one.
    model = ScaledAttention()
    compiled = xy_inductor.compile(model, inductor=inductor)
    with torch.no_grad():
        for scaling in (0.3, 0.5, 0.7):
            model.scaling = scaling
            q, k, v = (randn(2, 4, 7, 8, seed=i) for i in range(3))
            assert rel_error(compiled(q, k, v), model(q, k, v)) < TOLERANCE[torch.float32]
    s = xy_inductor.stats()
    assert s.sites_unlowered == {} and s.sites_lowered["attention"] == s.backend_compiles


class Mixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.up(x)))


class Pair(nn.Module):
    """Two identical blocks on two independent inputs: one compiled region serves both, and
    when the inputs' lengths differ the second block must not run the first's code as is."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Mixer() for _ in range(2)])

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.layers[0](x)
        b = self.layers[1](y)
        return a.sum(1) + b.sum(1)


def test_inductor_compiles_whole_graphs_unless_regions_are_asked_for():
    model = Pair().eval()
    compiled = xy_inductor.compile(model, inductor=True)
    with torch.no_grad():
        for lx, ly in ((7, 9), (12, 12)):
            x, y = randn(2, lx, 64, seed=lx), randn(2, ly, 64, seed=ly)
            assert rel_error(compiled(x, y), model(x, y)) < TOLERANCE[torch.float32]
    s = xy_inductor.stats()
    assert s.backend_compiles == 1 and s.inductor_failures == 0
    assert (s.inductor_regions, s.inductor_regions_compiled, s.region_mismatches) == (0, 0, 0)


def test_inductor_compiles_each_distinct_region_once():
    model = Pair().eval()
    compiled = xy_inductor.compile(model, inductor=True, inductor_regions=True)
    with torch.no_grad():
        for lx, ly in ((7, 9), (12, 12), (5, 30)):
            x, y = randn(2, lx, 64, seed=lx), randn(2, ly, 64, seed=ly)
            assert rel_error(compiled(x, y), model(x, y)) < TOLERANCE[torch.float32]
    s = xy_inductor.stats()
    assert s.backend_compiles == 1 and s.inductor_failures == 0
    # The two blocks and what follows them: three regions, two compiled.
    assert (s.inductor_regions, s.inductor_regions_compiled) == (3, 2)
    # The second block reuses the first's code only when its input is shaped the same in that
    # call (12, 12); otherwise it ran as traced, exactly, counted.
    assert s.region_mismatches == 2
