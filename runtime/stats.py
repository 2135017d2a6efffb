"""``xy_inductor.stats()``: a snapshot of what the backend and the xyserve ops counted
(``counters.py``), with the providers this process can use and whether ATen's C++ fast path
serves it. ``reset_stats()`` zeroes the counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from xy_inductor.kernels.aten import native
from xy_inductor.kernels.attention_plan import plans_built
from xy_inductor.runtime import counters, providers

__all__ = ["Stats", "reset_stats", "stats"]


@dataclass(frozen=True)
class Stats:
    """A snapshot of the counters at the time ``stats()`` was called."""

    backend_compiles: int
    """Graphs Dynamo handed to the xyserve backend (one per compile or recompile)."""
    compile_seconds: float
    """Wall time spent inside the backend: lowering, plus Inductor when ``inductor=True``."""
    graphs_lowered: int
    """Graphs that went through the lowering passes."""
    graphs_fallback: int
    """Graphs run exactly as traced, unlowered (e.g. they needed gradients)."""
    inductor_failures: int
    """Graphs Inductor failed on (``inductor=True``); they run lowered, without Inductor."""
    sites_lowered: dict[str, int]
    """Sites rewritten into xyserve ops, per kind (``attention``, ``linear``)."""
    sites_unlowered: dict[str, int]
    """Sites left as they were, per kind; ``xy_inductor.explain`` says why."""
    sites_failed: dict[str, int]
    """Of those, sites left as they were because lowering them raised (an xyserve bug or a
    graph it did not foresee; logged, and ``xy_inductor.explain`` shows the exception)."""
    calls: dict[str, dict[str, int]]
    """Run-time calls per op, then per provider that ran them."""
    paths: dict[str, dict[str, int]]
    """Run-time calls per op, then per ``provider/path``: the way the provider's checker
    decided to run them (``aten/sdpa``, ``aten/rows``, ``aten/plan``, ``triton/smoothgemm``…)."""
    declined: dict[str, dict[str, int]]
    """Per op, per ``provider: reason``: how often a provider's checker declined a call."""
    fused_calls: int
    """``gemm_fused`` calls that ran as one GEMM over weights laid out in one buffer."""
    unfused_calls: int
    """``gemm_fused`` calls whose weights were not (any more) in one buffer: one GEMM each."""
    gemm_over_max_tokens: int
    """GEMM calls with more rows (M) than ``max_tokens``: served by the ATen fallback."""
    kernels_warmed: int
    """Kernel variants compiled before the first request (a tile menu's entries per GEMM)."""
    attention_plans: int
    """Meta-attention plans built (token table → task table). Plans are cached per shape
    class, so every layer of a step, and decode steps of one class, share one."""
    inductor_regions: int
    """``inductor=True``: regions (repeated blocks, and what comes before and after them) the
    graphs were cut into."""
    inductor_regions_compiled: int
    """Of those, how many Inductor compiled; the rest reused an identical region's code."""
    region_mismatches: int
    """Calls of a region reusing another's code whose inputs were not shaped as the other's
    were: they ran the region as traced (slower, never wrong)."""
    providers: dict[str, str | None]
    """Every provider in priority order, with why this process cannot use it (None: it can)."""
    native_kernels: str | None
    """Why ATen's C++ CPU kernels of ``gemm`` and ``attention`` (``kernels/aten/native.py``) do not
    serve this process's CPU calls of those ops, or None when they do."""
    varlen_steps: int
    """Serving steps of ``attention_varlen`` (``runtime.serving.VarlenStep``): a token table
    read on the host once and run by every attention layer of the step."""
    varlen_step_checks: int
    """Provider choices those steps made (checkers run, plan looked up): one per step and
    layer signature; the other layers of the step run the same decision."""
    varlen_rows: dict[str, int]
    """Rows of those steps per kind (``VarlenStep.row_kinds``): ``prefill`` (no cached keys),
    ``chunk`` (queries after cached keys: a later chunk or a prefix-cache hit), ``decode`` (one
    query), ``verify`` (a speculative-decoding request checking its drafts), ``tree`` (a verify
    row whose drafts form a tree: a tree mask)."""
    varlen_step_kinds: dict[str, int]
    """Per row kind, the steps that had at least one such row."""
    opaque_ops: dict[str, int]
    """Calls of other libraries' ops in the lowered graphs, by ``namespace.op`` (vLLM's
    ``_C.onednn_mm``, ``vllm.unified_attention_with_output``...): left alone, never lowered."""
    graphs_loaded: int
    """Lowered graphs loaded from a compile cache (vLLM's, or ``torch.compiler``'s
    ``load_compiled_function``) instead of lowered again."""
    artifacts_refused: dict[str, int]
    """Saved graphs not loaded, by reason (written by another xyserve, torch, pass list or
    options): the caller compiles them again."""

    def __str__(self) -> str:
        usable = ", ".join(
            name if why is None else f"{name} (no: {why})" for name, why in self.providers.items()
        )
        lines = [
            f"backend compiles  {self.backend_compiles}  ({self.compile_seconds:.2f} s in backend)",
            f"graphs            {self.graphs_lowered} lowered, "
            f"{self.graphs_fallback} run as traced",
            f"providers         {usable}",
            "C++ kernels       "
            + ("loaded" if self.native_kernels is None else f"no: {self.native_kernels}"),
        ]
        if self.inductor_failures:
            lines.append(f"inductor failures {self.inductor_failures} (ran lowered, no Inductor)")
        for kind in sorted(set(self.sites_lowered) | set(self.sites_unlowered)):
            lo, un = self.sites_lowered.get(kind, 0), self.sites_unlowered.get(kind, 0)
            lines.append(f"{kind + ' sites':<17} {lo} lowered, {un} left as they were")
        if self.sites_failed:
            failed = ", ".join(f"{k}: {n}" for k, n in sorted(self.sites_failed.items()))
            lines.append(f"sites failed      {failed} (lowering raised; run as traced)")
        for op, per_path in sorted(self.paths.items()):
            calls = ", ".join(f"{p}: {n}" for p, n in sorted(per_path.items()))
            lines.append(f"xyserve.{op:<16} {calls}")
        if self.fused_calls or self.unfused_calls:
            lines.append(
                f"sibling gemms     {self.fused_calls} fused, {self.unfused_calls} run one by one"
            )
        if self.gemm_over_max_tokens:
            lines.append(f"gemm over max_tokens {self.gemm_over_max_tokens} calls (ATen fallback)")
        if self.attention_plans:
            lines.append(f"attention plans   {self.attention_plans} built")
        if self.inductor_regions:
            lines.append(
                f"inductor regions  {self.inductor_regions} "
                f"({self.inductor_regions_compiled} compiled, the rest reused)"
            )
        if self.region_mismatches:
            lines.append(
                f"region mismatches {self.region_mismatches} calls ran their region as traced"
            )
        if self.varlen_steps:
            lines.append(
                f"serving steps     {self.varlen_steps} "
                f"({self.varlen_step_checks} provider choices)"
            )
        if self.varlen_rows:
            rows = ", ".join(
                f"{kind} {n} (in {self.varlen_step_kinds.get(kind, 0)} steps)"
                for kind, n in sorted(self.varlen_rows.items())
            )
            lines.append(f"serving rows      {rows}")
        if self.graphs_loaded or self.artifacts_refused:
            refused = sum(self.artifacts_refused.values())
            lines.append(
                f"compile cache     {self.graphs_loaded} graphs loaded, {refused} refused (stale)"
            )
        for op, n in sorted(self.opaque_ops.items()):
            lines.append(f"other library op  {op}: {n} calls, left alone")
        if self.kernels_warmed:
            lines.append(f"kernels warmed    {self.kernels_warmed} before the first request")
        for op, per_reason in sorted(self.declined.items()):
            for why, n in sorted(per_reason.items()):
                lines.append(f"xyserve.{op:<16} declined {n}x by {why}")
        return "\n".join(lines)


