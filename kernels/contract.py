"""The contract every provider module under ``kernels/`` fulfils, and nothing else.

A provider is one module (``aten.py``, ``triton.py``, …) that exports ``PROVIDER``. For each op
it serves it offers a checker and a kernel, split the way FlashInfer splits ``plan()`` from
``run()``:

- the checker looks at the call once and either declines, returning the reason as a string,
  or accepts, returning an ``Accept`` that carries what it decided: the path it will take and
  the rows, plan or tile that path runs;
- the kernel runs exactly that decision and never derives it again.

Kernels are the bottom of the import graph: a provider module imports neither the runtime
(ops, planner, registry, counters) nor another provider. What it needs from the runtime comes
in through the call object it is handed: the call's tensors and the analyses and plans the
runtime offers on it, each computed at most once per call and cached per shape class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from xy_inductor.kernels.attention_plan import AttentionPlan, DenseRows
from xy_inductor.kernels.gemm_plan import GemmMenu

__all__ = ["Accept", "OpKernel", "PlannedRows", "Provider"]


@dataclass(frozen=True, slots=True)
class Accept:
    """A checker's yes: how the provider will run the call, and what it decided for it."""

    path: str
    """The provider's way of running it (``sdpa``, ``rows``, ``plan``, ``linear``, …); the
    registry counts calls per provider and path in ``stats().paths``."""
    decision: Any = None
    """What the checker decided, handed unchanged to the kernel: a typed object per path (a
    ``PlannedRows``, an ``AttentionPlan``, a ``GemmTile``, a provider's own dataclass), never a
    bare tuple; None where the path needs nothing more."""


@dataclass(frozen=True, slots=True)
class PlannedRows:
    """The decision of a dense attention call run as rows of a token table (path ``rows``)."""

    rows: DenseRows
    """Each sequence's queries and keys, as recognised from the call's mask."""
    plan: AttentionPlan
    """The provider's plan of those rows."""


@dataclass(frozen=True)
class OpKernel:
    check: Callable[[Any], Accept | str]
    """Given the call, an ``Accept`` with the decision, or why the kernel cannot run it."""
    run: Callable[[Any, Accept], torch.Tensor]
    """Runs the call as its checker decided; called only with that checker's ``Accept``."""


@dataclass(frozen=True)
class Provider:
    name: str
    """Shown in ``stats()``: ``aten``, ``triton``, ``ascend``."""
    unavailable: Callable[[], str | None]
    """Why this process cannot run the provider at all (library missing, no device), or None
    when it can. Cheap and safe to call: it never raises."""
    kernels: Mapping[str, OpKernel]
    """Op name (``gemm``, ``attention``, ``attention_varlen``) to its checker and kernel."""
    prepare: Mapping[str, Callable[[Any], int]] = field(default_factory=dict)
    """Op name to what the backend calls once per weight at compile time, before the first
    request (compile the kernels that will serve it); returns the variants it compiled."""
    gemm_menu: GemmMenu | None = None
    """The GEMM tiles this provider offers the SmoothGEMM planner (``plan_gemm``); None when it
    has no GEMM kernel of its own."""
    defers_small_attention: bool = False
    """Its ``attention`` checker declines every call under ATen's ``PLANNED_MIN_SCORES``
    scores, which ATen's C++ fast path then serves as it would: the fast path may load beside
    it (``kernels/aten/native.py``)."""
