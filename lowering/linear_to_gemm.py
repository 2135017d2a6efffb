"""Linear layers -> torch.ops.xyserve.gemm, in the spellings real models use:

- ``F.linear(x, w, b)``: every ``nn.Linear`` under Dynamo (Llama, Qwen2, Mistral, Phi-3, Gemma,
  BERT/MiniLM projections and MLPs, ``lm_head``);
- ``x @ w.t()``, ``x @ w.T``, ``x @ w.transpose(0, 1)``, ``torch.matmul(x, w.t())``, each
  optionally ``+ b``, with ``w`` an ``[N, K]`` weight (hand-written models);
- ``torch.addmm(b, x2d, w)`` with ``w`` a ``[K, N]`` weight: GPT-2's ``Conv1D``;
- ``torch.matmul(x, w)`` / ``x @ w`` with ``w`` a 2-D ``[K, N]`` weight parameter.

A weight is a module parameter (or a constant attribute of the graph module): a matmul of two
activations, such as attention's ``q @ kᵀ``, is not a linear site. Every call is read through
its bound arguments (``signatures.py``), positional or keyword. Left alone, with the reason:
an argument the pattern does not understand (``torch.add(x @ w.t(), b, alpha=0.5)``,
``torch.addmm(..., beta=...)``), weights that are not 2-D, mixed dtypes or devices, integer
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from xy_inductor.lowering.pass_base import LoweringPass, fake_value
from xy_inductor.lowering.patterns import is_op, is_weight, make_node, only_user
from xy_inductor.lowering.signatures import bind

__all__ = ["LinearToGemm"]

LINEAR = torch._C._nn.linear


@dataclass(frozen=True)
class _Linear:
    """A linear site as ``x @ weight.T + bias``; ``transposed`` when the graph holds the
    weight as ``[K, N]`` (it is handed to the op as a transposed view)."""

    x: object
    weight: object
    bias: object
    transposed: bool
    absorbed: tuple[torch.fx.Node, ...] = ()
    refused: str | None = None
    """An argument of the call the pattern does not understand (``alpha=0.5``): the site is
    recognised, and left alone with this reason."""


def _weight_of_transpose(node: object) -> torch.fx.Node | None:
    """``w`` if ``node`` is a 2-D weight ``w`` transposed (``.t()``, ``.T``, ``.mT``,
    ``.transpose(0, 1)``, ``.permute(1, 0)``)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr:
        if node.args[1:] not in (("T",), ("mT",)):
            return None
        source = node.args[0]
    else:
        call = bind(node) if is_op(node, "t", "transpose", "permute") else None
        if call is None or call.refuse("input", "dim0", "dim1", "dims") is not None:
            return None
        if call.op == "transpose":
            dims = (call["dim0"], call["dim1"])
            if not all(isinstance(d, int) for d in dims) or sorted(d % 2 for d in dims) != [0, 1]:
                return None
        elif call.op == "permute":
            dims = call["dims"]
            if not all(isinstance(d, int) for d in dims) or [d % 2 for d in dims] != [1, 0]:
                return None
        source = call["input"]
    value = fake_value(source)
    return (
        source
        if is_weight(source) and isinstance(value, torch.Tensor) and value.dim() == 2
        else None
    )


def _matmul_linear(node: torch.fx.Node) -> _Linear | None:
    """``x @ w.t()`` or ``x @ W`` with a weight, as a linear site."""
    call = bind(node) if is_op(node, "matmul") else None
    if call is None or call.error is not None:
        return None
    x, rhs = call["input"], call["other"]
    refused = call.refuse("input", "other")
    w = _weight_of_transpose(rhs)
    if w is not None:
        return _Linear(x, w, None, False, (rhs,), refused)
    value = fake_value(rhs)
    if is_weight(rhs) and isinstance(value, torch.Tensor) and value.dim() == 2:
        return _Linear(x, rhs, None, True, (), refused)
    return None


def _bias_add(node: torch.fx.Node) -> _Linear | None:
    """``x @ w.t() + b`` (or ``b + x @ w.t()``): one site, the bias folded into the gemm."""
    call = bind(node) if is_op(node, "add") else None
    if call is None or call.error is not None:
        return None
    for mm, bias in ((call["input"], call["other"]), (call["other"], call["input"])):
        inner = _matmul_linear(mm) if isinstance(mm, torch.fx.Node) else None
        if inner is not None and only_user(mm) is node and _is_bias(bias, inner):
            refused = inner.refused or call.refuse("input", "other")
            absorbed = (mm, *inner.absorbed)
            return _Linear(inner.x, inner.weight, bias, inner.transposed, absorbed, refused)
    return None


def _linear(node: torch.fx.Node) -> _Linear | None:
    """The linear layer ``node`` computes, if it is one (see the module docstring)."""
    if node.op == "call_function" and node.target is LINEAR:
        a = bind(node)
        refused = a.refuse("input", "weight", "bias")
        return _Linear(a.get("input"), a.get("weight"), a.get("bias"), False, (), refused)
    if is_op(node, "addmm"):
        a = bind(node)
        if a.error is not None:
            return None
        bias, x, w = a["input"], a["mat1"], a["mat2"]
        value = fake_value(w)
        if is_weight(w) and isinstance(value, torch.Tensor) and value.dim() == 2:
            return _Linear(x, w, bias, True, (), a.refuse("input", "mat1", "mat2"))
        return None
    if is_op(node, "add"):
        return _bias_add(node)
    linear = _matmul_linear(node)
    if linear is not None and _folds_into_add(node):
        return None  # its add is the site
    return linear


def _is_bias(bias: object, linear: _Linear) -> bool:
    b, w = fake_value(bias), fake_value(linear.weight)
    if not isinstance(b, torch.Tensor) or not isinstance(w, torch.Tensor) or b.dim() != 1:
        return False
    n = w.shape[1] if linear.transposed else w.shape[0]
    return b.shape[0] == n if isinstance(b.shape[0], int) else False


def _folds_into_add(node: torch.fx.Node) -> bool:
    user = only_user(node)
    return user is not None and _bias_add(user) is not None


class LinearToGemm(LoweringPass):
    name = "linear_to_gemm"
    kind = "linear"
    target = LINEAR
    reads = ("max_tokens",)

    def lowered_op(self) -> object:
        return torch.ops.xyserve.gemm.default

    def is_site(self, node: torch.fx.Node) -> bool:
        return self.is_lowered(node) or (
            node.op in ("call_function", "call_method") and _linear(node) is not None
        )

    def why_not(self, node: torch.fx.Node) -> str | None:
        linear = _linear(node)
        if linear.refused is not None:
            return linear.refused
        x, w, b = (fake_value(t) for t in (linear.x, linear.weight, linear.bias))
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
        out = fake_value(node)
        if isinstance(out, torch.Tensor) and out.dtype != x.dtype:
            # torch.autocast casts the inputs as the call runs; xyserve.gemm would not.
            return f"its result is {out.dtype} from {x.dtype} inputs (torch.autocast)"
        return None

    def replacement(self, node: torch.fx.Node) -> tuple[object, tuple, dict]:
        linear = _linear(node)
        weight = linear.weight
        if linear.transposed:
            weight = make_node(node.graph, "call_method", "t", (weight,))
        return (
            self.lowered_op(),
            (linear.x, weight, linear.bias),
            {"max_tokens": self.settings.max_tokens},
        )

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        return list(_linear(node).absorbed)
