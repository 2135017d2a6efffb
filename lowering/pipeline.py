"""The ordered list of lowering passes, one option flag each, and the function that runs it.

Order matters: attention is lowered before linear layers, so that later passes that look at
both (horizontal fusion of the q/k/v projections) see the final attention ops.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field

import torch.fx

from xy_inductor.lowering.fuse_siblings import FuseSiblingGemms
from xy_inductor.lowering.linear_to_gemm import LinearToGemm
from xy_inductor.lowering.manual_attention import ManualAttention
from xy_inductor.lowering.opaque_ops import opaque_ops
from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.pass_base import LoweringPass, Site
from xy_inductor.lowering.sdpa_to_attention import SdpaToAttention
from xy_inductor.runtime import providers

__all__ = [
    "LEFT_TO_INDUCTOR",
    "PASSES",
    "GraphReport",
    "gemms_left_to_inductor",
    "lower_graph",
    "pipeline_uuid",
]

log = logging.getLogger("xy_inductor")

# (LoweringOptions flag that enables the pass, pass class), in the order they run. The SDPA pass
# comes first: it counts every xyserve.attention node as a lowered site, so attention that the
# manual pass lowers afterwards is counted once (and again, once, on a second run).
PASSES: tuple[tuple[str, type[LoweringPass]], ...] = (
    ("lower_attention", SdpaToAttention),
    ("lower_manual_attention", ManualAttention),
    ("lower_linear", LinearToGemm),
    ("fuse_siblings", FuseSiblingGemms),  # after linear_to_gemm: it groups gemm nodes
)

# Passes whose ops only ATen may serve in a process (no GPU, no NPU): with inductor=True they
# do not run, because Inductor's code calls the same ATen kernel (extern mm) directly, while the
# op costs a dispatch into Python on every call (benchmarks/op_overhead.py).
_GEMM_PASSES = ("lower_linear", "fuse_siblings")
LEFT_TO_INDUCTOR = (
    "left to Inductor (inductor=True and no GEMM provider but ATen in this process: Inductor "
    "calls the same kernel, without the op's dispatch)"
)


def gemms_left_to_inductor(options: LoweringOptions) -> bool:
    """Whether the GEMM passes stand down for these options in this process (see above)."""
    return options.inductor and providers.only_aten_serves("gemm")


@dataclass(frozen=True)
class GraphReport:
    """What the lowering did to one graph."""

    sites: tuple[Site, ...]
    """Every site the passes recognised, lowered or not."""
    matches: dict[str, int]
    """Sites each pass rewrote in this run, by pass name."""
    fallback: str | None = None
    """Set when the whole graph was left as traced: why."""
    opaque: Counter = field(default_factory=Counter)
    """Calls of other libraries' ops (``namespace.op``: vLLM's ``_C.onednn_mm``...), which no
    pass can read and every pass leaves alone (``opaque_ops.py``)."""

    def count(self, kind: str, *, lowered: bool | None = None) -> int:
        return sum(s.kind == kind and (lowered is None or s.lowered == lowered) for s in self.sites)

    def by_kind(self, *, lowered: bool) -> Counter:
        return Counter(s.kind for s in self.sites if s.lowered == lowered)

    def failed_by_kind(self) -> Counter:
        """Sites left as traced because matching or rewriting them raised, per kind."""
        return Counter(s.kind for s in self.sites if s.failed)


def lower_graph(
    gm: torch.fx.GraphModule, options: LoweringOptions, *, skip_reason: str | None = None
) -> GraphReport:
    """Run the enabled passes on ``gm`` in place. With ``skip_reason``, only list the sites.

    Each pass contains failures per site (``pass_base``). Should a pass still raise (its final
    graph check, say), the graph is restored to what Dynamo traced and runs as traced, its
    sites listed with the exception as the reason: lowering never fails a compile.
    """
    if not isinstance(options, LoweringOptions):
        raise TypeError(
            "lower_graph takes LoweringOptions (the front end builds them with "
            f"XyConfig.lowering_options()), got {type(options).__name__}"
        )
    if skip_reason is not None:
        return _run_passes(gm, options, skip_reason)
    original = copy.deepcopy(gm.graph)
    try:
        return _run_passes(gm, options, None)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        reason = (
            f"xyserve error while lowering this graph, run as traced: {type(e).__name__}: {text}"
        ).rstrip(": ")
        log.warning("xyserve: %s", reason)
        log.debug("xyserve: traceback of the failure above", exc_info=e)
        gm.graph = original
        gm.recompile()
        listed = _run_passes(gm, options, reason)
        failed = tuple(
            Site(s.kind, s.name, False, reason, s.pass_name, failed=True) for s in listed.sites
        )
        return GraphReport(failed, listed.matches, reason, listed.opaque)


def _run_passes(
    gm: torch.fx.GraphModule, options: LoweringOptions, skip_reason: str | None
) -> GraphReport:
    opaque = opaque_ops(gm)
    sites: list[Site] = []
    matches: dict[str, int] = {}
    to_inductor = gemms_left_to_inductor(options)
    for flag, pass_cls in PASSES:
        lowering_pass = pass_cls(options)
        reason = skip_reason or (
            None if getattr(options, flag) else f"disabled by option {flag}=False"
        )
        if reason is None and to_inductor and flag in _GEMM_PASSES:
            reason = LEFT_TO_INDUCTOR
        sites += lowering_pass(gm, skip_reason=reason)
        matches[lowering_pass.name] = lowering_pass.matched
    return GraphReport(tuple(sites), matches, skip_reason, opaque)


def pipeline_uuid(options: LoweringOptions) -> str:
    """Identifies the enabled passes, their code and options, for caches of compiled graphs."""
    parts = [f"{flag}:{cls(options).uuid()}" for flag, cls in PASSES if getattr(options, flag)]
    to_inductor = gemms_left_to_inductor(options)
    parts.append(f"inductor:{options.inductor}:gemms-to-inductor:{to_inductor}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
