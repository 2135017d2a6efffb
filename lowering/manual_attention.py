"""Attention written out by hand -> torch.ops.xyserve.attention.

The pattern, and how a site is found and read, is in ``manual_attention_match.py``; this module
decides whether a matched site can be lowered, and rewrites it.

Site: every softmax whose input comes from a product of two activations and whose output
reaches a product with an activation is an attention site, lowered or not; this pass lowers
the ones of the pattern's shape. A site left alone says why: an intermediate also used elsewhere
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

import torch
import torch.fx

from xy_inductor.lowering.manual_attention_match import (
    Frame,
    Match,
    Step,
    frame_of,
    is_attention_softmax,
    is_inplace,
    known,
    match_site,
    operands,
    same_shape,
    tensor_value,
)
from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.pass_base import LoweringPass
from xy_inductor.lowering.patterns import (
    make_node,
    mask_broadcast_problem,
    needs_original_strides,
    scalar,
    unrepeat_kv,
)
from xy_inductor.lowering.score_masks import (
    bool_as_bias,
    constant_fill,
    fill_value,
    unwrapped_mask,
)
from xy_inductor.lowering.signatures import Call, describe, op_name

__all__ = ["ManualAttention"]

_SCORE_STEPS = ("mul", "div", "add", "where", "masked_fill", "cast", "copy")
# Floating dtypes by width: a cast may keep or widen the queries' dtype, never narrow it (or
# swap bfloat16 for float16), or the op, which computes in at least the queries' precision,
# would not reproduce eager's rounding.
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _cast_problem(dtype: torch.dtype | None, q_dtype: torch.dtype, what: str) -> str | None:
    if dtype is None or dtype == q_dtype:
        return None
    if dtype not in _WIDTH:
        return f"{what} casts to {dtype}"
    if _WIDTH[dtype] <= _WIDTH[q_dtype]:
        return f"{what} casts to {dtype}, narrower than (or not as wide as) q's {q_dtype}"
    return None


class ManualAttention(LoweringPass):
    name = "manual_attention"
    kind = "attention"
    target = None  # a pattern rather than one call: is_site below

    def __init__(self, settings: LoweringOptions | None = None) -> None:
        super().__init__(settings)
        self._last: tuple[torch.fx.Node, Match | str, Frame | None] | None = None

    def lowered_op(self) -> object:
        return torch.ops.xyserve.attention.default

    def is_site(self, node: torch.fx.Node) -> bool:
        return is_attention_softmax(node)

    def is_lowered(self, node: torch.fx.Node) -> bool:
        return False  # lowered attention is counted once, by the SDPA pass

    def _matched(self, node: torch.fx.Node) -> tuple[Match | str, Frame | None]:
        # why_not, anchor, absorbed and replacement of one site all read one match.
        if self._last is None or self._last[0] is not node:
            m = match_site(node)
            self._last = (node, m, None if isinstance(m, str) else frame_of(m))
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
        q, v = tensor_value(frame.q), tensor_value(frame.v)
        k = tensor_value(frame.k if frame.k is not None else m.kt)
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
        dim, n = m.softmax["dim"], tensor_value(m.softmax.node).dim()
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
        elif tensor_value(anchor).dim() == 3:  # split frame, used as [B·H, Lq, Dv]
            out = make_node(graph, "call_method", "flatten", (out, 0, 1))
        if needs_original_strides(anchor):
            out = make_node(graph, "call_method", "contiguous", (out,))
        return out

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        m, frame = self._matched(node)
        dead = [*m.removed, *m.peeled, *frame.walked]
        for step in m.steps:
            if step.call.op in ("where", "masked_fill"):
                dead += constant_fill(operands(step)[1])
        for t in (frame.k, frame.v):
            rep = unrepeat_kv(t) if t is not None else None
            if rep is not None:
                dead += rep[2]
        return dead


def _shape_problem(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, transposed: bool
) -> str | None:
    k_len, head = (k.shape[-2], k.shape[-1]) if transposed else (k.shape[-1], k.shape[-2])
    if not known(q.shape[-1] == head):
        return f"q's head dim {q.shape[-1]} is not provably k's {head}"
    if not known(k_len == v.shape[-2]):
        return f"k has {k_len} keys, v {v.shape[-2]}: not provably equal"
    # Leading dims: batch (and heads, for 4-D) must agree, except that K/V may have one head
    # shared by every query head (the op's grouped-query form).
    lead = q.dim() - 2
    for i in range(lead):
        a, b, c = q.shape[i], k.shape[i], v.shape[i]
        shared = i == lead - 1 and isinstance(b, int) and b == 1 and known(c == 1)
        if not (known(a == b) and known(b == c)) and not shared:
            return f"q/k/v sizes of dim {i} are {a}, {b}, {c}: not provably equal"
    return None


def _use_reason(inner: torch.fx.Node, user: torch.fx.Node, m: Match) -> str:
    if inner is m.softmax.node:
        return (
            f"the attention probabilities are also used by '{user.name}' "
            "(e.g. output_attentions=True)"
        )
    if is_inplace(user):
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
        value = tensor_value(call.node)
        if value is None or value.device != tensor_value(call["input"]).device:
            return f"'{call.node.name}' moves the probabilities to another device"
        return _cast_problem(value.dtype, q_dtype, f"'{call.node.name}'")
    return call.refuse("input", "memory_format")


def _step_problem(step: Step, q: torch.Tensor, frame: Frame) -> str | None:
    call = step.call
    node = step.node
    if call.error is not None:
        return call.error
    before, after = tensor_value(step.chain), tensor_value(node)
    if before is None or after is None:
        return f"'{node.name}' carries no traced tensor value"
    if call.op == "reshape":
        return _view_problem(node, before, after, frame)
    if not same_shape(before, after):
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
    if is_inplace(node) and step.chain is not call.get("input"):
        return f"'{node.name}' modifies a mask in place"
    _, other = operands(step)
    if call.op in ("mul", "div"):
        if call.op == "div" and call["input"] is not step.chain:
            return f"'{node.name}' divides by the scores"
        if scalar(other) is None:
            return f"scores scaled by a tensor ('{node.name}'); xyserve.attention takes a scalar"
        return None
    if call.op == "add":
        mask = tensor_value(unwrapped_mask(call, step.chain))
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
    cond_value = tensor_value(cond)
    if cond_value is None or cond_value.dtype != torch.bool:
        return f"'{node.name}' has a condition that is not a bool tensor"
    if cond_value.device != q.device:
        return f"mask on {cond_value.device}, queries on {q.device}"
    return mask_broadcast_problem(cond_value, tuple(before.shape))


def _view_problem(
    node: torch.fx.Node, before: torch.Tensor, after: torch.Tensor, frame: Frame
) -> str | None:
    """A view of the scores may only move between [B·H, Lq, Lk] and the frame's [B, H, Lq, Lk]
    (BART adds its mask per [B, H] that way)."""
    if frame.heads is None or sorted((before.dim(), after.dim())) != [3, 4]:
        return f"'{node.name}' reshapes the scores {tuple(before.shape)} to {tuple(after.shape)}"
    three, four = (before, after) if before.dim() == 3 else (after, before)
    ok = (
        known(four.shape[1] == frame.heads)
        and known(four.shape[0] * four.shape[1] == three.shape[0])
        and known(four.shape[2] == three.shape[1])
        and known(four.shape[3] == three.shape[2])
    )
    if not ok:
        return f"'{node.name}' reshapes the scores {tuple(before.shape)} to {tuple(after.shape)}"
    return None


class _Replay:
    """Operands of the score chain, moved into the op's frame (module docstring)."""

    def __init__(self, graph: torch.fx.Graph, frame: Frame) -> None:
        self.graph, self.frame = graph, frame
        self._heads: object = None

    def operand(self, value: object, step: Step) -> object:
        """``value`` as it broadcasts against the op's [B, H, Lq, Lk] scores: a [B·H, ...]
        operand of scores viewed as 3-D is split into [B, H, ...]."""
        tensor = tensor_value(value)
        chain = tensor_value(step.chain)
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


