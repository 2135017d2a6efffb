"""What the wrapper does to the caches handed to an accelerated model, in place and without
changing their contents: allocate a static cache's layers early, give a fresh dynamic cache
zero-length layers, put KV tensors in the layout decode traced, drop static-address tags."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    CacheLayerMixin,
    DynamicLayer,
    LinearAttentionCacheLayerMixin,
)

from xy_inductor.hf.routes import KVShape

__all__ = ["initialise", "prepare", "start_empty"]


def initialise(
    cache: Any,
    batch: int,
    shapes: tuple[KVShape | None, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Allocate a static cache's attention layers before the first call, with the heads and key
    and value sizes the probe saw per layer (``shapes``: they differ under MLA). Allocated
    inside the graph, prefill would trace differently from decode."""
    layers = getattr(cache, "layers", [])
    if not getattr(cache, "is_compileable", False) or len(layers) != len(shapes):
        return
    if torch.is_autocast_enabled(device.type):
        return  # K/V come in autocast's dtype: the layers allocate themselves, as in eager
    for layer, shape in zip(layers, shapes, strict=True):
        if (
            shape is None
            or layer.is_initialized
            or not getattr(layer, "supports_early_init", False)
            or not isinstance(layer, CacheLayerMixin)
            or isinstance(layer, LinearAttentionCacheLayerMixin)
        ):
            continue
        heads, dk, dv = shape
        keys, values = (
            torch.zeros((batch, heads, 0, d), dtype=dtype, device=device) for d in (dk, dv)
        )
        layer.lazy_initialization(keys, values)


def start_empty(
    cache: Any,
    batch: int,
    shapes: tuple[KVShape | None, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> bool:
    """Give a fresh ``DynamicCache``'s layers keys and values of length zero, so that a prefill
    traces as a decode step does (``torch.cat`` onto the cache, the same guards, the query
    length a symbol). False, and the cache untouched, unless every layer is an uninitialised
    ``DynamicLayer``, one per layer the probe saw."""
    layers = getattr(cache, "layers", None)
    if not layers or len(layers) != len(shapes) or None in shapes:
        return False
    if any(type(layer) is not DynamicLayer or layer.is_initialized for layer in layers):
        return False
    for layer, (heads, dk, dv) in zip(layers, shapes, strict=True):
        # The strides a decode step's cache has, (H·L·D, L·D, D, 1) at L = 0 (an empty tensor's
        # default strides count a zero size as one): Dynamo guards on them.
        keys, values = (
            torch.empty_strided((batch, heads, 0, d), (0, 0, d, 1), dtype=dtype, device=device)
            for d in (dk, dv)
        )
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
    return True


def prepare(cache: Any) -> None:
    """Each KV tensor in the contiguous layout decode traced, without a static-address tag."""
    for layer in getattr(cache, "layers", []):
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                continue
            _, h, n, d = t.shape
            if t.stride() != (h * n * d, n * d, d, 1):
                # Dynamo guards on every stride, size-1 dims included (which is_contiguous
                # ignores). An Inductor-compiled prefill may leave the cache in another layout
                # than decode produces; one copy avoids a recompile.
                t = t.clone(memory_format=torch.contiguous_format)
                setattr(layer, attr, t)
            # Static caches tag their tensors as static inputs, which Dynamo traces with fixed
            # sizes; xyserve does not use CUDA graphs, so the tag only costs graphs.
            if hasattr(t, "_dynamo_static_input_type"):
                del t._dynamo_static_input_type
