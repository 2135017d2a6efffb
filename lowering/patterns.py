"""Small questions about graph nodes that the passes share: which op is this, who uses it,
which constant is this, where do repeated KV heads come from, is this tensor a weight.

Dynamo keeps calls as written, so one operation has several spellings: ``torch.matmul(a, b)``,
``a @ b`` (``operator.matmul``) and ``a.matmul(b)`` are all "matmul" here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.pass_base import fake_value, infer_meta

__all__ = [
    "is_op",
    "is_weight",
    "make_node",
    "only_user",
    "scalar",
    "unrepeat_kv",
]

# op name -> (functions, tensor method names) that spell it in a Dynamo graph
_SPELLINGS: dict[str, tuple[tuple[Callable, ...], tuple[str, ...]]] = {
    "matmul": ((torch.matmul, operator.matmul), ("matmul",)),
    "softmax": ((F.softmax, torch.softmax), ("softmax",)),
    "transpose": ((torch.transpose,), ("transpose",)),
    "permute": ((torch.permute,), ("permute",)),
    "mul": ((operator.mul, torch.mul), ("mul",)),
    "div": ((operator.truediv, torch.div), ("div",)),
    "add": ((operator.add, torch.add), ("add",)),
    "where": ((torch.where,), ()),
    "masked_fill": ((torch.masked_fill,), ("masked_fill",)),
    "dropout": ((F.dropout, torch.dropout), ()),
    "cast": ((), ("to", "type", "float", "half", "bfloat16", "double")),
    "expand": ((), ("expand",)),
    "reshape": ((torch.reshape,), ("reshape", "view")),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",)),
    "getitem": ((operator.getitem,), ()),
    "repeat_interleave": ((torch.repeat_interleave,), ("repeat_interleave",)),
    "addmm": ((torch.addmm,), ("addmm",)),
    "t": ((torch.t,), ("t",)),
    "full": ((torch.full,), ()),
}


def is_op(node: object, *names: str) -> bool:
    """Whether ``node`` calls one of the named ops, in any of its spellings."""
    if not isinstance(node, torch.fx.Node):
        return False
    for name in names:
        functions, methods = _SPELLINGS[name]
        if node.op == "call_function" and node.target in functions:
            return True
        if node.op == "call_method" and node.target in methods:
            return True
    return False


def only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node that uses ``node``, or None if it has no or several users."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def scalar(arg: object) -> object | None:
    """``arg`` as a scalar: a number, a node that produces a Python/symbolic number, or the
    value filled into a 0-d ``torch.full([], c)`` (as GPT-2 writes its scale); else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return arg
    if not isinstance(arg, torch.fx.Node):
        return None
    value = fake_value(arg)
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(
        value, bool
    ):
        return arg
    if is_op(arg, "full") and len(arg.args) >= 2 and list(arg.args[0]) == []:
        return scalar(arg.args[1])
    return None


def _known_equal(a: object, b: object) -> bool:
    return statically_known_true(a == b) if not isinstance(a == b, bool) else a == b


def unrepeat_kv(node: object) -> tuple[torch.fx.Node, int, list[torch.fx.Node]] | None:
    """If ``node`` repeats the KV heads of a ``[B, Hkv, L, D]`` tensor: that tensor, the repeat
    count and the nodes doing the repeat (outermost first); else None.

    Recognised: Hugging Face's ``repeat_kv``, ``x[:, :, None].expand(B, Hkv, n, L, D)
    .reshape(B, Hkv * n, L, D)`` (Llama, Qwen2, Mistral, Gemma, Phi-3 eager and SDPA paths),
    also with ``unsqueeze(2)``; and ``x.repeat_interleave(n, dim=1)``.
    """
    if not isinstance(node, torch.fx.Node):
        return None
    if is_op(node, "repeat_interleave"):
        x = node.args[0]
        repeats = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        source = fake_value(x)
        is_4d = isinstance(source, torch.Tensor) and source.dim() == 4
        ok = isinstance(repeats, int) and is_4d and dim in (1, -3)
        return (x, repeats, [node]) if ok else None
    if not is_op(node, "reshape") or not is_op(node.args[0], "expand"):
        return None
    expand = node.args[0]
    inserted = expand.args[0]
    if is_op(inserted, "getitem"):
        index = inserted.args[1]
        full = slice(None)
        if not (isinstance(index, tuple) and index == (full, full, None, full, full)):
            return None
    elif is_op(inserted, "unsqueeze"):
        if inserted.args[1:] != (2,) and inserted.kwargs.get("dim") != 2:
            return None
    else:
        return None
    x = inserted.args[0]
    src, expanded, out = fake_value(x), fake_value(expand), fake_value(node)
    if not all(isinstance(t, torch.Tensor) for t in (src, expanded, out)):
        return None
    if src.dim() != 4 or expanded.dim() != 5 or out.dim() != 4:
        return None
    b, h, length, d = src.shape
    n = expanded.shape[2]
    same = all(
        _known_equal(p, q)
        for p, q in (
            (expanded.shape[0], b),
            (expanded.shape[1], h),
            (expanded.shape[3], length),
            (expanded.shape[4], d),
            (out.shape[0], b),
            (out.shape[1], h * n),
            (out.shape[2], length),
            (out.shape[3], d),
        )
    )
    if not same or not isinstance(n, int):
        return None
    return x, n, [node, expand, inserted]


def is_weight(node: object) -> bool:
    """A module parameter (a graph input Dynamo traced as ``nn.Parameter``) or a constant
    attribute of the graph module."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "get_attr":
        return True
    return node.op == "placeholder" and isinstance(fake_value(node), torch.nn.Parameter)


def make_node(
    graph: torch.fx.Graph, op: str, target: object, args: tuple, kwargs: dict | None = None
) -> torch.fx.Node:
    """Insert a call at the graph's current insertion point, with its traced value in meta
    (later passes and the op's own fake implementation read it)."""
    kwargs = kwargs or {}
    node = graph.create_node(op, target, args, kwargs)
    value = infer_meta(op, target, args, kwargs)
    if value is not None:
        node.meta["example_value"] = value
    return node
