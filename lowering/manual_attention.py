"""Attention written out by hand -> torch.ops.xyserve.attention.

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

Site: every softmax whose input comes from a product of two activations and whose output
reaches a product with an activation is an attention site, lowered or not; this pass lowers
the ones of the shape above. A site left alone says why: an intermediate also used elsewhere
(``output_attentions=True`` returns the probabilities), an op between ``q @ kᵀ`` and softmax
that the op cannot express (``tanh`` soft-capping, Gemma 2), dropout in training, a scale that
is a tensor, a cast that narrows, a keyword the pattern does not understand (``alpha=``,
``rounding_mode=``), mixed dtypes or devices.

The op's mask is the score chain replayed on zero scores: the same additions, fills and
scalings, applied to 0 instead of ``q @ kᵀ``, so ``q·k * scale + mask`` is exactly what the
chain computed. Only a chain whose sole effect is filling with ``-inf`` becomes a bool mask;
a fill with ``finfo.min``, as Hugging Face writes it, stays additive, which keeps eager's result
(uniform weights, not zeros) on rows where every key is masked. One difference is known and
kept: on a row where *every* key is filled with ``-inf``, eager's plain softmax gives NaN and
the op (like ``F.scaled_dot_product_attention``) gives 0; ``_safe_softmax`` gives 0 in both.
"""

from __future__ import annotations

import math
import operator
from collections import deque
from dataclasses import dataclass

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.pass_base import LoweringPass, fake_value
from xy_inductor.lowering.patterns import (
    is_op,
    is_weight,
    make_node,
    mask_broadcast_problem,
    needs_original_strides,
    scalar,
    unrepeat_kv,
)
from xy_inductor.lowering.score_masks import (
    bool_as_bias,
    broadcast_wrapper,
    constant_fill,
    fill_value,
    unwrapped_mask,
)
from xy_inductor.lowering.signatures import Call, bind, describe, op_name

__all__ = ["ManualAttention"]

_SOFTMAXES = ("softmax", "safe_softmax")
_PRODUCTS = ("matmul", "bmm")  # what q @ kᵀ and probs @ v may be written as, lowered
_OTHER_PRODUCTS = ("einsum", "baddbmm")  # products that make a site, but are not lowered
_SEARCH = 10  # nodes walked from a softmax to its products; real models use two to five
_MAX_CHAIN = 12  # ops between q @ kᵀ and softmax, or softmax and @ v
_SCORE_STEPS = ("mul", "div", "add", "where", "masked_fill", "cast", "copy")
_AFTER_STEPS = ("cast", "dropout", "copy")
_PEEL = ("mul", "div", "copy")  # around q and kᵀ: folded into the scale, or value-identical
# Floating dtypes by width: a cast may keep or widen the queries' dtype, never narrow it (or
# swap bfloat16 for float16), or the op, which computes in at least the queries' precision,
# would not reproduce eager's rounding.
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _tensor(arg: object) -> torch.Tensor | None:
    value = fake_value(arg)
    return value if isinstance(value, torch.Tensor) else None


def _is_activation(arg: object) -> bool:
    return isinstance(arg, torch.fx.Node) and _tensor(arg) is not None and not is_weight(arg)