def stats() -> Stats:
    """Backend compiles, lowered and fallback graphs, calls per op and provider."""
    c = counters.current()
    calls: dict[str, dict[str, int]] = {}
    paths: dict[str, dict[str, int]] = {}
    counted = Counter(c.calls)
    counted.update(native.calls())  # calls the C++ kernels ran (native.py)
    for (op, provider, path), n in counted.items():
        per_provider = calls.setdefault(op, {})
        per_provider[provider] = per_provider.get(provider, 0) + n
        paths.setdefault(op, {})[f"{provider}/{path}"] = n
    declined: dict[str, dict[str, int]] = {}
    for (op, provider, reason), n in c.declined.items():
        declined.setdefault(op, {})[f"{provider}: {reason}"] = n
    return Stats(
        backend_compiles=c.backend_compiles,
        compile_seconds=c.compile_seconds,
        graphs_lowered=c.graphs_lowered,
        graphs_fallback=c.graphs_fallback,
        inductor_failures=c.inductor_failures,
        sites_lowered=dict(c.sites_lowered),
        sites_unlowered=dict(c.sites_unlowered),
        sites_failed=dict(c.sites_failed),
        calls=calls,
        paths=paths,
        declined=declined,
        fused_calls=c.fused_calls,
        unfused_calls=c.unfused_calls,
        gemm_over_max_tokens=c.gemm_over_max_tokens,
        kernels_warmed=c.kernels_warmed,
        attention_plans=plans_built() - c.attention_plans_before,
        inductor_regions=c.inductor_regions,
        inductor_regions_compiled=c.inductor_regions_compiled,
        region_mismatches=c.region_mismatches,
        providers=dict(providers.describe()),
        native_kernels=native.status(),
        varlen_steps=c.varlen_steps,
        varlen_step_checks=c.varlen_step_checks,
        varlen_rows=dict(c.varlen_rows),
        varlen_step_kinds=dict(c.varlen_step_kinds),
        opaque_ops=dict(c.opaque_ops),
        graphs_loaded=c.graphs_loaded,
        artifacts_refused=dict(c.artifacts_refused),
    )


def reset_stats() -> None:
    """Zero every counter."""
    counters.reset(plans_built())
    native.reset_calls()
