"""The masks of a hand-written score chain, as ``manual_attention.py`` reads them: which operand
of a step is its mask, which broadcast around it only reads a shape, which value a fill writes,
and what a bool tensor added to the scores means.

Spellings read here beyond a plain tensor operand and a Python number:

- ``scores.masked_fill((mask == 0).view(bs, 1, 1, k_len).expand_as(scores), fill)``: DistilBERT
  (transformers 4.x) and PyTorch's own ``_sfdp_pattern_15``/``_20`` (``fuse_attention.py``).
  The ``expand_as`` reads only the shape of the scores; the op broadcasts the mask itself.
- fills that are 0-d tensors: ``torch.tensor(torch.finfo(scores.dtype).min)`` (DistilBERT in
  later transformers 4.x), ``torch.full((), -float("inf"), dtype=query.dtype)`` (``_sfdp``
  patterns), ``torch.full([], finfo.min, dtype=...)`` (GPT-2 before transformers 5).
- ``scores + bool_mask``: type promotion turns the bool into 0/1 of the scores' dtype, an
  additive bias, not a keep-mask (``sfdp_pattern_5_v1``/``_v2`` of PyTorch's
  ``test_fused_attention.py``, pytorch/pytorch#100318).
"""

from __future__ import annotations

import math

import torch
import torch.fx

from xy_inductor.lowering.pass_base import fake_value
from xy_inductor.lowering.patterns import make_node
from xy_inductor.lowering.signatures import Call, bind, op_name

__all__ = [
    "bool_as_bias",
    "broadcast_wrapper",
    "constant_fill",
    "fill_value",
    "mask_operand",
    "unwrapped_mask",
]

_MASKING = ("add", "where", "masked_fill")


def mask_operand(call: Call, chain: torch.fx.Node) -> object:
    """The operand of a masking step that is not the scores: the tensor (or number) added, the
    condition of a fill; None for any other step."""
    if call.error is not None or call.op not in _MASKING:
        return None
    if call.op == "masked_fill":
        return call["mask"]
    if call.op == "where":
        return call["condition"]
    return call["other"] if call["input"] is chain else call["input"]


def broadcast_wrapper(call: Call, chain: torch.fx.Node) -> list[torch.fx.Node]:
    """The ``expand``/``expand_as``/``broadcast_to`` around a step's mask (the node, then the
    ``size()`` calls it alone reads), which the op's own broadcasting makes unnecessary; empty if
    there is none, or if anything else uses it.

    Dropping it is exact whatever it expands to: the step's result has the scores' shape (the
    matcher checks), so the mask broadcasts to it directly with the same values. Only its shape
    argument may read the scores (``expand_as(scores)``, or ``scores.size()``, which
    ``mask.expand(scores.shape)`` becomes under dynamic shapes)."""
    mask = mask_operand(call, chain)
    if op_name(mask) not in ("expand", "expand_as") or len(mask.users) != 1:
        return []
    expand = bind(mask)
    if expand.error is not None or not isinstance(fake_value(expand["input"]), torch.Tensor):
        return []
    sizes = [
        a
        for a in mask.all_input_nodes
        if a.op == "call_method" and a.target == "size" and len(a.users) == 1
    ]
    return [mask, *sizes]


def unwrapped_mask(call: Call, chain: torch.fx.Node) -> object:
    """The step's mask without its ``broadcast_wrapper``: what the op is given."""
    mask = mask_operand(call, chain)
    return bind(mask)["input"] if broadcast_wrapper(call, chain) else mask


def fill_value(call: Call, fill: object, scores: torch.dtype) -> float | None:
    """The number a ``where``/``masked_fill`` step writes into scores of dtype ``scores``, rounded
    as eager rounds it; None if ``fill`` is no constant number (or one held by an integer
    tensor), or if eager would raise.

    Rounding matters at the edge of the range: ``torch.where(keep, s, finfo(float32).min)`` on
    bfloat16 scores writes -inf (a fully masked row is NaN in eager), not a large finite value
    (uniform weights). ``masked_fill`` refuses to round a finite value to inf: it raises."""
    value, held_as = _constant(fill)
    if value is None:
        return None
    if held_as is not None:  # a 0-d tensor holds the value in its own dtype first
        if not held_as.is_floating_point:
            return None  # an integer tensor: no fill it holds is a large negative
        value = _rounded(value, held_as)
    written = _rounded(value, scores)
    if call.op == "masked_fill" and math.isfinite(value) and not math.isfinite(written):
        return None
    return written


def constant_fill(fill: object) -> list[torch.fx.Node]:
    """``[fill]`` if it is a 0-d tensor made from a constant (``torch.tensor(c)``,
    ``torch.full((), c)``): once its step is rewritten it may be unused, and is erased then."""
    if isinstance(fill, torch.fx.Node) and _constant(fill)[0] is not None:
        return [fill]
    return []


def bool_as_bias(graph: torch.fx.Graph, mask: torch.fx.Node, dtype: torch.dtype) -> object:
    """``mask`` as the additive 0/1 it is when added to float scores. The op reads a bool mask
    as keep/drop, so a bool added to the scores reaches it cast to ``dtype`` (exact: 0 and 1)."""
    value = fake_value(mask)
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        return make_node(graph, "call_method", "to", (mask, dtype))
    return mask


def _constant(arg: object) -> tuple[float | None, torch.dtype | None]:
    """(the number, the dtype of the 0-d tensor holding it, or None for a Python number);
    (None, None) if ``arg`` is not a constant number."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return _as_float(arg), None
    if op_name(arg) not in ("full", "tensor"):
        return None, None
    call = bind(arg)
    value = fake_value(arg)
    if not isinstance(value, torch.Tensor) or value.dim() != 0 or call.error is not None:
        return None, None
    if call.op == "full":
        refused = call.refuse("size", "fill_value", "dtype", "device")
        number = call["fill_value"]
    else:
        refused = call.refuse("data", "dtype", "device")
        number = call["data"]
    if refused is not None or isinstance(number, bool) or not isinstance(number, (int, float)):
        return None, None
    number = _as_float(number)
    return (number, value.dtype) if number is not None else (None, None)


def _as_float(number: float) -> float | None:
    try:
        return float(number)
    except OverflowError:  # an int beyond float64: eager raises on it too
        return None


def _rounded(value: float, dtype: torch.dtype) -> float:
    return torch.tensor(value, dtype=torch.float64).to(dtype).item()