def _replay(graph: torch.fx.Graph, m: Match, frame: Frame) -> tuple[object, object]:
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
        _, other = operands(step)
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
            if tensor_value(other) is None:
                continue  # a constant shift: softmax does not see it
            other = moved.operand(bool_as_bias(graph, other, tensor_value(frame.q).dtype), step)
            value = other if zero else make_node(graph, "call_function", torch.add, (value, other))
            zero, only_minus_inf_fills = False, False
            continue
        # where / masked_fill: the condition under which the score is kept
        fill = fill_value(call, other, tensor_value(step.chain).dtype)
        if math.isfinite(fill):
            # finfo(float32).min does not fit bfloat16 (it would round to -inf); any fill this
            # large acts the same, so the mask uses the largest negative q's dtype holds.
            fill = max(fill, torch.finfo(tensor_value(frame.q).dtype).min)
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
    q_dtype = tensor_value(frame.q).dtype
    if tensor_value(value).dtype != q_dtype:
        value = make_node(graph, "call_method", "to", (value, q_dtype))
    return scale, _at_least_2d(graph, value)


def _at_least_2d(graph: torch.fx.Graph, mask: torch.fx.Node) -> torch.fx.Node:
    """A mask over keys only ([Lk]) as [1, Lk]: SDPA, which providers run, wants 2 dims."""
    missing = 2 - tensor_value(mask).dim()
    if missing <= 0:
        return mask
    return make_node(
        graph, "call_function", operator.getitem, (mask, (*(None,) * missing, Ellipsis))
    )


def _combine(graph: torch.fx.Graph, op: object, scale: object, factor: object) -> object:
    if isinstance(factor, (int, float)) and isinstance(scale, (int, float)):
        return op(scale, factor)
    return make_node(graph, "call_function", op, (scale, factor))
