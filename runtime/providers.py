"""Which kernel runs an xyserve op: a priority-ordered list of providers.

A provider (one module under ``kernels/``) offers, per op, a checker and a kernel. At run time
the first available provider whose checker accepts the call runs it; a checker declines by
returning the reason as a string, which ``stats()`` counts. ATen comes last and accepts every
call, so there is always a provider. Later providers (Triton, Ascend) go in front of it in
``PROVIDER_MODULES`` without touching the ops or their callers.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from xy_inductor.runtime import stats as _stats

__all__ = [
    "PROVIDER_MODULES",
    "OpKernel",
    "Provider",
    "accept_all",
    "active_providers",
    "prepare",
    "run",
    "use_providers",
]

# Priority order. Heavy imports of a provider stay inside its module, behind `available()`.
PROVIDER_MODULES: tuple[str, ...] = ("xy_inductor.kernels.triton", "xy_inductor.kernels.cpu")


def accept_all(*args: object) -> str | None:
    """A checker that accepts every call."""
    return None


@dataclass(frozen=True)
class OpKernel:
    check: Callable[..., str | None]
    """Returns None to accept the call, or why the kernel cannot run it."""
    run: Callable[..., torch.Tensor]
    """Computes the op; called only after ``check`` accepted the same arguments."""


@dataclass(frozen=True)
class Provider:
    name: str
    """Shown in ``stats()``: ``aten``, ``triton``, ``ascend``."""
    available: Callable[[], bool]
    """Whether this process can run the provider at all (library installed, device present)."""
    kernels: Mapping[str, OpKernel]
    """Op name (``gemm``, ``attention``) to its checker and kernel."""
    prepare: Mapping[str, Callable[..., int]] = field(default_factory=dict)
    """Op name to what the backend calls once per weight at compile time, before the first
    request (compile the kernels that will serve it); returns the variants it compiled."""


_active: tuple[Provider, ...] | None = None


def _load(module_names: Sequence[str]) -> tuple[Provider, ...]:
    providers = []
    for name in module_names:
        provider = importlib.import_module(name).PROVIDER
        if provider.available():
            providers.append(provider)
    return tuple(providers)


def active_providers() -> tuple[Provider, ...]:
    """The providers that will be tried, in order (loaded on first use)."""
    global _active
    if _active is None:
        _active = _load(PROVIDER_MODULES)
    return _active


@contextlib.contextmanager
def use_providers(providers: Sequence[Provider]) -> Iterator[None]:
    """Run xyserve ops with this provider list (in this order) inside the block."""
    global _active
    if not providers:
        raise ValueError("use_providers: expected at least one Provider, got an empty list")
    for p in providers:
        if not isinstance(p, Provider):
            raise ValueError(f"use_providers: expected Provider objects, got {type(p).__name__}")
    saved = _active
    _active = tuple(providers)
    try:
        yield
    finally:
        _active = saved


def run(op: str, *args: object) -> torch.Tensor:
    """Run ``op`` with the first provider whose checker accepts ``args``."""
    declined = []
    for provider in active_providers():
        kernel = provider.kernels.get(op)
        if kernel is None:
            continue
        reason = kernel.check(*args)
        if reason is None:
            _stats.record_call(op, provider.name)
            return kernel.run(*args)
        _stats.record_decline(op, provider.name, reason)
        declined.append(f"{provider.name}: {reason}")
    raise RuntimeError(
        f"xyserve.{op}: no provider accepted the call"
        + (f" ({'; '.join(declined)})" if declined else " (no provider implements it)")
        + "; the ATen provider (xy_inductor.kernels.cpu) should be last in the list"
    )


def prepare(op: str, *args: object, **kwargs: object) -> int:
    """Let every active provider prepare for ``op`` with these arguments (see
    ``Provider.prepare``); returns the kernel variants compiled."""
    return sum(p.prepare[op](*args, **kwargs) for p in active_providers() if op in p.prepare)
