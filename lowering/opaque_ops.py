"""Ops of other libraries in a graph: left alone by every pass, counted by name.

A graph traced inside vLLM holds vLLM's own ops where a plain PyTorch model has ``F.linear`` and
SDPA: on the CPU platform a linear layer is ``torch.ops._C.onednn_mm`` with its weight packed in
a oneDNN handle, attention is ``torch.ops.vllm.unified_attention_with_output``. No pass can lower
them (their inputs are not the tensors a GEMM or an attention reads), and reporting "0 linear
sites" for such a graph would hide why nothing was lowered. So ``explain`` and ``stats()`` list
every op outside ATen, prims and xyserve by its qualified name, with what it is when known.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.fx

__all__ = ["KNOWN_OPAQUE", "opaque_ops"]

# Namespaces whose ops the passes read or produce, or that are plain tensor ops.
_OWN_NAMESPACES = frozenset({"aten", "prims", "xyserve"})

# vLLM's ops (vllm/model_executor/layers/*, vllm/attention/layer.py; names as in vLLM 0.32).
KNOWN_OPAQUE: dict[str, str] = {
    "_C.onednn_mm": (
        "vLLM's CPU linear layer: the weight is packed in a oneDNN handle, not a graph tensor, "
        "so it cannot become xyserve.gemm (on CUDA vLLM's linear layers are F.linear, lowered)"
    ),
    "_C.onednn_scaled_mm": "vLLM's CPU quantized linear layer (weight in a oneDNN handle)",
    "vllm.unified_attention_with_output": (
        "vLLM's attention layer: it runs the attention backend vLLM selected (select CUSTOM "
        "for xyserve's meta-attention)"
    ),
    "vllm.unified_attention": "vLLM's attention layer (the attention backend vLLM selected)",
    "vllm.unified_kv_cache_update": "vLLM's KV-cache write (the attention backend's layout)",
    "_C.rotary_embedding": "vLLM's rotary position embedding kernel",
    "_C.rms_norm": "vLLM's RMSNorm kernel",
    "_C.fused_add_rms_norm": "vLLM's fused residual add + RMSNorm kernel",
    "_C.silu_and_mul": "vLLM's SiLU-and-multiply kernel",
}


def _qualified_name(target: object) -> str | None:
    """``namespace.op`` of a torch op (overload or packet) outside our namespaces, else None."""
    if isinstance(target, torch._ops.OpOverload):
        packet = target.overloadpacket
    elif isinstance(target, torch._ops.OpOverloadPacket):
        packet = target
    else:
        return None
    namespace, _, name = packet._qualified_op_name.partition("::")
    if namespace in _OWN_NAMESPACES:
        return None
    return f"{namespace}.{name}"


def opaque_ops(gm: torch.fx.GraphModule) -> Counter:
    """How many times each op of another library (``namespace.op``) is called in ``gm``."""
    found: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = _qualified_name(node.target)
            if name is not None:
                found[name] += 1
    return found
