"""F.linear -> torch.ops.xyserve.gemm.

Every ``nn.Linear`` traces to ``F.linear`` under Dynamo, with or without bias: the q/k/v/o
projections, MLPs and ``lm_head`` of Llama-style models. Left alone, with the reason: weights
that are not ``[N, K]``, mixed dtypes or devices, integer inputs.
"""

from __future__ import annotations

import torch
import torch.fx

from xy_inductor.lowering.pass_base import LoweringPass, bind, fake_value

__all__ = ["LinearToGemm"]

LINEAR = torch._C._nn.linear
_PARAMS = ("input", "weight", "bias")
_DEFAULTS = {"bias": None}


class LinearToGemm(LoweringPass):
    name = "linear_to_gemm"
    kind = "linear"
    target = LINEAR

    def lowered_op(self) -> object:
        return torch.ops.xyserve.gemm.default

    def why_not(self, node: torch.fx.Node) -> str | None:
        a = bind(node, _PARAMS, _DEFAULTS)
        x, w, b = (fake_value(a[n]) for n in _PARAMS)
        if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
            return "input/weight carry no traced tensor value"
        if b is not None and not isinstance(b, torch.Tensor):
            return "bias carries no traced tensor value"
        if w.dim() != 2:
            return f"weight is {w.dim()}-D; xyserve.gemm takes weight [N, K]"
        if x.dim() < 1:
            return "input is 0-D; xyserve.gemm takes [..., K]"
        if b is not None and b.dim() != 1:
            return f"bias is {b.dim()}-D; xyserve.gemm takes bias [N]"
        tensors = (x, w) if b is None else (x, w, b)
        if len({t.dtype for t in tensors}) > 1:
            return "dtypes differ: " + ", ".join(str(t.dtype) for t in tensors)
        if not x.dtype.is_floating_point:
            return f"{x.dtype} linear: xyserve.gemm is for floating point"
        if len({t.device for t in tensors}) > 1:
            return "devices differ: " + ", ".join(str(t.device) for t in tensors)
        return None

    def replacement(self, node: torch.fx.Node) -> tuple[object, tuple, dict]:
        a = bind(node, _PARAMS, _DEFAULTS)
        return self.lowered_op(), (a["input"], a["weight"], a["bias"]), {}
