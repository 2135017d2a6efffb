"""xy-inductor: ``xyserve``, a torch.compile backend for LLM inference under dynamic shapes.

    torch.compile(model, backend="xyserve")        # after pip install
    xy_inductor.compile(model, inductor=True)      # the same, fewest graphs
    xy_inductor.hf.accelerate(hf_model)            # generate() with no recompiles
    xy_inductor.explain(model, *args)              # which sites are lowered, and why not
    xy_inductor.stats()                            # compiles, calls per op and provider
    xy_inductor.plan_gemm(4096, 4096)              # which GEMM tile serves which M

Importing it registers ``torch.ops.xyserve.gemm`` and ``torch.ops.xyserve.attention``; the
Hugging Face integration (``xy_inductor.hf``) imports transformers only when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from xy_inductor import runtime  # registers torch.ops.xyserve.*
from xy_inductor.compiler import compile
from xy_inductor.config import AccelerateOptions, CompileOptions, XyConfig
from xy_inductor.explain import ExplainReport, explain
from xy_inductor.runtime.gemm_plan import plan_gemm
from xy_inductor.runtime.stats import Stats, reset_stats, stats

if TYPE_CHECKING:
    from xy_inductor import hf

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
    if name == "hf":
        return importlib.import_module("xy_inductor.hf")
    raise AttributeError(f"module 'xy_inductor' has no attribute {name!r}")
