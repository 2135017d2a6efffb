"""Hugging Face ``generate()`` with xyserve and no recompiles: ``xy_inductor.hf.accelerate(model)``.

Compiling a Hugging Face model's ``forward`` as it is recompiles on every new kind of call: the
guards that fail are Hugging Face's, not the model's (``len(kwargs)`` in a deprecation wrapper,
a cache layer's ``is_initialized``, the identity and strides of static cache tensors, sizes that
happen to be 0 or 1, ``q_length > 1`` in the SDPA integration). ``accelerate`` wraps ``forward``
so that every call reaches the compiled code in the same form:

- the keyword arguments are the same set on every call;
- the 4-D attention masks are built outside the graph, as ``generate()`` itself does for static
  caches, with our mask function that never drops the mask for ``is_causal``, so no branch on
  sequence length enters the graph;
- a static cache is initialised before the first call, so prefill and decode trace the same code;
- attention goes through an ``AttentionInterface`` function (``"xyserve"``) that calls SDPA with
  grouped KV heads and no branch on sequence length; the backend lowers it like any SDPA call;
- ``logits_to_keep=k`` becomes the positions tensor ``[-k..-1]``, which Hugging Face accepts and
  which gathers a contiguous slice (slicing specialises ``F.linear`` on batch 1 under Dynamo);
- batch, query and KV lengths are marked dynamic, and traced with ``backed_size_oblivious`` and
  no duck sizing, so that a size of 1 is not specialised and equal sizes are not tied together.

Measured on the tiny Llama workload (prompt lengths 1..511, batches 1..4): 2 graphs with a
``DynamicCache`` (prefill, decode), 1 with a ``StaticCache``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from xy_inductor.backend import make_backend
from xy_inductor.config import XyConfig

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SDPA_IMPLEMENTATION",
    "accelerate",
    "attention_forward",
    "restore",
]

ATTN_IMPLEMENTATION = "xyserve"
SDPA_IMPLEMENTATION = "xyserve_sdpa"


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
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        # Reached only without a mask (our mask function always builds causal masks): a single
        # query must not use SDPA's top-left causal alignment.
        is_causal = bool(causal) and query.shape[2] > 1
    else:
        is_causal = False
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
    KV heads, no branch on sequence length.

    With dropout (training) it calls SDPA; variants the op does not cover (position biases,
    soft-capping) go to Hugging Face's own SDPA function unchanged.
    """
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, True
    )


