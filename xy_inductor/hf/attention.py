"""xyserve's Hugging Face attention functions, registered with transformers' ``AttentionInterface``.

``"xyserve"`` runs a layer's attention as ``torch.ops.xyserve.attention`` (or, in a packed
prefill, ``xyserve.attention_packed``); ``"xyserve_traced"`` (``lower_attention=False``) as plain
SDPA. Both take grouped KV heads as they are and never branch on the sequence length.

A layer's call reaches the op only when every argument it passes is one whose meaning the op
covers (``IGNORED``, or None). Sparse attention's top-k ``indices`` are folded into the mask as
the models passing them do for SDPA. Any other argument (attention sinks ``s_aux``/``sinks``,
soft-capping ``softcap``, T5's ``position_bias``, …) sends the call, unchanged, to the function
the model ran before it was accelerated: eager's answer for whatever that variant means, traced
like the rest of the model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FALLBACK_ATTRIBUTE",
    "IGNORED",
    "PACKED_KEY",
    "TRACED_IMPLEMENTATION",
    "attention_forward",
    "register",
    "traced_forward",
]

ATTN_IMPLEMENTATION = "xyserve"
TRACED_IMPLEMENTATION = "xyserve_traced"
# (No "sdpa" in the name: transformers runs its SDPA availability checks on any name with it.)

PACKED_KEY = "xyserve_cu_seq_lens"
"""The keyword a packed prefill passes down to every attention call: the sequences' token
offsets. A private name, so a user's own ``cu_seq_lens_q`` keeps the meaning SDPA gives it."""

FALLBACK_ATTRIBUTE = "_xyserve_fallback_implementation"
"""Set on each config of an accelerated model: the attention implementation it had before,
which serves the variants the op does not cover."""

IGNORED = frozenset(
    {
        # Already applied before attention (rotary embeddings) or only read by other kernels
        # (flash attention's varlen arguments): SDPA's function ignores them too.
        "position_ids",
        "cache_position",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        # The mask carries the window (the mask builders apply it); SDPA ignores it as well.
        "sliding_window",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)
"""Keywords of an attention call whose meaning the op covers, whatever their value."""


def _variant(kwargs: dict[str, Any]) -> str | None:
    """The first keyword whose meaning the op does not cover, or None."""
    for name, value in kwargs.items():
        if value is not None and name not in IGNORED and name != PACKED_KEY:
            return name
    return None


def _fallback(
    module: torch.nn.Module, mask: torch.Tensor | None, dtype: torch.dtype
) -> tuple[Callable[..., tuple[torch.Tensor, Any]], torch.Tensor | None]:
    """The attention function ``module``'s model ran before it was accelerated, and ``mask`` (built
    by SDPA's mask function) as that function's own mask function would have built it."""
    config = getattr(module, "config", None)
    implementation = getattr(config, FALLBACK_ATTRIBUTE, None)
    if implementation is None:
        raise NotImplementedError(
            f"xyserve: {type(module).__name__} passes an attention variant the op does not "
            "cover, and its model's own attention implementation is not known (the layer has "
            "no accelerated .config)"
        )
    if implementation == "sdpa":
        return ALL_ATTENTION_FUNCTIONS[implementation], mask
    if implementation != "eager":
        raise NotImplementedError(
            f"xyserve: {type(module).__name__} passes an attention variant the op does not "
            f"cover, and its model's own implementation ({implementation}) takes other masks"
        )
    # Hugging Face's modeling files call `get_interface(name, eager_attention_forward)`: the
    # module-level function of the layer's own file is what "eager" means for it.
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"xyserve: {type(module).__name__} passes an attention variant the op does not "
            f"cover, and {type(module).__module__} has no eager_attention_forward to serve it"
        )
    if mask is not None and mask.dtype == torch.bool:
        # What transformers' eager_mask makes of the same boolean mask.
        mask = torch.where(mask, torch.tensor(0.0, dtype=dtype), torch.finfo(dtype).min)
    return eager, mask


