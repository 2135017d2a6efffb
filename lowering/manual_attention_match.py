"""Attention written out by hand: the pattern ``ManualAttention`` matches (``manual_attention.py``
checks and rewrites what this module finds).

The shape, as Hugging Face's ``eager`` attention writes it for Llama, Qwen2, Mistral, Gemma,
Phi-3, GPT-2 and BERT (transformers 5.x), and as most hand-written models do::

    scores = q @ k.transpose(-1, -2)          # or torch.matmul / torch.bmm, .transpose(2, 3),
                                              # .permute(0, 1, 3, 2), .mT, .swapaxes
    scores = scores * scale                   # or / sqrt(d) (GPT-2: / torch.full([], ...)),
                                              # or on q or kᵀ before the product, or split
                                              # between them, or none
    scores = scores + mask                    # additive (ALiBi biases too; a bool mask adds
                                              # 0/1); or torch.where(bool, scores, fill) or
                                              # scores.masked_fill(bool, fill) (DistilBERT); any
                                              # order; masks also broadcast by mask.expand(...)
                                              # / .expand_as(scores) (score_masks.py)
    probs = softmax(scores, dim=-1)           # or torch.ops.aten._safe_softmax; in a wider
                                              # dtype (dtype=, .float(), .to(...))
    probs = probs.type_as(scores)             # optional cast back (T5), or .to(q.dtype)
    probs = dropout(probs, p, training=False) # optional, inference only
    out = probs @ v                           # copies (clone, contiguous) may sit anywhere

q, k and v are ``[B, H, L, D]``, or ``[B·H, L, D]`` (batch and heads merged, as BART/OPT-style
code and PyTorch's own decompositions write it: ``torch.bmm`` between views), or ``[L, D]``.
K and V may be repeated to the query heads first (``repeat_kv``); the op reads them
un-repeated.

A softmax is a site when its input comes from a product of two activations and its output
reaches a product with an activation (``is_attention_softmax``); ``match_site`` reads the shape
above around it, or says why it is not that shape, and ``frame_of`` says how the op will see q,
k and v.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.pass_base import fake_value
from xy_inductor.lowering.patterns import is_op, is_weight, scalar
from xy_inductor.lowering.score_masks import broadcast_wrapper
from xy_inductor.lowering.signatures import Call, bind, describe, op_name

__all__ = [
    "Frame",
    "Match",
    "Step",
    "frame_of",
    "is_attention_softmax",
    "is_inplace",
    "known",
    "match_site",
    "operands",
    "same_shape",
    "tensor_value",
]

_SOFTMAXES = ("softmax", "safe_softmax")
_PRODUCTS = ("matmul", "bmm")  # what q @ kᵀ and probs @ v may be written as, lowered
_OTHER_PRODUCTS = ("einsum", "baddbmm")  # products that make a site, but are not lowered
_SEARCH = 10  # nodes walked from a softmax to its products; real models use two to five
_MAX_CHAIN = 12  # ops between q @ kᵀ and softmax, or softmax and @ v
_AFTER_STEPS = ("cast", "dropout", "copy")
_PEEL = ("mul", "div", "copy")  # around q and kᵀ: folded into the scale, or value-identical


def tensor_value(arg: object) -> torch.Tensor | None:
    """The traced tensor behind a graph argument, or None (a constant, no traced value)."""
    value = fake_value(arg)
    return value if isinstance(value, torch.Tensor) else None


def _is_activation(arg: object) -> bool:
    return isinstance(arg, torch.fx.Node) and tensor_value(arg) is not None and not is_weight(arg)


def is_inplace(node: torch.fx.Node) -> bool:
    """Whether the call modifies its first operand in place (``x.add_(...)``, ``x += ...``)."""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.target in (operator.iadd, operator.imul, operator.itruediv)


def _is_xyserve(node: torch.fx.Node) -> bool:
    target = node.target if node.op == "call_function" else None
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "xyserve"


def _product_of_activations(node: object) -> bool:
    if op_name(node) not in (*_PRODUCTS, *_OTHER_PRODUCTS):
        return False
    operands = [a for a in node.all_input_nodes if tensor_value(a) is not None]
    if op_name(node) == "baddbmm":
        operands = operands[1:]  # the added input is not a factor
    return len(operands) >= 2 and all(_is_activation(a) for a in operands)


def _comes_from_product(softmax: torch.fx.Node) -> bool:
    """Whether a product of two activations feeds the softmax within ``_SEARCH`` nodes; a
    product with a weight (a linear layer: an MoE router) ends the search."""
    seen, todo = set(), deque([(softmax, 0)])
    while todo:
        node, depth = todo.popleft()
        for arg in node.all_input_nodes:
            if arg in seen or tensor_value(arg) is None:
                continue
            seen.add(arg)
            if _product_of_activations(arg):
                return True
            if op_name(arg) in (*_PRODUCTS, *_OTHER_PRODUCTS, "linear", "addmm", "sdpa"):
                continue
            if _is_xyserve(arg):  # a lowered linear layer or attention: a product already
                continue
            if depth + 1 < _SEARCH and arg.op in ("call_function", "call_method"):
                todo.append((arg, depth + 1))
    return False


def _reaches_product(softmax: torch.fx.Node) -> bool:
    """Whether the softmax's output reaches, within ``_SEARCH`` nodes, a product whose other
    operand is an activation."""
    seen, todo = set(), deque([(softmax, 0)])
    while todo:
        node, depth = todo.popleft()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if op_name(user) in (*_PRODUCTS, *_OTHER_PRODUCTS):
                others = [a for a in user.all_input_nodes if a is not node]
                if any(_is_activation(a) for a in others):
                    return True
                continue
            if depth + 1 < _SEARCH and tensor_value(user) is not None:
                todo.append((user, depth + 1))
    return False


@dataclass(frozen=True)
class Step:
    """One op between ``q @ kᵀ`` and the softmax."""

    call: Call
    chain: torch.fx.Node  # the argument the scores flow in through

    @property
    def node(self) -> torch.fx.Node:
        return self.call.node


@dataclass(frozen=True)
class Match:
    """The hand-written attention around one softmax, as ``match_site`` read it."""

    q: torch.fx.Node
    k: torch.fx.Node | None  # None: kᵀ is not a transpose; the rewrite transposes it
    kt: torch.fx.Node  # the product's right operand, after peeling
    v: torch.fx.Node
    factors: tuple[tuple[object, object], ...]  # (operator.mul | truediv, factor) on q and kᵀ
    peeled: tuple[torch.fx.Node, ...]  # nodes around q and kᵀ that the rewrite may leave unused
    scores: torch.fx.Node  # q @ kᵀ
    steps: tuple[Step, ...]  # from scores to softmax, in order
    softmax: Call
    after: tuple[Call, ...]  # casts, dropout and copies from softmax to probs @ v, in order
    out: torch.fx.Node  # probs @ v
    mask_wrappers: tuple[torch.fx.Node, ...]  # expand/expand_as around mask operands

    @property
    def removed(self) -> list[torch.fx.Node]:
        """Every node the rewrite replaces: nothing else may use them."""
        return [
            self.out,
            *(c.node for c in reversed(self.after)),
            self.softmax.node,
            *(s.node for s in reversed(self.steps)),
            *self.mask_wrappers,
            self.scores,
        ]


@dataclass(frozen=True)
class Frame:
    """How the op sees the match: q/k/v as ``[B, H, L, D]``."""

    q: torch.fx.Node
    k: torch.fx.Node | None  # None: transpose the match's kᵀ
    v: torch.fx.Node
    heads: object | None
    """H, when the frame is 4-D: scores viewed as ``[B·H, Lq, Lk]`` in the chain, and their
    masks, are split back by it. None for 2-D/3-D q/k/v run with leading 1s (``pad``)."""
    pad: int
    factors: tuple[tuple[object, object], ...]  # scalings found under a split of q
    walked: tuple[torch.fx.Node, ...]  # views the split looked through
    view_out: torch.fx.Node | None  # probs @ v viewed back as [B, H, Lq, Dv]: replaced instead


def _peel(node: object, *, transpose: bool) -> tuple[object, list, list, bool]:
    """Walk from a product operand back through scalar scalings and copies (and, for the key
    side, one transpose of the last two dims): (the tensor found, the scale factors, the
    nodes walked, whether a transpose was found)."""
    factors: list[tuple[object, object]] = []
    walked: list[torch.fx.Node] = []
    transposed = False
    for _ in range(_MAX_CHAIN):
        if not isinstance(node, torch.fx.Node) or is_inplace(node):
            break
        call = bind(node) if op_name(node) in (*_PEEL, "transpose", "permute") else None
        if call is None and transpose and not transposed and _is_mt(node):
            walked.append(node)
            node, transposed = node.args[0], True
            continue
        if call is None or call.error is not None:
            break
        if call.op == "copy":
            walked.append(node)
            node = call["input"]
            continue
        if call.op in ("mul", "div"):
            if call.refuse("input", "other") is not None:
                break
            a, b = call["input"], call["other"]
            factor, base = (b, a) if scalar(b) is not None else (a, b)
            if scalar(factor) is None or (call.op == "div" and base is not a):
                break
            if tensor_value(base) is None:
                break
            factors.append((operator.mul if call.op == "mul" else operator.truediv, scalar(factor)))
            walked.append(node)
            node = base
            continue
        if call.op in ("transpose", "permute") and transpose and not transposed:
            if not _swaps_last_two(call):
                break
            walked.append(node)
            node, transposed = call["input"], True
            continue
        break
    return node, factors, walked, transposed


def _is_mt(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",)


def _swaps_last_two(call: Call) -> bool:
    value = tensor_value(call["input"])
    if value is None or call.refuse("input", "dim0", "dim1", "dims") is not None:
        return False
    n = value.dim()
    if n < 2:
        return False
    if call.op == "transpose":
        dims = (call["dim0"], call["dim1"])
        swapped = sorted(d % n for d in dims) if all(isinstance(d, int) for d in dims) else []
        return swapped == [n - 2, n - 1]
    dims = call["dims"]
    want = [*range(n - 2), n - 1, n - 2]
    return all(isinstance(d, int) for d in dims) and [d % n for d in dims] == want


def _path_to_scores(node: object, depth: int) -> list[Step] | None:
    """The steps from a product up to ``node`` (the product excluded), following whichever
    argument leads there; None if none does within ``depth`` ops."""
    if op_name(node) in (*_PRODUCTS, *_OTHER_PRODUCTS) and _product_of_activations(node):
        return []
    if depth == 0 or not isinstance(node, torch.fx.Node):
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    args = node.all_input_nodes
    if op_name(node) in ("expand_as", "view_as"):  # the other operand gives only a shape
        args = [a for a in args if a is bind(node).get("input")]
    for arg in args:
        if tensor_value(arg) is not None:
            path = _path_to_scores(arg, depth - 1)
            if path is not None:
                call = bind(node) or Call(node, str(node.target), {}, None)
                return [*path, Step(call, arg)]
    return None


def match_site(softmax_node: torch.fx.Node) -> Match | str:
    """The hand-written attention around a softmax site, or why it is not the shape above."""
    sm = bind(softmax_node)
    refused = sm.refuse("input", "dim", "dtype")
    if refused is not None:
        return refused
    # Forward: casts, dropout and copies, then probs @ v.
    after: list[Call] = []
    node = softmax_node
    out = v = None
    for _ in range(_MAX_CHAIN):
        if len(node.users) != 1:
            users = ", ".join(f"'{u.name}'" for u in node.users) or "nothing"
            if node is softmax_node:
                return (
                    f"the attention probabilities are also used by {users} "
                    "(e.g. output_attentions=True)"
                )
            return f"'{node.name}' after the softmax is used by {users}, not only by @ v"
        user = next(iter(node.users))
        call = bind(user)
        if call is not None and call.op in _AFTER_STEPS:
            after.append(call)
            node = user
            continue
        if call is None or call.op not in _PRODUCTS:
            if op_name(user) in _OTHER_PRODUCTS:
                return f"probs @ v is written as {describe(user)}, which is not lowered"
            return (
                f"'{user.name}' ({describe(user)}) between softmax and @ v is not expressible "
                "by xyserve.attention"
            )
        refused = call.refuse("input", "other")
        if refused is not None:
            return refused
        if call["input"] is not node:
            return f"the attention probabilities are the right operand of '{user.name}'"
        out, v = user, call["other"]
        break
    if out is None:
        return f"more than {_MAX_CHAIN} ops between softmax and @ v"
    # Backward: the steps from q @ kᵀ to the softmax.
    steps = _path_to_scores(sm["input"], _MAX_CHAIN)
    if steps is None:
        return "no q @ kᵀ within reach of the softmax"
    scores = steps[0].chain if steps else sm["input"]
    if op_name(scores) not in _PRODUCTS:
        return f"q @ kᵀ is written as {describe(scores)}, which is not lowered"
    product = bind(scores)
    refused = product.refuse("input", "other")
    if refused is not None:
        return refused
    q, q_factors, q_walked, _ = _peel(product["input"], transpose=False)
    kt, k_factors, k_walked, transposed = _peel(product["other"], transpose=True)
    wrappers = []
    for step in steps:
        wrappers += broadcast_wrapper(step.call, step.chain)
    return Match(
        q=q,
        k=kt if transposed else None,
        kt=kt,
        v=v,
        factors=tuple(q_factors + k_factors),
        peeled=tuple(q_walked + k_walked),
        scores=scores,
        steps=tuple(steps),
        softmax=sm,
        after=tuple(after),
        out=out,
        mask_wrappers=tuple(wrappers),
    )


def _split(node: object) -> tuple[torch.fx.Node, list[torch.fx.Node]] | None:
    """``x`` and the nodes walked, if ``node`` is a 4-D ``x`` [B, H, L, D] viewed (reshape,
    view, flatten; copies allowed) as [B·H, L, D]; else None."""
    walked = []
    while is_op(node, "copy") and not is_inplace(node):
        walked.append(node)
        node = bind(node)["input"]
    call = bind(node) if is_op(node, "reshape") else None
    flatten = (
        isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == "flatten"
    )
    if call is not None and call.error is None:
        source = call["input"]
    elif flatten:
        source = node.args[0]
    else:
        return None
    x, y = tensor_value(source), tensor_value(node)
    if x is None or y is None or x.dim() != 4 or y.dim() != 3:
        return None
    if not all(
        known(a == b)
        for a, b in (
            (x.shape[0] * x.shape[1], y.shape[0]),
            (x.shape[2], y.shape[1]),
            (x.shape[3], y.shape[2]),
        )
    ):
        return None
    return source, [*walked, node]


def frame_of(m: Match) -> Frame:
    """q/k/v as the op will read them (``Frame``)."""
    q = tensor_value(m.q)
    if q is not None and q.dim() == 4:
        return Frame(m.q, m.k, m.v, q.shape[1], 0, (), (), None)
    if q is not None and q.dim() == 3 and m.k is not None:
        # [B·H, L, D] views of [B, H, L, D] tensors (BART, OPT): split them back, so that masks
        # given per [B, H] need no copy.
        parts = [_split(t) for t in (m.q, m.k, m.v)]
        if all(p is not None for p in parts):
            (q4, q_walked), (k4, k_walked), (v4, v_walked) = parts
            q4, factors, peeled, _ = _peel(q4, transpose=False)
            shapes = [tensor_value(t).shape for t in (q4, k4, v4)]
            if all(known(s[0] == shapes[0][0]) and known(s[1] == shapes[0][1]) for s in shapes):
                heads = shapes[0][1]
                view_out = _viewed_back(m.out, shapes[0][0], heads)
                walked = (*q_walked, *peeled, *k_walked, *v_walked)
                return Frame(q4, k4, v4, heads, 0, tuple(factors), walked, view_out)
    return Frame(m.q, m.k, m.v, None, 4 - (q.dim() if q is not None else 4), (), (), None)


def _viewed_back(out: torch.fx.Node, batch: object, heads: object) -> torch.fx.Node | None:
    """The one use of ``out`` [B·H, Lq, Dv] if it views it as [B, H, Lq, Dv]."""
    user = next(iter(out.users)) if len(out.users) == 1 else None
    if not is_op(user, "reshape") or bind(user).error is not None:
        return None
    a, b = tensor_value(out), tensor_value(user)
    if a is None or b is None or b.dim() != 4:
        return None
    same = (b.shape[0], b.shape[1], b.shape[2], b.shape[3]), (batch, heads, a.shape[1], a.shape[2])
    return user if all(known(x == y) for x, y in zip(*same, strict=True)) else None


def operands(step: Step) -> tuple[object, object]:
    """(scores side, other side) of a binary step."""
    call = step.call
    if call.op == "masked_fill":
        return call["input"], call["value"]
    a, b = call["input"], call["other"]
    return (a, b) if a is step.chain else (b, a)


def known(cond: object) -> bool:
    """Whether a size condition provably holds, without adding a guard."""
    return statically_known_true(cond) if not isinstance(cond, bool) else cond


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two traced tensors provably have the same shape."""
    return a.dim() == b.dim() and all(known(x == y) for x, y in zip(a.shape, b.shape, strict=True))


def is_attention_softmax(node: torch.fx.Node) -> bool:
    """Whether ``node`` is a softmax of hand-written attention, lowerable or not."""
    return op_name(node) in _SOFTMAXES and _comes_from_product(node) and _reaches_product(node)