def sdpa_forward(
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
    """Hugging Face attention function ``"xyserve_sdpa"`` (for ``lower_attention=False``): plain
    SDPA with grouped KV heads and no branch on sequence length."""
    return _attention(
        module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, False
    )


def _mask_function(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Hugging Face's SDPA mask, but never dropped in favour of ``is_causal`` (which would make
    the graph branch on the query length)."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _register_with_transformers() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in ((ATTN_IMPLEMENTATION, attention_forward), (SDPA_IMPLEMENTATION, sdpa_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask_function)


@contextlib.contextmanager
def _symbolic_sizes() -> Iterator[None]:
    """Trace marked sizes of 1 as symbols, and keep equal sizes as separate symbols."""
    from torch.fx.experimental import _config as fx_config

    # Private settings, so only those this torch version has. Set and restored by hand: the
    # generic config.patch costs about 20 us more, on every call of the model.
    wanted = {"backed_size_oblivious": True, "use_duck_shape": False}
    saved = {k: getattr(fx_config, k) for k in wanted if hasattr(fx_config, k)}
    for k in saved:
        setattr(fx_config, k, wanted[k])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(fx_config, k, v)


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _mark(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    # Mark an alias, not the caller's tensor: marks are attributes of the tensor object.
    alias = t.detach()
    for d in dims:
        torch._dynamo.mark_dynamic(alias, d % t.dim())
    return alias


class _Accelerator:
    """The state ``accelerate`` keeps on a model (as ``model._xyserve_accelerator``)."""

    def __init__(self, model: torch.nn.Module, config: XyConfig) -> None:
        self.model = model
        self.config = config
        self.forward = model.forward
        self.had_instance_forward = "forward" in vars(model)
        self.attn_implementation = model.config._attn_implementation
        generation_config = getattr(model, "generation_config", None)
        self.disable_compile = getattr(generation_config, "disable_compile", None)
        self.signature = inspect.signature(self.forward)
        params = self.signature.parameters
        self.cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        self.varargs = any(p.kind is p.VAR_POSITIONAL for p in params.values())
        self.positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.compiled = self._compile(make_backend(config))

    def _compile(self, backend: Callable) -> Callable:
        # dynamic=None: the sizes `prepare` marks are symbols from the first trace; anything else
        # (weights, head counts) starts static and turns symbolic only if it changes, like the
        # `cumulative_length` int of a sliding-window cache layer (dynamic=False would
        # specialise every value of it: one graph per decode step).
        return torch.compile(
            self.forward, backend=backend, dynamic=None, fullgraph=self.config.fullgraph
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.prepare(args, kwargs)
        with _symbolic_sizes():
            return self.compiled(*args, **kwargs)

    def trace_with(self, backend: Callable, args: tuple, kwargs: dict) -> Any:
        """Run one call through ``backend`` with exactly the preparation ``generate()`` gets."""
        args, kwargs = self.prepare(args, kwargs)
        with _symbolic_sizes():
            return self._compile(backend)(*args, **kwargs)

    # -- normalising a call -------------------------------------------------------------------

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call in the one form the compiled code sees: keywords, 4-D masks, marked sizes."""
        if self.varargs:
            return args, kwargs
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        kw: dict[str, Any] = {}
        for name, value in bound.items():
            if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                kw.update(value)
            else:
                kw[name] = value
        tokens = kw.get("input_ids")
        if tokens is None:
            tokens = kw.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            return (), kw
        batch, length = tokens.shape[:2]
        cache = kw.get(self.cache_arg) if self.cache_arg else None
        if self._is_decoder_cache(cache):
            self._initialise(cache, batch, tokens.device)
            kw["attention_mask"] = self._masks(kw, cache, batch, length, tokens.device)
            self._mark_cache(cache)
        keep = kw.get("logits_to_keep")
        if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0:
            kw["logits_to_keep"] = self._positions_tensor(keep, tokens.device)
        for name in ("input_ids", "inputs_embeds"):
            if isinstance(kw.get(name), torch.Tensor):
                kw[name] = _mark(kw[name], (0, 1))
        for name in ("position_ids", "cache_position"):
            if isinstance(kw.get(name), torch.Tensor) and kw[name].dim() > 0:
                kw[name] = self._mark_positions(kw[name], batch)
        if "attention_mask" in kw:
            kw["attention_mask"] = self._mark_mask(kw["attention_mask"], batch)
        return (), kw

    def _is_decoder_cache(self, cache: object) -> bool:
        from transformers.cache_utils import Cache

        return isinstance(cache, Cache) and not self.model.config.is_encoder_decoder

    def _initialise(self, cache: Any, batch: int, device: torch.device) -> None:
        # A static cache allocates its tensors on the first update: done inside the graph, that
        # makes prefill trace differently from decode. early_initialization is HF's own way to
        # do it ahead of time (as for torch.export).
        layers = getattr(cache, "layers", [])
        if not getattr(cache, "is_compileable", False) or all(
            getattr(layer, "is_initialized", True) for layer in layers
        ):
            return
        text = self.model.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        cache.early_initialization(batch, heads, head_dim, self.model.dtype, device)

    def _masks(self, kw: dict, cache: Any, batch: int, length: int, device: torch.device) -> Any:
        mask = kw.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            # Already prepared (generate() builds these for static caches): a 4-D mask, a dict
            # of them per layer type, or a flex-attention BlockMask.
            return mask
        if mask is None:
            past = int(cache.get_seq_length())
            mask = torch.ones((batch, past + length), dtype=torch.long, device=device)
        from transformers.masking_utils import create_masks_for_generate

        build = getattr(self.model, "create_masks_for_generate", create_masks_for_generate)
        return build(
            config=self.model.config,
            inputs_embeds=torch.empty((batch, length, 0), dtype=self.model.dtype, device=device),
            attention_mask=mask,
            cache=cache,
            position_ids=kw.get("position_ids"),
        )

    def _mark_cache(self, cache: Any) -> None:
        for layer in getattr(cache, "layers", []):
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if not isinstance(t, torch.Tensor) or t.dim() != 4:
                    continue
                if t.stride() != _contiguous_strides(t.shape):
                    # Dynamo guards on every stride, size-1 dims included (which is_contiguous
                    # ignores). An Inductor-compiled prefill may leave the cache in another
                    # layout than decode produces; one copy avoids a recompile.
                    t = t.clone(memory_format=torch.contiguous_format)
                    setattr(layer, attr, t)
                # Static caches tag their tensors as static inputs, which Dynamo traces with
                # fixed sizes; xyserve does not use CUDA graphs, so the tag only costs graphs.
                if hasattr(t, "_dynamo_static_input_type"):
                    del t._dynamo_static_input_type
                torch._dynamo.mark_dynamic(t, 0)
                torch._dynamo.mark_dynamic(t, 2)

    def _mark_positions(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        # [B, L] or [L]; a batch of 1 broadcast over a larger batch stays static.
        dims = (-1, -2) if t.dim() >= 2 and t.shape[-2] == batch else (-1,)
        return _mark(t, dims)

    def _mark_mask(self, mask: object, batch: int) -> object:
        if isinstance(mask, dict):
            return {k: self._mark_mask(v, batch) for k, v in mask.items()}
        if not isinstance(mask, torch.Tensor):
            return mask
        if mask.dim() == 4:
            return _mark(mask, (0, 2, 3) if mask.shape[0] == batch else (2, 3))
        return _mark(mask, (0, 1) if mask.dim() == 2 else (-1,))

    def _positions_tensor(self, keep: int, device: torch.device) -> torch.Tensor:
        key = (keep, device)
        if key not in self.positions:
            self.positions[key] = torch.arange(-keep, 0, device=device)
        return self.positions[key]

    def restore(self) -> None:
        if self.had_instance_forward:
            self.model.forward = self.forward
        else:
            del self.model.forward
        self.model.set_attn_implementation(self.attn_implementation)
        if self.disable_compile is not None:
            self.model.generation_config.disable_compile = self.disable_compile
        del self.model._xyserve_accelerator


def accelerate(model: torch.nn.Module, **options: object) -> torch.nn.Module:
    """Make ``model.generate()`` (and calls of ``model``) run through xyserve, in place.

    ``options`` are the fields of ``XyConfig``. The model's ``forward`` is replaced by a wrapper
    with the same signature, its attention implementation is set to ``"xyserve"``, and Hugging
    Face's own auto-compilation is turned off for it; ``restore(model)`` undoes all three.
    Caches passed to the model are prepared in place, without changing their contents: a static
    cache is initialised early, KV tensors are made contiguous, and their static-address tag
    (used only by CUDA graphs) is dropped. Returns the model.
    """
    for attr in ("config", "forward"):
        if not hasattr(model, attr):
            raise ValueError(
                f"xy_inductor.hf.accelerate expects a Hugging Face PreTrainedModel, got "
                f"{type(model).__name__} (it has no .{attr})"
            )
    config = XyConfig.from_options(options)
    if getattr(model, "_xyserve_accelerator", None) is not None:
        restore(model)
    _register_with_transformers()
    accelerator = _Accelerator(model, config)  # records what restore() puts back
    implementation = ATTN_IMPLEMENTATION if config.lower_attention else SDPA_IMPLEMENTATION
    model.set_attn_implementation(implementation)
    if model.config._attn_implementation != implementation:
        warnings.warn(
            f"xyserve: {type(model).__name__} does not take Hugging Face attention functions; "
            "its attention is traced as written, which may add graphs",
            stacklevel=2,
        )
    if getattr(model, "generation_config", None) is not None:
        # HF would otherwise wrap __call__ in its own torch.compile on CUDA.
        model.generation_config.disable_compile = True
    model._xyserve_accelerator = accelerator

    @functools.wraps(accelerator.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return accelerator(*args, **kwargs)

    model.forward = forward
    return model


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``accelerate``: original ``forward``, attention implementation, HF compile flag."""
    accelerator = getattr(model, "_xyserve_accelerator", None)
    if accelerator is None:
        raise ValueError(f"{type(model).__name__} was not accelerated by xy_inductor.hf.accelerate")
    accelerator.restore()
    return model