def _sparse_mask(mask: torch.Tensor | None, indices: torch.Tensor, keys: int) -> torch.Tensor:
    """``mask`` with only the keys ``indices`` selects per query (``[B, S, top-k]`` key
    positions, from a sparse-attention indexer), as DeepSeek-V3.2, GLM-MoE-DSA, dots3, HY-V4 and
    AXK2 fold them into their mask for SDPA and eager attention, and pass them to other
    implementations instead."""
    batch, length = indices.shape[:2]
    dropped = (
        indices.new_ones((batch, length, keys), dtype=torch.bool)
        .scatter(-1, indices.long(), False)
        .unsqueeze(1)
    )
    if mask is None:
        return ~dropped
    if mask.dtype == torch.bool:
        return mask & ~dropped
    return mask.masked_fill(dropped, torch.finfo(mask.dtype).min)


def _autocast(tensors: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """The tensors as SDPA sees them under ``torch.autocast``: floating ones in its dtype (SDPA is
    on autocast's lower-precision list; rotary embeddings leave q and k in float32 there)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t is not None and t.dtype.is_floating_point else t for t in tensors)


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict,
    use_op: bool,
) -> tuple[torch.Tensor, None]:
    indices = kwargs.pop("indices", None)
    if PACKED_KEY in kwargs:
        variant = "indices" if indices is not None else _variant(kwargs)
        return _packed(module, query, key, value, scaling, is_causal, kwargs, variant)
    if indices is not None:
        attention_mask = _sparse_mask(attention_mask, indices, key.shape[2])
    variant = _variant(kwargs)
    if variant is not None:
        fallback, mask = _fallback(module, attention_mask, query.dtype)
        # As the modeling files call it: everything after the mask by keyword.
        if is_causal is not None:
            kwargs["is_causal"] = is_causal
        return fallback(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    query, key, value, attention_mask = _autocast((query, key, value, attention_mask))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Only without a mask; a single query must not use SDPA's top-left causal alignment.
    is_causal = attention_mask is None and bool(causal) and query.shape[2] > 1
    mask_ok = attention_mask is None or attention_mask.dtype in (torch.bool, query.dtype)
    if use_op and dropout == 0.0 and mask_ok:
        # The op's output is laid out [B, L, H, D]: the transpose below is contiguous for any
        # length, so the traced graph carries no guard on it (SDPA's layout can depend on the
        # strides of q/k/v, and then .contiguous() guards on q_len != 1).
        out = torch.ops.xyserve.attention.default(
            query, key, value, attention_mask, is_causal, scaling
        )
    else:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
            enable_gqa=query.shape[1] != key.shape[1],
        )
    return out.transpose(1, 2).contiguous(), None


def _packed(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict,
    variant: str | None,
) -> tuple[torch.Tensor, None]:
    """A packed prefill's layer: one row of tokens ``[1, H, tokens, D]``, sequence r being the
    tokens ``cu[r] : cu[r + 1]`` of ``kwargs[PACKED_KEY]``. The mask Hugging Face built for the
    row (one causal mask over every sequence) is not read."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if variant is not None or not causal or query.shape[0] != 1:
        # accelerate() probes each model before it packs (routes.py): a layer of this kind
        # turns the packed route off there, so a run never gets here.
        raise NotImplementedError(
            f"xyserve: {type(module).__name__} cannot run packed ("
            + (f"it passes {variant!r}" if variant else "not causal or not one row")
            + ")"
        )
    query, key, value = _autocast((query, key, value))
    out = torch.ops.xyserve.attention_packed.default(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        kwargs[PACKED_KEY],
        True,
        None,
        scaling,
    )
    return out.unsqueeze(0), None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function ``"xyserve"``: ``torch.ops.xyserve.attention``, grouped
    KV heads, no branch on sequence length. With dropout (training) it calls SDPA; variants the
    op does not cover go to the model's own implementation (module docstring)."""
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, True
    )


def traced_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Hugging Face attention function ``"xyserve_traced"`` (for ``lower_attention=False``):
    plain SDPA with grouped KV heads and no branch on sequence length."""
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, False
    )


def _mask_function(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The mask the model's own implementation takes: eager's float mask for a model that ran
    eager attention (some extend or pad it as floats before attention), else SDPA's boolean one,
    but never dropped in favour of ``is_causal`` (the graph would branch on the query length)."""
    if getattr(kwargs.get("config"), FALLBACK_ATTRIBUTE, None) == "eager":
        return eager_mask(*args, **kwargs)
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register both functions and their mask function with transformers (idempotent)."""
    for name, fn in (
        (ATTN_IMPLEMENTATION, attention_forward),
        (TRACED_IMPLEMENTATION, traced_forward),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask_function)
