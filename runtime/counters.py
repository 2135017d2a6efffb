"""The counters the backend and the xyserve ops keep, and the functions that count.

Process-wide, like ``torch._dynamo.utils.counters``: a compiled graph can run anywhere in the
program, so the counts cannot live on one object. ``stats.py`` reads them into a ``Stats``
snapshot; it imports nothing of ours, so every part of the runtime can count.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["current", "reset"]


@dataclass
class _Counters:
    backend_compiles: int = 0
    compile_seconds: float = 0.0
    graphs_lowered: int = 0
    graphs_fallback: int = 0
    inductor_failures: int = 0
    sites_lowered: Counter = field(default_factory=Counter)  # kind -> n
    sites_unlowered: Counter = field(default_factory=Counter)  # kind -> n
    sites_failed: Counter = field(default_factory=Counter)  # kind -> n
    calls: Counter = field(default_factory=Counter)  # (op, provider, path) -> n
    declined: Counter = field(default_factory=Counter)  # (op, provider, reason) -> n
    fused_calls: int = 0
    unfused_calls: int = 0
    gemm_over_max_tokens: int = 0
    warned_over_max: set = field(default_factory=set)  # (N, K, max_tokens) warned about
    kernels_warmed: int = 0
    attention_plans_before: int = 0  # plans built before the last reset
    inductor_regions: int = 0
    inductor_regions_compiled: int = 0
    region_mismatches: int = 0
    varlen_steps: int = 0
    varlen_step_checks: int = 0
    varlen_rows: Counter = field(default_factory=Counter)  # row kind -> rows over all steps
    varlen_step_kinds: Counter = field(default_factory=Counter)  # row kind -> steps with one
    opaque_ops: Counter = field(default_factory=Counter)  # "namespace.op" -> calls in graphs
    graphs_loaded: int = 0
    artifacts_refused: Counter = field(default_factory=Counter)  # reason -> n


_COUNTERS = _Counters()


def current() -> _Counters:
    """The counters in force (replaced, never edited, by ``reset``)."""
    return _COUNTERS


def reset(attention_plans_built: int) -> None:
    """Zero every counter; ``attention_plans_built`` is the planner's count at this moment."""
    global _COUNTERS
    _COUNTERS = _Counters(attention_plans_before=attention_plans_built)


def record_compile(
    seconds: float,
    *,
    fallback: bool,
    lowered: Counter,
    unlowered: Counter,
    inductor_failed: bool,
    warmed: int = 0,
    failed: Counter | None = None,
    opaque: Counter | None = None,
) -> None:
    c = _COUNTERS
    c.opaque_ops.update(opaque or {})
    c.kernels_warmed += warmed
    c.backend_compiles += 1
    c.inductor_failures += inductor_failed
    c.compile_seconds += seconds
    if fallback:
        c.graphs_fallback += 1
    else:
        c.graphs_lowered += 1
    c.sites_lowered.update(lowered)
    c.sites_unlowered.update(unlowered)
    c.sites_failed.update(failed or {})


def record_graph_loaded(opaque: Counter | None = None) -> None:
    _COUNTERS.graphs_loaded += 1
    _COUNTERS.opaque_ops.update(opaque or {})


def record_artifact_refused(reason: str) -> None:
    _COUNTERS.artifacts_refused[reason] += 1


def record_call(op: str, provider: str, path: str) -> None:
    _COUNTERS.calls[op, provider, path] += 1


def record_fusion(*, fused: bool) -> None:
    if fused:
        _COUNTERS.fused_calls += 1
    else:
        _COUNTERS.unfused_calls += 1


def record_decline(op: str, provider: str, reason: str) -> None:
    _COUNTERS.declined[op, provider, reason] += 1


def record_over_max_tokens(m: int, n: int, k: int, max_tokens: int) -> None:
    c = _COUNTERS
    c.gemm_over_max_tokens += 1
    if (n, k, max_tokens) not in c.warned_over_max:
        c.warned_over_max.add((n, k, max_tokens))
        warnings.warn(
            f"xyserve.gemm: M={m} rows is above max_tokens={max_tokens} (N={n}, K={k}); such "
            "calls run on the ATen fallback, counted in stats().gemm_over_max_tokens. Raise "
            "the max_tokens option to plan tiles for them.",
            stacklevel=4,
        )


def record_regions(regions: int, compiled: int) -> None:
    _COUNTERS.inductor_regions += regions
    _COUNTERS.inductor_regions_compiled += compiled


def record_region_mismatch() -> None:
    _COUNTERS.region_mismatches += 1


def record_varlen_step(kinds: Counter | None = None) -> None:
    """A serving step, with its rows counted per kind (``VarlenStep.row_kinds``)."""
    _COUNTERS.varlen_steps += 1
    if kinds:
        _COUNTERS.varlen_rows.update(kinds)
        _COUNTERS.varlen_step_kinds.update(kinds.keys())


def record_varlen_step_check() -> None:
    _COUNTERS.varlen_step_checks += 1