def _is_inplace(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_")
    return node.target in (operator.iadd, operator.imul, operator.itruediv)


def _is_xyserve(node: torch.fx.Node) -> bool:
    target = node.target if node.op == "call_function" else None
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "xyserve"


def _product_of_activations(node: object) -> bool:
    if op_name(node) not in (*_PRODUCTS, *_OTHER_PRODUCTS):
        return False
    operands = [a for a in node.all_input_nodes if _tensor(a) is not None]
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
            if arg in seen or _tensor(arg) is None:
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
            if depth + 1 < _SEARCH and _tensor(user) is not None:
                todo.append((user, depth + 1))
    return False


@dataclass(frozen=True)
class _Step:
    call: Call
    chain: torch.fx.Node  # the argument the scores flow in through

    @property
    def node(self) -> torch.fx.Node:
        return self.call.node


@dataclass(frozen=True)
class _Match:
    q: torch.fx.Node
    k: torch.fx.Node | None  # None: kᵀ is not a transpose; the rewrite transposes it
    kt: torch.fx.Node  # the product's right operand, after peeling
    v: torch.fx.Node
    factors: tuple[tuple[object, object], ...]  # (operator.mul | truediv, factor) on q and kᵀ
    peeled: tuple[torch.fx.Node, ...]  # nodes around q and kᵀ that the rewrite may leave unused
    scores: torch.fx.Node  # q @ kᵀ
    steps: tuple[_Step, ...]  # from scores to softmax, in order
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
class _Frame:
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
        if not isinstance(node, torch.fx.Node) or _is_inplace(node):
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
            if _tensor(base) is None:
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
    value = _tensor(call["input"])
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


def _path_to_scores(node: object, depth: int) -> list[_Step] | None:
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
        if _tensor(arg) is not None:
            path = _path_to_scores(arg, depth - 1)
            if path is not None:
                call = bind(node) or Call(node, str(node.target), {}, None)
                return [*path, _Step(call, arg)]
    return None


def _match(softmax_node: torch.fx.Node) -> _Match | str:
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
    return _Match(
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
    while is_op(node, "copy") and not _is_inplace(node):
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
    x, y = _tensor(source), _tensor(node)
    if x is None or y is None or x.dim() != 4 or y.dim() != 3:
        return None
    if not all(
        _known(a == b)
        for a, b in (
            (x.shape[0] * x.shape[1], y.shape[0]),
            (x.shape[2], y.shape[1]),
            (x.shape[3], y.shape[2]),
        )
    ):
        return None
    return source, [*walked, node]


def _frame(m: _Match) -> _Frame:
    """q/k/v as the op will read them (``_Frame``)."""
    q = _tensor(m.q)
    if q is not None and q.dim() == 4:
        return _Frame(m.q, m.k, m.v, q.shape[1], 0, (), (), None)
    if q is not None and q.dim() == 3 and m.k is not None:
        # [B·H, L, D] views of [B, H, L, D] tensors (BART, OPT): split them back, so that masks
        # given per [B, H] need no copy.
        parts = [_split(t) for t in (m.q, m.k, m.v)]
        if all(p is not None for p in parts):
            (q4, q_walked), (k4, k_walked), (v4, v_walked) = parts
            q4, factors, peeled, _ = _peel(q4, transpose=False)
            shapes = [_tensor(t).shape for t in (q4, k4, v4)]
            if all(_known(s[0] == shapes[0][0]) and _known(s[1] == shapes[0][1]) for s in shapes):
                heads = shapes[0][1]
                view_out = _viewed_back(m.out, shapes[0][0], heads)
                walked = (*q_walked, *peeled, *k_walked, *v_walked)
                return _Frame(q4, k4, v4, heads, 0, tuple(factors), walked, view_out)
    return _Frame(m.q, m.k, m.v, None, 4 - (q.dim() if q is not None else 4), (), (), None)


def _viewed_back(out: torch.fx.Node, batch: object, heads: object) -> torch.fx.Node | None:
    """The one use of ``out`` [B·H, Lq, Dv] if it views it as [B, H, Lq, Dv]."""
    user = next(iter(out.users)) if len(out.users) == 1 else None
    if not is_op(user, "reshape") or bind(user).error is not None:
        return None
    a, b = _tensor(out), _tensor(user)
    if a is None or b is None or b.dim() != 4:
        return None
    same = (b.shape[0], b.shape[1], b.shape[2], b.shape[3]), (batch, heads, a.shape[1], a.shape[2])
    return user if all(_known(x == y) for x, y in zip(*same, strict=True)) else None


def _operands(step: _Step) -> tuple[object, object]:
    """(scores side, other side) of a binary step."""
    call = step.call
    if call.op == "masked_fill":
        return call["input"], call["value"]
    a, b = call["input"], call["other"]
    return (a, b) if a is step.chain else (b, a)


def _cast_problem(dtype: torch.dtype | None, q_dtype: torch.dtype, what: str) -> str | None:
    if dtype is None or dtype == q_dtype:
        return None
    if dtype not in _WIDTH:
        return f"{what} casts to {dtype}"
    if _WIDTH[dtype] <= _WIDTH[q_dtype]:
        return f"{what} casts to {dtype}, narrower than (or not as wide as) q's {q_dtype}"
    return None


def _known(cond: object) -> bool:
    return statically_known_true(cond) if not isinstance(cond, bool) else cond


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(_known(x == y) for x, y in zip(a.shape, b.shape, strict=True))


class ManualAttention(LoweringPass):
    name = "manual_attention"
    kind = "attention"
    target = None  # a pattern rather than one call: is_site below

    def __init__(self, settings: LoweringOptions | None = None) -> None:
        super().__init__(settings)
        self._last: tuple[torch.fx.Node, _Match | str, _Frame | None] | None = None

    def lowered_op(self) -> object:
        return torch.ops.xyserve.attention.default

    def is_site(self, node: torch.fx.Node) -> bool:
        return op_name(node) in _SOFTMAXES and _comes_from_product(node) and _reaches_product(node)

    def is_lowered(self, node: torch.fx.Node) -> bool:
        return False  # lowered attention is counted once, by the SDPA pass

    def _matched(self, node: torch.fx.Node) -> tuple[_Match | str, _Frame | None]:
        # why_not, anchor, absorbed and replacement of one site all read one match.
        if self._last is None or self._last[0] is not node:
            m = _match(node)
            self._last = (node, m, None if isinstance(m, str) else _frame(m))
        return self._last[1], self._last[2]

    def anchor(self, node: torch.fx.Node) -> torch.fx.Node:
        m, frame = self._matched(node)
        return frame.view_out or m.out

    def why_not(self, node: torch.fx.Node) -> str | None:
        self._last = None  # a new site, or the graph changed since
        m, frame = self._matched(node)
        if isinstance(m, str):
            return m
        for step in m.steps:
            if step.call.op not in (*_SCORE_STEPS, "reshape"):
                return (
                    f"'{step.node.name}' ({describe(step.node)}) between q @ kᵀ and softmax "
                    "is not expressible by xyserve.attention (logit soft-capping?)"
                )
        removed = [*([frame.view_out] if frame.view_out else []), *m.removed]
        for inner in removed[1:]:  # the replaced node's own users are the replacement's
            others = [u for u in inner.users if u not in removed]
            if others:
                return _use_reason(inner, others[0], m)
        q, v = _tensor(frame.q), _tensor(frame.v)
        k = _tensor(frame.k if frame.k is not None else m.kt)
        if q is None or k is None or v is None:
            return "q/k/v carry no traced tensor value"
        if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (2, 3, 4):
            return f"q/k/v are {q.dim()}/{k.dim()}/{v.dim()}-D; lowered: [B, H, L, D], [B·H, L, D]"
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _WIDTH:
            return f"q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one floating dtype"
        if not (q.device == k.device == v.device):
            return f"q/k/v devices differ: {q.device}, {k.device}, {v.device}"
        problem = _shape_problem(q, k, v, transposed=frame.k is not None)
        if problem is not None:
            return problem
        for step in m.steps:
            problem = _step_problem(step, q, frame)
            if problem is not None:
                return problem
        problem = _cast_problem(m.softmax["dtype"], q.dtype, f"softmax '{m.softmax.node.name}'")
        if problem is not None:
            return problem
        dim, n = m.softmax["dim"], _tensor(m.softmax.node).dim()
        if not isinstance(dim, int) or dim % n != n - 1:
            return f"softmax over dim {dim}, not the last"
        for call in m.after:
            problem = _after_problem(call, q.dtype)
            if problem is not None:
                return problem
        return None

    def replacement(self, node: torch.fx.Node) -> torch.fx.Node:
        m, frame = self._matched(node)
        graph = node.graph
        k = frame.k
        if k is None:  # kᵀ given as such: the op reads k, a view
            k = make_node(graph, "call_method", "transpose", (m.kt, -2, -1))
        q, v = frame.q, frame.v
        k_rep, v_rep = unrepeat_kv(k), unrepeat_kv(v)
        if k_rep is not None and v_rep is not None and k_rep[1] == v_rep[1]:
            k, v = k_rep[0], v_rep[0]
        scale, mask = _replay(graph, m, frame)
        if frame.pad:  # [B·H, L, D] that is no view of [B, H, L, D]: run as [1, B·H, L, D]
            index = (*(None,) * frame.pad, Ellipsis)
            q, k, v = (
                make_node(graph, "call_function", operator.getitem, (t, index)) for t in (q, k, v)
            )
        out = make_node(graph, "call_function", self.lowered_op(), (q, k, v, mask, False, scale))
        anchor = frame.view_out or m.out
        if frame.pad:
            index = (*(0,) * frame.pad, Ellipsis)
            out = make_node(graph, "call_function", operator.getitem, (out, index))
        elif _tensor(anchor).dim() == 3:  # split frame, used as [B·H, Lq, Dv]
            out = make_node(graph, "call_method", "flatten", (out, 0, 1))
        if needs_original_strides(anchor):
            out = make_node(graph, "call_method", "contiguous", (out,))
        return out

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        m, frame = self._matched(node)
        dead = [*m.removed, *m.peeled, *frame.walked]
        for step in m.steps:
            if step.call.op in ("where", "masked_fill"):
                dead += constant_fill(_operands(step)[1])
        for t in (frame.k, frame.v):
            rep = unrepeat_kv(t) if t is not None else None
            if rep is not None:
                dead += rep[2]
        return dead


def _shape_problem(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, transposed: bool
) -> str | None:
    k_len, head = (k.shape[-2], k.shape[-1]) if transposed else (k.shape[-1], k.shape[-2])
    if not _known(q.shape[-1] == head):
        return f"q's head dim {q.shape[-1]} is not provably k's {head}"
    if not _known(k_len == v.shape[-2]):
        return f"k has {k_len} keys, v {v.shape[-2]}: not provably equal"
    # Leading dims: batch (and heads, for 4-D) must agree, except that K/V may have one head
    # shared by every query head (the op's grouped-query form).
    lead = q.dim() - 2
    for i in range(lead):
        a, b, c = q.shape[i], k.shape[i], v.shape[i]
        shared = i == lead - 1 and isinstance(b, int) and b == 1 and _known(c == 1)
        if not (_known(a == b) and _known(b == c)) and not shared:
            return f"q/k/v sizes of dim {i} are {a}, {b}, {c}: not provably equal"
    return None


def _use_reason(inner: torch.fx.Node, user: torch.fx.Node, m: _Match) -> str:
    if inner is m.softmax.node:
        return (
            f"the attention probabilities are also used by '{user.name}' "
            "(e.g. output_attentions=True)"
        )
    if _is_inplace(user):
        return f"'{inner.name}' is modified in place by '{user.name}' ({describe(user)})"
    if op_name(user) in ("expand_as", "view_as") or (
        user.op == "call_method" and user.target in ("size", "dim", "numel", "type_as")
    ):
        return f"the shape or dtype of '{inner.name}' is also read by '{user.name}'"
    return f"'{inner.name}' is also used by '{user.name}'"


def _after_problem(call: Call, q_dtype: torch.dtype) -> str | None:
    if call.op == "dropout":
        refused = call.refuse("input", "p", "training", "inplace")
        if refused is not None:
            return refused
        if not (call["training"] is False or call["p"] == 0):
            return "dropout in training mode: xyserve.attention has no dropout"
        return None
    if call.op == "cast":
        value = _tensor(call.node)
        if value is None or value.device != _tensor(call["input"]).device:
            return f"'{call.node.name}' moves the probabilities to another device"
        return _cast_problem(value.dtype, q_dtype, f"'{call.node.name}'")
    return call.refuse("input", "memory_format")


def _step_problem(step: _Step, q: torch.Tensor, frame: _Frame) -> str | None:
    call = step.call
    node = step.node
    if call.error is not None:
        return call.error
    before, after = _tensor(step.chain), _tensor(node)
    if before is None or after is None:
        return f"'{node.name}' carries no traced tensor value"
    if call.op == "reshape":
        return _view_problem(node, before, after, frame)
    if not _same_shape(before, after):
        return (
            f"'{node.name}' broadcasts the scores {tuple(before.shape)} to {tuple(after.shape)} "
            "(a mask with more dims than the scores)"
        )
    if before.dim() == 4 and frame.heads is None:
        return f"'{node.name}' works on the scores viewed as 4-D, q/k/v are {q.dim()}-D"
    if call.op == "cast":
        if after.device != q.device:
            return f"'{node.name}' moves the scores to another device"
        return _cast_problem(after.dtype, q.dtype, f"'{node.name}'")
    if call.op == "copy":
        return None
    if call.op in ("mul", "div", "add"):
        refused = call.refuse("input", "other")
    elif call.op == "where":
        refused = call.refuse("condition", "input", "other")
    else:
        refused = call.refuse("input", "mask", "value")
    if refused is not None:
        return refused
    if _is_inplace(node) and step.chain is not call.get("input"):
        return f"'{node.name}' modifies a mask in place"
    _, other = _operands(step)
    if call.op in ("mul", "div"):
        if call.op == "div" and call["input"] is not step.chain:
            return f"'{node.name}' divides by the scores"
        if scalar(other) is None:
            return f"scores scaled by a tensor ('{node.name}'); xyserve.attention takes a scalar"
        return None
    if call.op == "add":
        mask = _tensor(unwrapped_mask(call, step.chain))
        if mask is None:
            return None if scalar(other) is not None else f"'{node.name}' adds {other!r}"
        if mask.device != q.device:
            return f"mask on {mask.device}, queries on {q.device}"
        # A bool added to float scores is 0/1 in their dtype: exact in q's too (bool_as_bias).
        exact = mask.dtype == torch.bool or (
            mask.dtype in _WIDTH and _WIDTH[mask.dtype] < _WIDTH[q.dtype]
        )
        if mask.dtype != q.dtype and not exact:
            return (
                f"the mask added by '{node.name}' is {mask.dtype}, q is {q.dtype}: the op takes "
                "the mask in q's dtype, and this one does not convert exactly"
            )
        return mask_broadcast_problem(mask, tuple(before.shape))
    # where / masked_fill
    fill = fill_value(call, other, before.dtype)
    if fill is None or not fill <= -1e30:  # NaN too
        return (
            f"'{node.name}' fills masked scores with {other!r}, not a large negative number "
            f"{before.dtype} holds"
        )
    if math.isfinite(fill) and torch.finfo(q.dtype).min > -1e30:
        # It would reach the op's mask as -inf: 0 on rows masked everywhere, where eager's
        # finite fill gives uniform weights.
        return f"'{node.name}' fills with {fill:g}, which {q.dtype} cannot hold"
    cond = unwrapped_mask(call, step.chain)
    if cond is step.chain:
        return f"'{node.name}' uses the scores as its condition"
    cond_value = _tensor(cond)
    if cond_value is None or cond_value.dtype != torch.bool:
        return f"'{node.name}' has a condition that is not a bool tensor"
    if cond_value.device != q.device:
        return f"mask on {cond_value.device}, queries on {q.device}"
    return mask_broadcast_problem(cond_value, tuple(before.shape))


def _view_problem(
    node: torch.fx.Node, before: torch.Tensor, after: torch.Tensor, frame: _Frame
) -> str | None:
    """A view of the scores may only move between [B·H, Lq, Lk] and the frame's [B, H, Lq, Lk]
    (BART adds its mask per [B, H] that way)."""
    if frame.heads is None or sorted((before.dim(), after.dim())) != [3, 4]:
        return f"'{node.name}' reshapes the scores {tuple(before.shape)} to {tuple(after.shape)}"
    three, four = (before, after) if before.dim() == 3 else (after, before)
    ok = (
        _known(four.shape[1] == frame.heads)
        and _known(four.shape[0] * four.shape[1] == three.shape[0])
        and _known(four.shape[2] == three.shape[1])
        and _known(four.shape[3] == three.shape[2])
    )
    if not ok:
        return f"'{node.name}' reshapes the scores {tuple(before.shape)} to {tuple(after.shape)}"
    return None


class _Replay:
    """Operands of the score chain, moved into the op's frame (module docstring)."""

    def __init__(self, graph: torch.fx.Graph, frame: _Frame) -> None:
        self.graph, self.frame = graph, frame
        self._heads: object = None

    def operand(self, value: object, step: _Step) -> object:
        """``value`` as it broadcasts against the op's [B, H, Lq, Lk] scores: a [B·H, ...]
        operand of scores viewed as 3-D is split into [B, H, ...]."""
        tensor = _tensor(value)
        chain = _tensor(step.chain)
        if tensor is None or self.frame.heads is None or chain.dim() != 3 or tensor.dim() != 3:
            return value
        if isinstance(tensor.shape[0], int) and tensor.shape[0] == 1:
            return value
        return make_node(
            self.graph, "call_method", "unflatten", (value, 0, (-1, self._heads_value()))
        )

    def _heads_value(self) -> object:
        heads = self.frame.heads
        if isinstance(heads, int):
            return heads
        if self._heads is None:  # a symbolic head count: read it from q at run time
            self._heads = make_node(
                self.graph, "call_function", torch.ops.aten.sym_size.int, (self.frame.q, 1)
            )
        return self._heads


def _replay(graph: torch.fx.Graph, m: _Match, frame: _Frame) -> tuple[object, object]:
    """The op's (scale, mask): the score chain replayed on zero scores (module docstring)."""
    moved = _Replay(graph, frame)
    scale: object = 1.0
    for op, factor in (*m.factors, *frame.factors):
        scale = _combine(graph, op, scale, factor)
    zero = True  # the replayed value is still exactly 0
    value: object = 0.0
    only_minus_inf_fills = True
    scaled_after_fill = False  # a later scaling could turn -inf fills into something else
    keep: object = None  # AND of the conditions, for the bool-mask case
    for step in m.steps:
        call = step.call
        if call.op in ("cast", "copy", "reshape"):
            continue
        _, other = _operands(step)
        if call.op in ("mul", "div"):
            factor = scalar(other)
            op = operator.mul if call.op == "mul" else operator.truediv
            scale = _combine(graph, op, scale, factor)
            if not zero:
                value = make_node(graph, "call_function", op, (value, factor))
                scaled_after_fill |= not (isinstance(factor, (int, float)) and factor > 0)
            continue
        if call.op == "add":
            other = unwrapped_mask(call, step.chain)
            if _tensor(other) is None:
                continue  # a constant shift: softmax does not see it
            other = moved.operand(bool_as_bias(graph, other, _tensor(frame.q).dtype), step)
            value = other if zero else make_node(graph, "call_function", torch.add, (value, other))
            zero, only_minus_inf_fills = False, False
            continue
        # where / masked_fill: the condition under which the score is kept
        fill = fill_value(call, other, _tensor(step.chain).dtype)
        if math.isfinite(fill):
            # finfo(float32).min does not fit bfloat16 (it would round to -inf); any fill this
            # large acts the same, so the mask uses the largest negative q's dtype holds.
            fill = max(fill, torch.finfo(_tensor(frame.q).dtype).min)
        cond = unwrapped_mask(call, step.chain)
        if call.op == "masked_fill" or call["input"] is not step.chain:
            cond = make_node(graph, "call_function", torch.logical_not, (cond,))
        cond = moved.operand(cond, step)
        only_minus_inf_fills &= fill == -math.inf
        keep = (
            cond
            if keep is None
            else make_node(graph, "call_function", torch.logical_and, (keep, cond))
        )
        value = make_node(graph, "call_function", torch.where, (cond, value, fill))
        zero = False
    if zero:
        return scale, None
    if only_minus_inf_fills and not scaled_after_fill:
        return scale, _at_least_2d(graph, keep)
    q_dtype = _tensor(frame.q).dtype
    if _tensor(value).dtype != q_dtype:
        value = make_node(graph, "call_method", "to", (value, q_dtype))
    return scale, _at_least_2d(graph, value)


def _at_least_2d(graph: torch.fx.Graph, mask: torch.fx.Node) -> torch.fx.Node:
    """A mask over keys only ([Lk]) as [1, Lk]: SDPA, which providers run, wants 2 dims."""
    missing = 2 - _tensor(mask).dim()
    if missing <= 0:
        return mask
    return make_node(
        graph, "call_function", operator.getitem, (mask, (*(None,) * missing, Ellipsis))
    )


def _combine(graph: torch.fx.Graph, op: object, scale: object, factor: object) -> object:
    if isinstance(factor, (int, float)) and isinstance(scale, (int, float)):
        return op(scale, factor)
    return make_node(graph, "call_function", op, (scale, factor))
