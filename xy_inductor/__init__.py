"""xy-inductor: ``xyserve``, a torch.compile backend for LLM inference under dynamic shapes.

    torch.compile(model, backend="xyserve")        # after pip install
    xy_inductor.compile(model, inductor=True)      # the same, fewest graphs
    xy_inductor.hf.accelerate(hf_model)            # generate() with no recompiles
    xy_inductor.explain(model, *args)              # which sites are lowered, and why not
    xy_inductor.stats()                            # compiles, calls per op and provider
    xy_inductor.plan_gemm(4096, 4096)              # which GEMM tile serves which M

Importing it registers the ``torch.ops.xyserve`` ops (``xy_inductor.runtime``). The front
end's names (``compile``, ``XyConfig``, ``explain``, ``hf``) load on first use, so that
importing a lower layer (``xy_inductor.kernels.aten``, ``xy_inductor.lowering``) never runs
the front end, and ``xy_inductor.hf`` imports transformers only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from xy_inductor import runtime  # registers torch.ops.xyserve.*
from xy_inductor.runtime.providers import plan_gemm
from xy_inductor.runtime.stats import Stats, reset_stats, stats

if TYPE_CHECKING:
    from xy_inductor import hf
    from xy_inductor.compiler import compile
    from xy_inductor.config import AccelerateOptions, CompileOptions, XyConfig
    from xy_inductor.explainer import ExplainReport, explain

# Public name -> (module, attribute or None for the module itself), imported on first access.
_FRONT_END = {
    "compile": ("xy_inductor.compiler", "compile"),
    "XyConfig": ("xy_inductor.config", "XyConfig"),
    "CompileOptions": ("xy_inductor.config", "CompileOptions"),
    "AccelerateOptions": ("xy_inductor.config", "AccelerateOptions"),
    "explain": ("xy_inductor.explainer", "explain"),
    "ExplainReport": ("xy_inductor.explainer", "ExplainReport"),
    "hf": ("xy_inductor.hf", None),
}

__all__ = [
    "AccelerateOptions",
    "CompileOptions",
    "ExplainReport",
    "Stats",
    "XyConfig",
    "compile",
    "explain",
    "hf",
    "plan_gemm",
    "reset_stats",
    "runtime",
    "stats",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    if name not in _FRONT_END:
        raise AttributeError(f"module 'xy_inductor' has no attribute {name!r}")
    module, attribute = _FRONT_END[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)
