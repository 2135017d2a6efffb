"""``xy_inductor.explain`` (defined here, in ``explainer``): which attention and linear sites
xyserve lowers, and why not the others.

It traces the call with Dynamo exactly as the backend would see it and runs the lowering passes
on a copy of each graph. The call itself runs the original, unlowered graphs: no xyserve kernel
runs and nothing is compiled by Inductor.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.fx

from xy_inductor.backend import fallback_reason
from xy_inductor.config import CompileOptions, XyConfig
from xy_inductor.lowering import GraphReport, Site, lower_graph
from xy_inductor.lowering.opaque_ops import KNOWN_OPAQUE
from xy_inductor.lowering.trace_flags import install as install_trace_flags
from xy_inductor.runtime import providers
from xy_inductor.shape_guards import ShapeCheck, check_shapes

__all__ = ["ExplainReport", "explain"]


@dataclass(frozen=True)
class ExplainReport:
    graphs: int
    """Graphs Dynamo captured for the call (more than one means graph breaks)."""
    attention_total: int
    attention_lowered: int
    linear_total: int
    linear_lowered: int
    unlowered: list[tuple[str, str]]
    """(site, reason) for every site left as it was."""
    fallbacks: list[str]
    """One entry per graph that runs entirely as traced: why."""
    sites: tuple[Site, ...]
    """Every site of every graph."""
    shape_checks: tuple[ShapeCheck, ...] = ()
    """The dynamic sizes of every lowered call: GEMM M, attention Lq/Lk, with their ranges."""
    uncovered: list[str] = dataclasses.field(default_factory=list)
    """GEMMs whose M can exceed ``max_tokens`` (those calls run on the ATen fallback)."""
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """(site, reason) for the sites of ``unlowered`` left as traced because lowering them
    raised: an xyserve bug or a graph it did not foresee; the reason holds the exception."""
    providers: tuple[tuple[str, str | None], ...] = ()
    """Every kernel provider in priority order with why this process cannot use it (None when
    it can): which one will run a lowered call depends on this machine, not on the graph."""
    opaque_ops: dict[str, int] = dataclasses.field(default_factory=dict)
    """Calls of other libraries' ops, by ``namespace.op`` (vLLM's ``_C.onednn_mm`` linear
    layers, its attention and KV-cache ops...): no pass can lower them; left alone."""
    routes: str | None = None
    """For a model accelerated with ``hf.accelerate``: the routes it takes and why not the
    others (``hf.routes(model).summary()``)."""

    @classmethod
    def from_graphs(
        cls, graphs: list[GraphReport], checks: Sequence[ShapeCheck] = ()
    ) -> ExplainReport:
        sites = tuple(s for g in graphs for s in g.sites)

        def count(kind: str, lowered: bool | None = None) -> int:
            return sum(g.count(kind, lowered=lowered) for g in graphs)

        return cls(
            graphs=len(graphs),
            attention_total=count("attention"),
            attention_lowered=count("attention", True),
            linear_total=count("linear"),
            linear_lowered=count("linear", True),
            unlowered=[(s.name, s.reason or "") for s in sites if not s.lowered],
            fallbacks=[g.fallback for g in graphs if g.fallback],
            sites=sites,
            shape_checks=tuple(checks),
            uncovered=[
                f"{c.node}: M = {c.expr} in [{c.lo}, {'inf' if c.hi is None else c.hi}], "
                "NOT covered: larger M runs on ATen"
                for c in checks
                if c.covered is False
            ],
            failed=[(s.name, s.reason or "") for s in sites if s.failed],
            providers=tuple(providers.describe()),
            opaque_ops=dict(sum((g.opaque for g in graphs), Counter())),
        )

    def __str__(self) -> str:
        lines = [
            f"xyserve explain: {self.graphs} graph{'s' * (self.graphs != 1)}",
            f"  {'kind':<10} {'sites':>6} {'lowered':>8}",
            f"  {'attention':<10} {self.attention_total:>6} {self.attention_lowered:>8}",
            f"  {'linear':<10} {self.linear_total:>6} {self.linear_lowered:>8}",
        ]
        if self.routes is not None:
            lines.append(f"  hf.accelerate {self.routes}")
        if self.failed:
            lines.append(
                f"  {len(self.failed)} site{'s' * (len(self.failed) != 1)} failed to lower "
                "(xyserve error, logged); they run as traced"
            )
        for reason in self.fallbacks:
            lines.append(f"  graph run as traced: {reason}")
        if self.sites:
            # Layers repeat: fold their indices so a 32-layer model reads like a 1-layer one.
            folded = Counter(
                (s.kind, re.sub(r"\.\d+\.", ".*.", s.name), s.lowered, s.reason or "")
                for s in self.sites
            )
            width = max(len(name) for _, name, _, _ in folded)
            lines.append(f"  {'site':<{width}}  {'kind':<9} {'count':>5}  status")
            for (kind, name, lowered, reason), n in folded.items():
                if lowered:
                    status = "lowered"
                elif reason in self.fallbacks:
                    status = "left as is: its graph runs as traced (above)"
                else:
                    status = f"left as is: {reason}"
                lines.append(f"  {name:<{width}}  {kind:<9} {n:>5}  {status}")
        if self.opaque_ops:
            lines.append("  ops of other libraries (opaque to xyserve, left alone)")
            width = max(len(op) for op in self.opaque_ops)
            for op, n in sorted(self.opaque_ops.items()):
                what = KNOWN_OPAQUE.get(op, "")
                lines.append(f"    {n:>3}x {op:<{width}}  {what}".rstrip())
        if self.shape_checks:
            lines.append("  dynamic sizes (checked once at compile; never a guard)")
            folded = Counter(
                (c.op, c.size, c.expr, c.lo, c.hi, c.covered) for c in self.shape_checks
            )
            for (op, size, expr, lo, hi, covered), n in folded.items():
                span = f"[{lo}, {'inf' if hi is None else hi}]"
                status = {True: "covered by the tile plans", False: "NOT covered", None: ""}
                line = f"    {n:>3}x {op:<10} {size:<2} = {expr:<12} {span:<14} {status[covered]}"
                lines.append(line.rstrip())
        if self.providers:
            lines.append("  providers (priority order; the first that accepts a call runs it)")
            for name, why in self.providers:
                lines.append(
                    f"    {name:<8} {'available' if why is None else 'unavailable: ' + why}"
                )
        return "\n".join(lines)


def explain(model_or_fn: Callable, *args: object, **kwargs: object) -> ExplainReport:
    """Trace ``model_or_fn(*args, **kwargs)`` and report what xyserve would lower.

    A model accelerated with ``xy_inductor.hf.accelerate`` is traced the way its ``generate()``
    calls are: with its own options, size markings and masks.
    """
    if not callable(model_or_fn):
        raise ValueError(
            f"xy_inductor.explain expects a module or function, got {type(model_or_fn).__name__}"
        )
    accelerator = getattr(model_or_fn, "_xyserve_accelerator", None)
    config = accelerator.config if accelerator is not None else XyConfig()
    lowering = config.lowering_options()
    install_trace_flags()  # idempotent; traces SDPA calls with symbolic flags into the graph
    graphs: list[GraphReport] = []
    checks: list[ShapeCheck] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        reason = fallback_reason(example_inputs)
        lowered = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        graphs.append(lower_graph(lowered, lowering, skip_reason=reason))
        if reason is None:
            checks.extend(check_shapes(lowered, config.max_tokens))
        return gm.forward

    if accelerator is None:
        # Traced as xy_inductor.compile traces it by default.
        dynamic = CompileOptions().dynamic
        torch.compile(model_or_fn, backend=backend, dynamic=dynamic)(*args, **kwargs)
        return ExplainReport.from_graphs(graphs, checks)
    accelerator.trace_with(backend, args, kwargs)
    report = ExplainReport.from_graphs(graphs, checks)
    return dataclasses.replace(report, routes=accelerator.routes.summary())
