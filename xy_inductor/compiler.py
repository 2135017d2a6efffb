"""``xy_inductor.compile``: torch.compile with the xyserve backend and the settings that give
the fewest graphs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from xy_inductor.backend import make_backend
from xy_inductor.config import compile_options

__all__ = ["compile"]

F = TypeVar("F", bound=Callable)


def compile(model_or_fn: F, **options: object) -> F:
    """Compile a module or function with xyserve; ``options`` are the fields of ``XyConfig``
    (the backend's) and of ``CompileOptions`` (``dynamic``, ``fullgraph``).

    Sizes are symbolic from the first call (``dynamic=True``), so a model sees one graph per
    code path rather than one per shape. Bad options, and options only another entry point
    reads (``pack_prefill``), raise ``ValueError`` here, before tracing.
    """
    if not callable(model_or_fn):
        raise ValueError(
            f"xy_inductor.compile expects a module or function, got {type(model_or_fn).__name__}"
        )
    config, arguments = compile_options(options)
    return torch.compile(
        model_or_fn,
        backend=make_backend(config),
        dynamic=arguments.dynamic,
        fullgraph=arguments.fullgraph,
    )
