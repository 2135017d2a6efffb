"""Symbolic bool flags of ``F.scaled_dot_product_attention``, decided while Dynamo traces.

``F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])`` is a Python
bool in eager. Under ``torch.compile(dynamic=True)`` the head counts are symbols, so the flag is
a ``SymBool``; SDPA's binding only takes a real bool, Dynamo's fake call fails, and Dynamo
breaks the graph there: the call runs in eager between two graphs, where no backend sees it.
``is_causal = q.shape[2] > 1`` does the same.

This registers a Dynamo handler for SDPA that, only for graphs traced for xyserve (the backend
named ``xyserve``, ``xy_inductor.compile``, ``hf.accelerate`` and ``explain``), evaluates such a
flag the way eager does, to its bool value now, with a guard on the condition: a call where it
comes out the other way recompiles, as it would for any shape-dependent branch. The SDPA call
then is in the graph, and is an attention site like any other. Graphs traced for other backends
are untouched: the handler returns None and Dynamo does what it always does.

It uses Dynamo's internal handler table (``TorchInGraphFunctionVariable._get_handlers``); on a
torch where that is missing or SDPA already has a handler, nothing is registered, and such calls
stay graph breaks (correct, just not lowered).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["install"]

log = logging.getLogger("xy_inductor")

SDPA = torch._C._nn.scaled_dot_product_attention
_FLAGS = ("is_causal", "enable_gqa")
_IS_CAUSAL_POSITION = 5  # query, key, value, attn_mask, dropout_p, is_causal


def _traced_for_xyserve(tx: object) -> bool:
    """Whether the graph being traced goes to one of our backends (module docstring)."""
    fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    for _ in range(8):  # Dynamo's wrappers: WrapBackendDebug -> _TorchCompileWrapper -> fn
        if fn is None:
            return False
        if (getattr(fn, "__module__", None) or "").startswith("xy_inductor."):
            return True
        fn = getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
    return False


def _decided(variable: object, tx: object) -> object | None:
    """A constant for a SymBool variable, guarded; None if it is not one or cannot be decided
    (a data-dependent bool: Dynamo's usual graph break is the right answer then)."""
    from torch._dynamo.variables import ConstantVariable, SymNodeVariable

    if not isinstance(variable, SymNodeVariable):
        return None
    if not isinstance(variable.sym_num, torch.SymBool):
        return None
    try:
        return ConstantVariable.create(bool(variable.evaluate_expr(tx.output)))
    except Exception:
        return None


def _sdpa_handler(self: object, tx: object, *args: object, **kwargs: object) -> object | None:
    if not _traced_for_xyserve(tx):
        return None
    args_list = list(args)
    changed = False
    if len(args_list) > _IS_CAUSAL_POSITION:
        constant = _decided(args_list[_IS_CAUSAL_POSITION], tx)
        if constant is not None:
            args_list[_IS_CAUSAL_POSITION], changed = constant, True
    for name in _FLAGS:
        constant = _decided(kwargs.get(name), tx)
        if constant is not None:
            kwargs[name], changed = constant, True
    if not changed:
        return None
    # With the flags now constants this handler declines, and Dynamo records the call.
    return self.call_function(tx, args_list, kwargs)


def install() -> bool:
    """Register the handler once (idempotent); returns whether it is in place."""
    try:
        from torch._dynamo.variables.torch import TorchInGraphFunctionVariable

        handlers = TorchInGraphFunctionVariable._get_handlers()
    except Exception as e:  # a torch without this internal table
        log.debug("xyserve: no Dynamo handler table (%s); symbolic SDPA flags stay graph breaks", e)
        return False
    current = handlers.get(SDPA)
    if current is _sdpa_handler:
        return True
    if current is not None:
        log.debug("xyserve: SDPA already has a Dynamo handler; not replacing it")
        return False
    handlers[SDPA] = _sdpa_handler
    return True
