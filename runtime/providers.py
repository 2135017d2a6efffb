"""Which kernel runs an xyserve op: a priority-ordered list of providers.

A provider is one module under ``kernels/`` (the contract is ``kernels/contract.py``). At run
time the first available provider whose checker accepts the call runs it: the checker returns
an ``Accept`` carrying its decision, which the registry hands unchanged to that provider's
kernel, or declines with a reason, which ``stats()`` counts. ATen comes last and accepts every
call, so there is always a provider. Later providers (Triton, Ascend) go in front of it in
``PROVIDER_MODULES`` without touching the ops or their callers.

The list in force is context-local: ``use_providers`` sets it for a block in the current
thread or task (a ``ContextVar``), never for the whole process.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch

from xy_inductor.kernels.aten import native
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.kernels.gemm_plan import DEFAULT_MAX_TOKENS, GemmPlan
from xy_inductor.kernels.gemm_plan import plan_gemm as _plan_gemm
from xy_inductor.runtime import counters

__all__ = [
    "PROVIDER_MODULES",
    "Accept",
    "OpKernel",
    "Provider",
    "active_providers",
    "choose",
    "default",
    "describe",
    "only_aten_serves",
    "plan_gemm",
    "prepare",
    "run",
    "use_providers",
]

# Priority order. Heavy imports of a provider stay inside its module, behind `unavailable()`.
PROVIDER_MODULES: tuple[str, ...] = (
    "xy_inductor.kernels.ascend",
    "xy_inductor.kernels.triton",
    "xy_inductor.kernels.cpu",
    "xy_inductor.kernels.aten",
)

_override: ContextVar[tuple[Provider, ...] | None] = ContextVar("xyserve_providers", default=None)


def _listed() -> tuple[Provider, ...]:
    """The provider of every module in ``PROVIDER_MODULES``, in order, available or not."""
    return tuple(importlib.import_module(name).PROVIDER for name in PROVIDER_MODULES)


@functools.cache
def default() -> tuple[Provider, ...]:
    """Every available provider of ``PROVIDER_MODULES``, in order: the process's list, loaded
    once."""
    return tuple(p for p in _listed() if p.unavailable() is None)


def active_providers() -> tuple[Provider, ...]:
    """The providers that will be tried, in order: those set by ``use_providers`` in this
    context, else ``default()``."""
    override = _override.get()
    return override if override is not None else default()


def describe() -> list[tuple[str, str | None]]:
    """Every provider of ``PROVIDER_MODULES`` in priority order, with why this process cannot
    use it (None when it can)."""
    return [(p.name, p.unavailable()) for p in _listed()]


def only_aten_serves(op: str) -> bool:
    """Whether ATen is the only active provider implementing ``op``: then the op runs the very
    kernel the code it replaced ran, and under Inductor it is better left to Inductor."""
    return all(p.name == "aten" for p in active_providers() if op in p.kernels)


@contextlib.contextmanager
def use_providers(providers: Sequence[Provider]) -> Iterator[None]:
    """Run xyserve ops with this provider list (in this order) inside the block; the setting
    belongs to the current context (thread or async task) only."""
    if not providers:
        raise ValueError("use_providers: expected at least one Provider, got an empty list")
    for p in providers:
        if not isinstance(p, Provider):
            raise ValueError(f"use_providers: expected Provider objects, got {type(p).__name__}")
    token = _override.set(tuple(providers))
    native.note_override(+1)  # the C++ kernels leave every call to this list while it is set
    try:
        yield
    finally:
        native.note_override(-1)
        _override.reset(token)


def choose(op: str, call: object) -> tuple[str, OpKernel, Accept]:
    """The provider that runs ``op`` on ``call`` (a ``kernels.calls`` object): the first whose
    checker accepts it, with that kernel and the checker's decision; declines are counted."""
    declined = []
    for provider in active_providers():
        kernel = provider.kernels.get(op)
        if kernel is None:
            continue
        decision = kernel.check(call)
        if type(decision) is Accept:
            return provider.name, kernel, decision
        if not isinstance(decision, str):
            raise TypeError(
                f"xyserve.{op}: the {provider.name} provider's checker returned {decision!r}; "
                "a checker returns an Accept or the reason it declines (a str)"
            )
        counters.record_decline(op, provider.name, decision)
        declined.append(f"{provider.name}: {decision}")
    raise RuntimeError(
        f"xyserve.{op}: no provider accepted the call"
        + (f" ({'; '.join(declined)})" if declined else " (no provider implements it)")
        + "; the ATen provider (xy_inductor.kernels.aten) should be last in the list"
    )


def run(op: str, call: object) -> torch.Tensor:
    """Run ``op`` on ``call`` (a ``kernels.calls`` object) with the first provider whose checker
    accepts it, as that checker decided."""
    name, kernel, decision = choose(op, call)
    counters.record_call(op, name, decision.path)
    return kernel.run(call, decision)


def prepare(op: str, what: object) -> int:
    """Let every active provider prepare for ``op`` (see ``Provider.prepare``); ``what`` is a
    ``kernels.calls`` object (``GemmWeight`` for ``gemm``). Returns the kernel variants
    compiled."""
    return sum(p.prepare[op](what) for p in active_providers() if op in p.prepare)


def plan_gemm(
    n: int,
    k: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    provider: str = "triton",
) -> GemmPlan:
    """The SmoothGEMM tile plan of ``provider``'s menu for ``x [M, k] @ weight [n, k]ᵀ`` over
    M = 1…``max_tokens``: ``print(plan_gemm(4096, 4096))`` shows which tile serves which M.
    Cached: the same arguments return the same plan object."""
    menus = {p.name: p.gemm_menu for p in _listed() if p.gemm_menu is not None}
    if provider not in menus:
        raise ValueError(f"plan_gemm: provider must be one of {sorted(menus)}, got {provider!r}")
    return _plan_gemm(n, k, menu=menus[provider], dtype=dtype, max_tokens=max_tokens)
