"""F.scaled_dot_product_attention -> torch.ops.xyserve.attention.

Every argument form of the SDPA call lowers: bool or additive masks (broadcast over batch and
heads), ``is_causal``, an explicit ``scale`` (also one known only at run time), ``enable_gqa``
with fewer KV heads. Seen in Hugging Face's ``sdpa`` attention (Llama, Qwen2, Mistral, Phi-3,
Gemma, GPT-2) and in models that call SDPA directly. K and V repeated to the query's head count
first (``repeat_kv``, which Hugging Face's SDPA path does whenever it has a mask) are read
un-repeated: the op is grouped-query native. ``enable_gqa``/``is_causal`` computed from
symbolic sizes (``q.shape[1] != k.shape[1]`` under ``dynamic=True``) are decided while tracing
(``trace_flags.py``), so such calls are sites too. Left alone, with the reason: dropout, flags
only known at run time, a keyword it does not know, tensors that are not ``[B, H, L, D]``,
mixed dtypes or devices. A use of the output that needs eager's memory layout (``.view``) gets
a contiguous copy.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.pass_base import LoweringPass, fake_value
from xy_inductor.lowering.patterns import (
    make_node,
    mask_broadcast_problem,
    needs_original_strides,
    unrepeat_kv,
)
from xy_inductor.lowering.signatures import bind

__all__ = ["SdpaToAttention"]

SDPA = torch._C._nn.scaled_dot_product_attention
_READS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class SdpaToAttention(LoweringPass):
    name = "sdpa_to_attention"
    kind = "attention"
    target = SDPA

    def lowered_op(self) -> object:
        return torch.ops.xyserve.attention.default

    def is_lowered(self, node: torch.fx.Node) -> bool:
        # Attention already in an xyserve op, whoever put it there (the Hugging Face
        # integration calls attention_packed for packed prefills): one lowered site each.
        ops = torch.ops.xyserve
        done = (ops.attention.default, ops.attention_packed.default, ops.attention_varlen.default)
        return node.op == "call_function" and node.target in done

    def why_not(self, node: torch.fx.Node) -> str | None:
        a = bind(node)
        refused = a.refuse(*_READS)
        if refused is not None:
            return refused
        q, k, v = (fake_value(a[n]) for n in ("query", "key", "value"))
        if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
            return "query/key/value carry no traced tensor value"
        for const in ("dropout_p", "is_causal", "enable_gqa"):
            if isinstance(a[const], torch.fx.Node):
                return f"{const} is only known at run time; xyserve.attention needs a constant"
        # A scale may be a run-time float (dynamic=True traces a module's float attribute as a
        # 0-d tensor and .item()): it is passed through, the op only needs it when it runs.
        scale = fake_value(a["scale"])
        if scale is not None and not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
            return f"scale is a {type(scale).__name__}; xyserve.attention takes a float"
        if a["dropout_p"] != 0:
            return f"dropout_p={a['dropout_p']}: xyserve.attention has no dropout (inference only)"
        if (q.dim(), k.dim(), v.dim()) != (4, 4, 4):
            return (
                f"query/key/value are {q.dim()}/{k.dim()}/{v.dim()}-D; "
                "xyserve.attention takes [B, H, L, D]"
            )
        if not (q.dtype == k.dtype == v.dtype):
            return f"dtypes differ: query {q.dtype}, key {k.dtype}, value {v.dtype}"
        if not q.dtype.is_floating_point:
            return f"{q.dtype} attention: xyserve.attention is for floating point"
        if not (q.device == k.device == v.device):
            return f"devices differ: query {q.device}, key {k.device}, value {v.device}"
        # Head counts may be symbols (dynamic=True on raw q/k/v inputs): decide only what is
        # provable without adding a guard, and leave the rest alone.
        hq, hkv, hv = q.shape[1], k.shape[1], v.shape[1]
        if not statically_known_true(hkv == hv):
            return f"key has {hkv} heads, value {hv}: not provably equal"
        if not statically_known_true(hq == hkv):
            if not a["enable_gqa"]:
                return f"query has {hq} heads, key {hkv}, and enable_gqa=False"
            if not statically_known_true(hq % hkv == 0):
                return f"query heads ({hq}) are not provably a multiple of key/value heads ({hkv})"
        mask = fake_value(a["attn_mask"])
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                return "attn_mask carries no traced tensor value"
            if a["is_causal"]:
                return "both attn_mask and is_causal=True are given"
            if mask.dtype != torch.bool and mask.dtype != q.dtype:
                return f"attn_mask is {mask.dtype}: xyserve.attention takes bool or {q.dtype}"
            if mask.dim() > 4:
                return f"attn_mask is {mask.dim()}-D; at most 4 dims broadcast to [B, H, Lq, Lk]"
            if mask.device != q.device:
                return f"attn_mask is on {mask.device}, query on {q.device}"
            problem = mask_broadcast_problem(mask, (q.shape[0], hq, q.shape[2], k.shape[2]))
            if problem is not None:
                return problem
        return None

    def _unrepeated(self, node: torch.fx.Node) -> tuple[object, object, list[torch.fx.Node]]:
        """K and V as the op should read them: the un-repeated tensors when both are repeats
        of the same count, else as they are."""
        a = bind(node)
        k, v = unrepeat_kv(a["key"]), unrepeat_kv(a["value"])
        if k is None or v is None or k[1] != v[1]:
            return a["key"], a["value"], []
        return k[0], v[0], k[2] + v[2]

    def replacement(self, node: torch.fx.Node) -> torch.fx.Node:
        a = bind(node)
        scale = a["scale"]
        if isinstance(scale, int):
            scale = float(scale)  # the op's schema says float
        key, value, _ = self._unrepeated(node)
        args = (a["query"], key, value, a["attn_mask"], bool(a["is_causal"]), scale)
        out = make_node(node.graph, "call_function", self.lowered_op(), args)
        if needs_original_strides(node):
            out = make_node(node.graph, "call_method", "contiguous", (out,))
        return out

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return self._unrepeated(node)[2]
