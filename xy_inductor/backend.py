"""The xyserve backend: what Dynamo calls with each graph it captures.

Registered as ``xyserve`` through the ``torch_dynamo_backends`` entry point, so
``torch.compile(model, backend="xyserve", options={...})`` finds it after ``pip install``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx
from torch._dynamo.exc import RestartAnalysis, SkipFrame
from torch._subclasses.fake_tensor import FakeTensor

from xy_inductor.compiled_graph import XyserveGraph, call_directly
from xy_inductor.config import BACKEND_OPTIONS, XyConfig, backend_config
from xy_inductor.kernels.calls import GemmWeight
from xy_inductor.lowering import lay_out_weights, lower_graph, sibling_parameters
from xy_inductor.regions import compile_regions
from xy_inductor.runtime import counters, providers
from xy_inductor.runtime.ops import load_native, stacked_rows
from xy_inductor.shape_guards import ShapeCheck, check_shapes

__all__ = ["compile_graph", "fallback_reason", "make_backend", "xyserve_backend"]

log = logging.getLogger("xy_inductor")

CompiledFn = Callable[..., object]


def xyserve_backend(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[object],
    *,
    options: Mapping[str, object] | None = None,
    mode: str | None = None,
) -> CompiledFn:
    """The ``xyserve`` backend: lower attention and linear sites, run or compile the rest.

    Without ``options`` it reads them from ``XYSERVE_OPTIONS`` (a JSON object), the way
    callers that only name the backend (vLLM's ``compilation_config``) configure it.
    """
    if mode not in (None, "default"):
        raise ValueError(
            f"xyserve does not take torch.compile(mode={mode!r}); "
            f"pass options={{...}} instead (valid: {', '.join(BACKEND_OPTIONS)})"
        )
    return compile_graph(gm, example_inputs, backend_config(options))


def make_backend(config: XyConfig) -> CompiledFn:
    """A backend bound to ``config``: what ``xy_inductor.compile`` hands to torch.compile."""

    def xyserve(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> CompiledFn:
        return compile_graph(gm, example_inputs, config)

    return xyserve


def fallback_reason(example_inputs: Sequence[object]) -> str | None:
    """Why a whole graph must run as traced, or None."""
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    ):
        return (
            "the graph needs gradients (grad mode is on and an input requires grad); xyserve is "
            "inference-only, so the graph runs as traced: call it under torch.no_grad() or "
            "torch.inference_mode()"
        )
    return None


def _inductor(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], regional: bool
) -> CompiledFn | None:
    """Inductor-compile the lowered graph, with ``regional`` region by region when it has
    repeated blocks (each distinct region once, ``regions.py``); None (and a warning) if
    Inductor fails on it.

    The lowered graph is correct as it is, so an Inductor failure costs speed, not the call.
    """
    # Imported here: only inductor=True needs Inductor, and importing it is slow.
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx

    try:
        # Inductor's size asserts re-check every input on every call (weights included), which
        # Dynamo's guards have just checked. vLLM turns them off too.
        with inductor_config.patch(size_asserts=False):
            cut = compile_regions(gm, example_inputs, compile_fx) if regional else None
            if cut is not None:
                split, regions, compiled = cut
                counters.record_regions(regions, compiled)
                return split.forward
            return compile_fx(gm, list(example_inputs))
    except (RestartAnalysis, SkipFrame):
        raise  # Dynamo's own control flow (e.g. re-trace with scalars as tensors), not failures
    except Exception as e:  # any Inductor failure (InductorError...) degrades to the traced graph
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(
            f"xyserve: Inductor failed on a graph ({type(e).__name__}: {first_line}); "
            "running it lowered but without Inductor",
            stacklevel=2,
        )
        log.debug("Inductor failure", exc_info=True)
        return None


def _packed_prefill(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` is a packed prefill (``hf.accelerate``): its time is in GEMMs and
    attention, which Inductor leaves to the xyserve ops, so compiling the elementwise ops
    between them would cost compile time and save little (``benchmarks/RESULTS.md``); it runs
    lowered as traced."""
    packed = torch.ops.xyserve.attention_packed.default
    return any(n.op == "call_function" and n.target is packed for n in gm.graph.nodes)


def _real_tensor(
    arg: object, gm: torch.fx.GraphModule, inputs: dict[torch.fx.Node, object]
) -> torch.Tensor | None:
    """The tensor a weight argument of the graph stands for: an input, an attribute, or one of
    those transposed (GPT-2's Conv1D weights are used as ``w.t()``)."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "placeholder":
        value = inputs.get(arg)
    elif arg.op == "get_attr":
        value = getattr(gm, str(arg.target), None)
    elif arg.op == "call_method" and arg.target == "t" and len(arg.args) == 1:
        base = _real_tensor(arg.args[0], gm, inputs)
        value = base.t() if base is not None else None
    else:
        value = None
    return value if isinstance(value, torch.Tensor) else None


def _gemm_weights(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], checks: list[ShapeCheck]
) -> list[tuple[list[torch.Tensor], bool, tuple[int, int | None]]]:
    """For each GEMM of ``gm``: its real weight tensors, whether it has a bias, and its M
    range. Read before Inductor, which rewrites ``gm``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = dict(zip(placeholders, example_inputs, strict=False))
    rows = {c.node: (c.lo, c.hi) for c in checks if c.size == "M"}
    found = []
    for node in gm.graph.nodes:
        if node.name not in rows:
            continue
        if node.target is torch.ops.xyserve.gemm.default:
            weights, has_bias = [node.args[1]], node.args[2] is not None
        else:
            weights, has_bias = list(node.args[1]), bool(node.args[2])
        tensors = [_real_tensor(w, gm, inputs) for w in weights]
        # Fake weights (vLLM's piecewise mode compiles on fake inputs): nothing to warm.
        if all(t is not None and not isinstance(t, FakeTensor) for t in tensors):
            found.append((tensors, has_bias, rows[node.name]))
    return found


def _warm_up(gemms: list, config: XyConfig) -> int:
    """Compile, before the first request, the kernels that will serve these GEMMs (and, with
    ``ascend_nz_weights``, lay their weights out for the NPU's matmul)."""
    max_tokens = config.max_tokens
    seen = set()
    variants = 0
    for tensors, has_bias, (lo, hi) in gemms:
        # A fused group runs as one GEMM over its weights stacked in one buffer.
        weight = stacked_rows(tensors) if len(tensors) > 1 else tensors[0]
        if weight is None:
            continue
        key = (weight.shape, weight.stride(), weight.dtype, weight.device, has_bias, lo, hi)
        if config.ascend_nz_weights:
            key += (weight.data_ptr(),)  # variants compile per shape; NZ casts per weight
        if key in seen:
            continue
        seen.add(key)
        rows = (max(lo, 1), min(hi if hi is not None else max_tokens, max_tokens))
        gemm = GemmWeight(
            weight,
            has_bias=has_bias,
            max_tokens=max_tokens,
            rows=rows,
            nz_weights=config.ascend_nz_weights,
        )
        variants += providers.prepare("gemm", gemm)
    return variants


def compile_graph(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object], config: XyConfig
) -> XyserveGraph:
    """Lower ``gm`` in place and return what runs it (saveable by compile caches)."""
    start = time.perf_counter()
    reason = fallback_reason(example_inputs)
    report = lower_graph(gm, config.lowering_options(), skip_reason=reason)
    inductor_failed = False
    compiled: CompiledFn | None = None
    # Read before Inductor, which rewrites gm; moved after it, which reads the inputs' layout.
    siblings = sibling_parameters(gm, example_inputs) if reason is None else []
    checks = check_shapes(gm, config.max_tokens) if reason is None else []
    for check in checks:
        if check.covered is False:
            log.info("xyserve: %s", check)
    gemms = _gemm_weights(gm, example_inputs, checks)
    if reason is not None:
        warnings.warn(f"xyserve: {reason}", stacklevel=2)
    elif config.inductor and not _packed_prefill(gm):
        # Inductor's code calls the ops through the dispatcher: C++ kernels save the crossing
        # back into Python on every CPU call (built once per machine; None or why not).
        load_native()
        compiled = _inductor(gm, example_inputs, config.inductor_regions)
        inductor_failed = compiled is None
    inductor_compiled = compiled is not None
    if compiled is None:
        if reason is None:
            call_directly(gm)
        compiled = gm.forward
    if siblings:
        moved = lay_out_weights(siblings)
        log.info("xyserve: moved the weights of %d sibling groups into one buffer each", moved)
    warmed = _warm_up(gemms, config)
    seconds = time.perf_counter() - start
    counters.record_compile(
        seconds,
        fallback=reason is not None,
        lowered=report.by_kind(lowered=True),
        unlowered=report.by_kind(lowered=False),
        inductor_failed=inductor_failed,
        warmed=warmed,
        failed=report.failed_by_kind(),
        opaque=report.opaque,
    )
    log.debug("xyserve compiled a graph in %.3f s: %s", seconds, report.matches)
    not_saved = None
    if inductor_compiled:
        not_saved = (
            "compiled with inductor=True; Inductor's code is not part of an xyserve artifact, "
            "so the graph is lowered and compiled again"
        )
    return XyserveGraph(compiled, graph=gm, config=config, not_saved=not_saved)
