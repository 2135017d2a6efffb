"""Small questions about graph nodes that the passes share: which op is this, who uses it,
which constant is this, where do repeated KV heads come from, is this tensor a weight.

Dynamo keeps calls as written, so one operation has several spellings: ``torch.matmul(a, b)``,
``a @ b`` (``operator.matmul``) and ``a.matmul(b)`` are all "matmul" here (``signatures.py``
lists them, with the arguments of each).
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.pass_base import fake_value, infer_meta
from xy_inductor.lowering.signatures import bind, op_name

__all__ = [
    "is_op",
    "is_weight",
    "make_node",
    "mask_broadcast_problem",
    "needs_original_strides",
    "only_user",
    "scalar",
    "unrepeat_kv",
]


def is_op(node: object, *names: str) -> bool:
    """Whether ``node`` calls one of the named ops (canonical names of ``signatures.py``), in
    any of its spellings."""
    return op_name(node) in names


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
    call = bind(arg) if is_op(arg, "full") else None
    if call is not None and call.error is None:
        size = call["size"]
        if isinstance(size, (list, tuple)) and len(size) == 0:
            return scalar(call["fill_value"])
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
        call = bind(node)
        if call.refuse("input", "repeats", "dim") is not None:
            return None
        x, repeats, dim = call["input"], call["repeats"], call["dim"]
        source = fake_value(x)
        is_4d = isinstance(source, torch.Tensor) and source.dim() == 4
        ok = isinstance(repeats, int) and is_4d and dim in (1, -3)
        return (x, repeats, [node]) if ok else None
    reshape = bind(node) if is_op(node, "reshape") else None
    if reshape is None or reshape.error is not None or not is_op(reshape["input"], "expand"):
        return None
    expand = reshape["input"]
    expand_call = bind(expand)
    if expand_call.error is not None:
        return None
    inserted = expand_call["input"]
    inserted_call = bind(inserted)
    if inserted_call is None or inserted_call.error is not None:
        return None
    if inserted_call.op == "getitem":
        index = inserted_call["index"]
        full = slice(None)
        if not (isinstance(index, tuple) and index == (full, full, None, full, full)):
            return None
    elif inserted_call.op != "unsqueeze" or inserted_call["dim"] != 2:
        return None
    x = inserted_call["input"]
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


# Ops whose result is a view of their input that keeps its memory layout questions open: a
# ``view`` reached through them needs the strides eager computed.
_VIEW_LIKE = ("getitem", "unsqueeze", "expand", "transpose", "permute", "t")


def needs_original_strides(node: torch.fx.Node, depth: int = 4) -> bool:
    """Whether some use of ``node``'s value only works with the memory layout eager gave it:
    ``.view``/``.view_as``/``as_strided``, directly or through other views. xyserve.attention
    returns ``[B, H, L, D]`` laid out as ``[B, L, H, D]``; such a use needs a copy first."""
    for user in node.users:
        if user.op == "call_method" and user.target in ("view", "view_as", "as_strided"):
            return True
        if user.op == "call_function" and user.target is torch.as_strided:
            return True
        if depth > 0 and is_op(user, *_VIEW_LIKE) and needs_original_strides(user, depth - 1):
            return True
    return False


def mask_broadcast_problem(mask: torch.Tensor, target: tuple) -> str | None:
    """None if ``mask`` broadcasts to ``target`` ([B, H, Lq, Lk]) the way xyserve.attention
    checks it: each size a literal 1 or provably the target's (a size that is only 1 at run
    time would need a guard); else why not."""
    if mask.dim() > len(target):
        return f"the mask is {mask.dim()}-D; at most {len(target)} dims broadcast to {target}"
    for i in range(1, mask.dim() + 1):
        m, t = mask.shape[-i], target[-i]
        if isinstance(m, int) and m == 1:
            continue
        if not statically_known_true(m == t):
            return (
                f"the mask's shape {tuple(mask.shape)} does not provably broadcast to "
                f"{tuple(target)} (dim -{i})"
            )
    return None
