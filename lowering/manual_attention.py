"""Attention written out by hand -> torch.ops.xyserve.attention.

The shape, as Hugging Face's ``eager`` attention writes it for Llama, Qwen2, Mistral, Gemma,
Phi-3, GPT-2 and BERT (transformers 5.x), and as most hand-written models do::

    scores = q @ k.transpose(-1, -2)          # or torch.matmul, .transpose(2, 3), .permute
    scores = scores * scale                   # or / sqrt(d) (GPT-2: / torch.full([], ...)),
                                              # or none: a scale folded into q or k stays there
    scores = scores + mask                    # additive (ALiBi biases too); or
                                              # torch.where(bool, scores, fill) or
                                              # scores.masked_fill(bool, fill); any order
    probs = softmax(scores, dim=-1)           # optionally in float32 (dtype= or a cast)
    probs = probs.to(q.dtype)                 # optional cast back
    probs = dropout(probs, p, training=False) # optional, inference only
    out = probs @ v

K and V may be repeated to the query heads first (``repeat_kv``); the op reads them
un-repeated. The site is the final ``probs @ v``; it lowers when every intermediate from
``q @ kᵀ`` to ``probs`` feeds only the next step. Left alone, with the reason: an intermediate
used elsewhere (``output_attentions=True`` returns the probabilities), an op between ``q @ kᵀ``
and softmax that the op cannot express (``tanh`` soft-capping, Gemma 2), dropout in training,
a scale that is a tensor, tensors that are not ``[B, H, L, D]``, mixed dtypes or devices.

The op's mask is the score chain replayed on zero scores: the same additions, fills and
scalings, applied to 0 instead of ``q @ kᵀ``, so ``q·k * scale + mask`` is exactly what the
chain computed. Only a chain whose sole effect is filling with ``-inf`` becomes a bool mask;
a fill with ``finfo.min``, as Hugging Face writes it, stays additive, which keeps eager's result
(uniform weights, not zeros) on rows where every key is masked.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx

from xy_inductor.lowering.pass_base import LoweringPass, fake_value
from xy_inductor.lowering.patterns import is_op, make_node, scalar, unrepeat_kv

__all__ = ["ManualAttention"]

_MAX_CHAIN = 8  # ops between q @ kᵀ and softmax; real models use two or three
_SCORE_STEPS = ("mul", "div", "add", "where", "masked_fill", "cast")


@dataclass(frozen=True)
class _Step:
    node: torch.fx.Node
    chain: torch.fx.Node  # the argument the scores flow in through


@dataclass(frozen=True)
class _Match:
    q: object
    k: object
    v: object
    scores: torch.fx.Node  # q @ kᵀ
    steps: tuple[_Step, ...]  # from scores to softmax, in order
    softmax: torch.fx.Node
    after: tuple[torch.fx.Node, ...]  # casts and dropout from softmax to probs @ v, in order

    @property
    def intermediates(self) -> list[torch.fx.Node]:
        """Everything the rewrite replaces, from the output side back to q @ kᵀ."""
        return [
            *reversed(self.after),
            self.softmax,
            *(s.node for s in reversed(self.steps)),
            self.scores,
        ]


def _k_of_transpose(node: object) -> object | None:
    """``k`` if ``node`` is a 4-D ``k`` with its last two dims swapped."""
    value = fake_value(node)
    if not isinstance(value, torch.Tensor) or value.dim() != 4:
        return None
    if is_op(node, "transpose"):
        dims = sorted(d % 4 for d in node.args[1:3])
        return node.args[0] if dims == [2, 3] else None
    if is_op(node, "permute"):
        order = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return node.args[0] if tuple(order) == (0, 1, 3, 2) else None
    return None


def _is_scores(node: object) -> bool:
    return (
        is_op(node, "matmul") and len(node.args) == 2 and _k_of_transpose(node.args[1]) is not None
    )


def _path_to_scores(node: object, depth: int) -> list[_Step] | None:
    """The steps from ``q @ kᵀ`` up to ``node`` (exclusive of the matmul), following whichever
    argument leads there; None if none does within ``depth`` ops."""
    if _is_scores(node):
        return []
    if depth == 0 or not isinstance(node, torch.fx.Node):
        return None
    if node.op not in ("call_function", "call_method"):
        return None
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, torch.fx.Node) and isinstance(fake_value(arg), torch.Tensor):
            path = _path_to_scores(arg, depth - 1)
            if path is not None:
                return [*path, _Step(node, arg)]
    return None


def _match(node: torch.fx.Node) -> _Match | None:
    """The hand-written attention ending at ``node`` (a ``probs @ v``), if it is one."""
    if not is_op(node, "matmul") or len(node.args) != 2:
        return None
    probs, v = node.args
    after = []
    while is_op(probs, "cast", "dropout") and probs.args:
        after.append(probs)
        probs = probs.args[0]
    if not is_op(probs, "softmax"):
        return None
    steps = _path_to_scores(probs.args[0], _MAX_CHAIN)
    if steps is None:
        return None
    scores = steps[0].chain if steps else probs.args[0]
    k = _k_of_transpose(scores.args[1])
    return _Match(scores.args[0], k, v, scores, tuple(steps), probs, tuple(reversed(after)))


def _other(step: _Step) -> object:
    """The operand of a binary step that is not the scores."""
    a, b = step.node.args[:2]
    return b if a is step.chain else a


def _fill(step: _Step) -> object:
    """What a where/masked_fill step writes where it does not keep the score."""
    if is_op(step.node, "masked_fill"):
        return step.node.args[2]
    _cond, a, b = step.node.args[:3]
    return b if a is step.chain else a


def _dropout_is_identity(node: torch.fx.Node) -> bool:
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    return training is False or p == 0


class ManualAttention(LoweringPass):
    name = "manual_attention"
    kind = "attention"
    target = None  # a pattern rather than one call: is_site below

    def lowered_op(self) -> object:
        return torch.ops.xyserve.attention.default

    def is_site(self, node: torch.fx.Node) -> bool:
        return _match(node) is not None

    def is_lowered(self, node: torch.fx.Node) -> bool:
        return False  # lowered attention is counted once, by the SDPA pass

    def why_not(self, node: torch.fx.Node) -> str | None:
        m = _match(node)
        for step in m.steps:
            if not is_op(step.node, *_SCORE_STEPS):
                name = getattr(step.node.target, "__name__", step.node.target)
                return (
                    f"'{name}' between q @ kᵀ and softmax (logit soft-capping?) is not "
                    "expressible by xyserve.attention"
                )
        # Each intermediate must feed only the next step; otherwise (output_attentions=True
        # returns the probabilities) the rewrite would have to keep computing it.
        for inner in m.intermediates:
            if len(inner.users) != 1:
                what = "the attention probabilities" if inner is m.softmax else f"'{inner.name}'"
                return f"{what} also used elsewhere (e.g. output_attentions=True)"
        for node_after in m.after:
            if is_op(node_after, "dropout") and not _dropout_is_identity(node_after):
                return "dropout in training mode: xyserve.attention has no dropout"
        dim = m.softmax.args[1] if len(m.softmax.args) > 1 else m.softmax.kwargs.get("dim")
        if dim not in (-1, 3):
            return f"softmax over dim {dim}, not the last"
        q, k, v = (fake_value(t) for t in (m.q, m.k, m.v))
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v)):
            return "q/k/v are not [B, H, L, D]"
        if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
            return f"q/k/v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one floating dtype"
        if not (q.device == k.device == v.device):
            return f"q/k/v devices differ: {q.device}, {k.device}, {v.device}"
        for step in m.steps:
            problem = _step_problem(step, q)
            if problem is not None:
                return problem
        return None

    def replacement(self, node: torch.fx.Node) -> tuple[object, tuple, dict]:
        m = _match(node)
        graph = node.graph
        k, v = m.k, m.v
        k_rep, v_rep = unrepeat_kv(k), unrepeat_kv(v)
        if k_rep is not None and v_rep is not None and k_rep[1] == v_rep[1]:
            k, v = k_rep[0], v_rep[0]
        scale, mask = _replay(graph, m)
        return self.lowered_op(), (m.q, k, v, mask, False, scale), {}

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        m = _match(node)
        dead = [*m.intermediates, m.scores.args[1]]
        for t in (m.k, m.v):
            rep = unrepeat_kv(t)
            if rep is not None:
                dead += rep[2]
        return dead


def _step_problem(step: _Step, q: torch.Tensor) -> str | None:
    node = step.node
    if is_op(node, "mul", "div"):
        if is_op(node, "div") and node.args[0] is not step.chain:
            return f"'{node.name}' divides by the scores"
        if scalar(_other(step)) is None:
            return f"scores scaled by a tensor ('{node.name}'); xyserve.attention takes a scalar"
    elif is_op(node, "add"):
        other = fake_value(_other(step))
        if isinstance(other, torch.Tensor) and other.device != q.device:
            return f"mask on {other.device}, queries on {q.device}"
    elif is_op(node, "where", "masked_fill"):
        fill = scalar(_fill(step))
        if not isinstance(fill, (int, float)) or fill > -1e30:
            return f"'{node.name}' fills masked scores with {_fill(step)!r}, not a large negative"
        if is_op(node, "where") and node.args[0] is step.chain:
            return f"'{node.name}' uses the scores as its condition"
    return None


def _replay(graph: torch.fx.Graph, m: _Match) -> tuple[object, object]:
    """The op's (scale, mask): the score chain replayed on zero scores (module docstring)."""
    scale: object = 1.0
    zero = True  # the replayed value is still exactly 0
    value: object = 0.0
    only_minus_inf_fills = True
    keep: object = None  # AND of the conditions, for the bool-mask case
    for step in m.steps:
        node = step.node
        if is_op(node, "cast"):
            continue
        if is_op(node, "mul", "div"):
            factor = scalar(_other(step))
            op = operator.mul if is_op(node, "mul") else operator.truediv
            scale = (
                op(scale, factor)
                if isinstance(factor, (int, float)) and isinstance(scale, (int, float))
                else make_node(graph, "call_function", op, (scale, factor))
            )
            if not zero:
                value = make_node(graph, "call_function", op, (value, factor))
            continue
        if is_op(node, "add"):
            other = _other(step)
            if not isinstance(fake_value(other), torch.Tensor):
                continue  # a constant shift: softmax does not see it
            value = other if zero else make_node(graph, "call_function", torch.add, (value, other))
            zero, only_minus_inf_fills = False, False
            continue
        # where / masked_fill: the condition under which the score is kept
        fill = scalar(_fill(step))
        if is_op(node, "masked_fill"):
            cond = make_node(graph, "call_function", torch.logical_not, (node.args[1],))
        elif node.args[1] is step.chain:
            cond = node.args[0]
        else:
            cond = make_node(graph, "call_function", torch.logical_not, (node.args[0],))
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
    if only_minus_inf_fills:
        return scale, keep
    q_dtype = fake_value(m.q).dtype
    if fake_value(value).dtype != q_dtype:
        value = make_node(graph, "call_method", "to", (value, q_dtype))
    return scale, value
