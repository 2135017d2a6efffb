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
  no duck sizing, so that a size of 1 is not specialised and equal sizes are not tied together;
  both only while Dynamo compiles a call (``compile_marks.py``), so steps that run compiled code
  pay nothing for them;
- a prefill of a (left-)padded batch runs packed: only the real tokens, one sequence after
  another, with attention per sequence (``xyserve.attention_packed``, the token table of
  XY-Serve), so linear layers, norms and MLPs compute nothing for padding. The keys and values
  are scattered into the cache in the padded layout decode expects, and only the logits
  ``generate()`` asked for (``logits_to_keep``) are computed;
- a prefill without padding runs in the decode graph once a decode step of the same form has run
  there (a ``DynamicCache``'s layers start with zero-length keys and values, a ``StaticCache`` is
  initialised anyway): packing would save nothing, and the decode graph is the one Inductor
  compiled.

Measured on the tiny Llama workload (prompt lengths 1..511, batches 1..4): 2 graphs with a
``DynamicCache`` (prefill, decode), 1 with a ``StaticCache``.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from xy_inductor.backend import make_backend
from xy_inductor.compile_marks import Marks, compiling
from xy_inductor.config import XyConfig

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PACKED_IMPLEMENTATION",
    "SDPA_IMPLEMENTATION",
    "accelerate",
    "attention_forward",
    "restore",
]

ATTN_IMPLEMENTATION = "xyserve"
SDPA_IMPLEMENTATION = "xyserve_sdpa"
# The attention function of packed prefills. Registered with AttentionInterface only, not with
# AttentionMaskInterface, so Hugging Face builds no mask for it (it needs none: each sequence
# attends to its own tokens, told by cu_seq_lens_q).
PACKED_IMPLEMENTATION = "xyserve_packed"


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


def packed_attention_forward(
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
    """Hugging Face attention function ``"xyserve_packed"``: a batch of one packed row of tokens
    ``[1, H, tokens, D]``, sequence r being the tokens ``cu_seq_lens_q[r] : cu_seq_lens_q[r + 1]``
    (set only by ``accelerate``'s packed prefill)."""
    out = torch.ops.xyserve.attention_packed.default(
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        kwargs["cu_seq_lens_q"],
        True,
        None,
        scaling,
    )
    return out.unsqueeze(0), None


class _PackedKV:
    """The cache a packed prefill runs with. Hugging Face's attention modules hand it each
    layer's packed keys and values (``update``); it copies them into the padded layout the real
    cache holds and returns them as they are: packed attention reads each sequence's own keys.

    ``keys``/``values``: per layer ``[B·L, H, D]``, the padded ``[B, L, H, D]`` flattened;
    ``index``: where each packed token goes (row · L + slot)."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
    ) -> None:
        self.keys = keys
        self.values = values
        self.index = index

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kw
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys[layer_idx].index_copy_(0, self.index, key_states[0].transpose(0, 1))
        self.values[layer_idx].index_copy_(0, self.index, value_states[0].transpose(0, 1))
        return key_states, value_states


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
    AttentionInterface.register(PACKED_IMPLEMENTATION, packed_attention_forward)


def _kv_heads_and_dim(text: Any) -> tuple[int, int]:
    """The KV heads and head size of a text config: what each layer's cached keys have."""
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return heads, getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


# The inputs whose sizes ``_Accelerator.marks`` marks (besides the cache's tensors).
_MARKED = ("input_ids", "inputs_embeds", "position_ids", "cache_position", "attention_mask")


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
        # transformers 5 renamed past_key_values to cache and still takes the old name (its
        # deprecate_kwarg renames it on the way in); so do we, or a cache passed under the old
        # name would reach the graph without its masks prepared and its sizes marked.
        self.cache_alias = (
            "past_key_values"
            if self.cache_arg == "cache" and "past_key_values" not in params
            else None
        )
        self.varargs = any(p.kind is p.VAR_POSITIONAL for p in params.values())
        self.varkw = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self.positions: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.compiled = self._compile(make_backend(config))
        self.pack_reason = self._pack_reason(params)
        """Why prefills of this model do not run packed (None: they do)."""
        self.plain_causal = self._plain_causal()
        """Whether every layer's mask is Hugging Face's plain causal one (``_decode_mask``)."""
        from transformers.cache_utils import Cache, DynamicLayer

        # Read on every call: imported once (an import statement costs a microsecond or so).
        self.cache_class, self.dynamic_layer = Cache, DynamicLayer
        self.encoder_decoder = bool(model.config.is_encoder_decoder)
        self.decode_form: frozenset | None = None
        self.decode_generation: int | None = None
        """The form (``_form``) of a decode step that ran through the compiled code, and the
        ``compiling.generation`` it ran in: while Dynamo still holds that graph, a prefill
        without padding and of the same form runs in it (``_decode_ready``), not packed."""

    def _compile(self, backend: Callable) -> Callable:
        # dynamic=None: the sizes `prepare` marks are symbols from the first trace; anything else
        # (weights, head counts) starts static and turns symbolic only if it changes, like the
        # `cumulative_length` int of a sliding-window cache layer (dynamic=False would
        # specialise every value of it: one graph per decode step).
        return torch.compile(
            self.forward, backend=backend, dynamic=None, fullgraph=self.config.fullgraph
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.compiled, args, kwargs)

    def trace_with(self, backend: Callable, args: tuple, kwargs: dict) -> Any:
        """Run one call through ``backend`` with exactly the preparation ``generate()`` gets
        (a prefill packed as ``generate()``'s would be)."""
        return self._run(self._compile(backend), args, kwargs)

    def _run(self, compiled: Callable, args: tuple, kwargs: dict) -> Any:
        # Bound once: binding the call to the signature is a tenth of this wrapper's cost.
        kw = None if self.varargs else self._bind(args, kwargs)
        if self.pack_reason is None:
            packed = self._packed_prefill(compiled, kw)
            if packed is not None:
                return packed
        form = None
        if self.decode_generation != compiling.generation and kw and self._decode_step(kw):
            form = self._form(kw)  # read before prepare() rewrites kw
        args, kwargs = self.prepare(args, kwargs, kw)
        with compiling(self.marks, kwargs):
            out = compiled(*args, **kwargs)
        if form is not None:
            self.decode_form, self.decode_generation = form, compiling.generation
        return out

    # -- packed prefill: the token table -------------------------------------------------------

    def _pack_reason(self, params: Mapping[str, inspect.Parameter]) -> str | None:
        """Why this model's prefills cannot run packed, or None."""
        config = self.model.config
        if not (self.config.pack_prefill and self.config.lower_attention):
            return "disabled by option (pack_prefill / lower_attention)"
        if self.varargs or self.cache_arg is None or "logits_to_keep" not in params:
            return "its forward takes no cache or logits_to_keep keyword"
        if config.is_encoder_decoder or config.get_text_config() is not config:
            return "not a decoder-only language model"
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            if any(t != "full_attention" for t in layer_types):
                return f"layer types {sorted(set(layer_types))} (packing runs full attention)"
        elif getattr(config, "sliding_window", None) is not None:
            return "sliding-window attention (packing runs full attention)"
        return None

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The call as keywords only (extra keywords flattened in, the cache under its name)."""
        if not args and self.varkw:
            # What generate() does on every step, and what binding would return: each keyword
            # either names a parameter or lands in **kwargs, which is flattened back.
            kw = dict(kwargs)
        else:
            bound = self.signature.bind_partial(*args, **kwargs).arguments
            kw = {}
            for name, value in bound.items():
                if self.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                    kw.update(value)
                else:
                    kw[name] = value
        alias = self.cache_alias
        if alias is not None and alias in kw and self.cache_arg not in kw:
            kw[self.cache_arg] = kw.pop(alias)
        return kw

    def _packed_prefill(self, compiled: Callable, kw: dict[str, Any] | None) -> Any | None:
        """Run a prefill packed (module docstring) and return its output, or None when the call
        is not a prefill that packing serves exactly: a fresh decoder cache, input_ids with a
        left-padded (or no) 2-D mask, and ``logits_to_keep`` (what ``generate()`` passes) no
        larger than the shortest prompt; nothing else asked of the outputs. ``kw`` is the call
        bound to the model's signature (None for a forward taking ``*args``), not changed here."""
        if kw is None:
            return None
        tokens, mask = kw.get("input_ids"), kw.get("attention_mask")
        cache = kw.get(self.cache_arg)
        keep = kw.get("logits_to_keep")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.numel():
            return None
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            return None
        if any(kw.get(k) for k in ("output_attentions", "output_hidden_states", "labels")):
            return None
        if kw.get("inputs_embeds") is not None or kw.get("use_cache") is False:
            return None
        if not self._is_decoder_cache(cache):
            return None
        batch, length = tokens.shape
        device = tokens.device
        self._initialise(cache, batch, device)
        if cache.get_seq_length() != 0:
            return None  # not a prefill: checked first, decode steps pay only for this
        if mask is None:
            mask = torch.ones((batch, length), dtype=torch.bool, device=device)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _padding_of(mask, batch, length)  # generate() builds 4-D masks for static caches
            if mask is None:
                return None
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, length):
            return None
        mask = mask.bool()
        lens = mask.sum(dim=1)
        slots = torch.arange(length, device=device)
        if not torch.equal(mask, slots[None, :] >= length - lens[:, None]):
            return None  # not left-padded (holes, right padding)
        if int(lens.min()) < keep:
            return None  # logits of padding slots asked for
        unpadded = int(lens.min()) == length
        if unpadded and self._decode_serves(kw) and self._decode_ready(cache, batch):
            return None  # the decode graph serves it (_decode_ready)
        packed = _PackedCall.build(self, kw, tokens, mask, lens, cache, keep)
        saved = self.model.config._attn_implementation
        try:
            self.model.config._attn_implementation = PACKED_IMPLEMENTATION
            with compiling(list, packed.marks):
                out = compiled(**packed.kwargs)
        finally:
            self.model.config._attn_implementation = saved
        return packed.finish(out)

    def _decode_ready(self, cache: Any, batch: int) -> bool:
        """Make a fresh cache take a prefill the way it takes a decode step, so that the prefill
        runs in the decode graph, Inductor's code included. Packing a batch without padding
        saves nothing, and its graph runs as traced: measured on the tiny Llama with
        ``inductor=True`` (ad hoc), a 7-token prompt took 2.65 ms this way against 4.19 packed
        with a ``DynamicCache`` (120 tokens: 11.6 against 14.4), 3.9 against 6.0 ms with a
        ``StaticCache``. Only where a decode step of the same form has run in the graph Dynamo
        holds (``_decode_serves``). A static cache is ready as initialised (``_initialise``);
        a dynamic one gets layers of length zero (``_start_empty``). False, and the cache
        untouched, where neither applies or the model's masks are not plain causal ones."""
        if not self.plain_causal:
            return False
        layers = getattr(cache, "layers", None)
        if getattr(cache, "is_compileable", False):
            return bool(layers) and all(getattr(x, "is_initialized", False) for x in layers)
        return self._start_empty(cache, batch)

    def _start_empty(self, cache: Any, batch: int) -> bool:
        """Give a fresh ``DynamicCache``'s layers keys and values of length zero, so that a
        prefill traces as a decode step does (``torch.cat`` onto the cache, the same guards, the
        query length a symbol). Only once a decode graph exists: compiled first, a length of
        zero would be specialised. False, and the cache untouched, unless every layer is an
        uninitialised ``DynamicLayer``."""
        layers = getattr(cache, "layers", None)
        text = self.model.config.get_text_config()
        if not layers or len(layers) != text.num_hidden_layers:
            return False
        if any(type(layer) is not self.dynamic_layer or layer.is_initialized for layer in layers):
            return False
        heads, dim = _kv_heads_and_dim(text)
        device = self.model.device
        for layer in layers:
            # The strides a decode step's cache has, (H·L·D, L·D, D, 1) at L = 0 (an empty
            # tensor's default strides count a zero size as one): Dynamo guards on them.
            keys, values = (
                torch.empty_strided(
                    (batch, heads, 0, dim), (0, 0, dim, 1), dtype=self.model.dtype, device=device
                )
                for _ in range(2)
            )
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
        return True

    def _decode_serves(self, kw: dict[str, Any]) -> bool:
        """Whether the decode graph Dynamo holds takes this prefill: one compiled in this Dynamo
        generation, for a call of the same form."""
        return (
            self.decode_generation is not None
            and self.decode_generation == compiling.registered()
            and self._form(kw) == self.decode_form
        )

    @staticmethod
    def _form(kw: dict[str, Any]) -> frozenset:
        """What Dynamo's guards read of a call besides sizes: which keywords, the dtype, rank
        and device of their tensors, the type of their objects and the value of their scalars.
        The attention mask is left out: ``prepare`` builds the same 4-D form for every call."""
        form = []
        for k, v in kw.items():
            if k == "attention_mask":
                continue
            if isinstance(v, torch.Tensor):
                form.append((k, "tensor", v.dtype, v.dim(), v.device))
            elif v is None or isinstance(v, (bool, int, float, str)):
                form.append((k, type(v), v))
            else:
                form.append((k, type(v)))
        return frozenset(form)

    def _decode_step(self, kw: dict[str, Any]) -> bool:
        """Whether a call (bound to the signature) is a decode step, one new token onto a
        ``DynamicCache`` or a static (compileable) cache."""
        tokens = kw.get("input_ids")
        cache = kw.get(self.cache_arg) if self.cache_arg else None
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[1] != 1:
            return False
        if not self._is_decoder_cache(cache):
            return False
        layers = getattr(cache, "layers", None)
        dynamic = self.dynamic_layer
        static = getattr(cache, "is_compileable", False)
        if not layers or not (static or all(type(layer) is dynamic for layer in layers)):
            return False
        return cache.get_seq_length() > 0

    # -- normalising a call -------------------------------------------------------------------

    def prepare(
        self, args: tuple, kwargs: dict, kw: dict[str, Any] | None = None
    ) -> tuple[tuple, dict]:
        """The call in the one form the compiled code sees: keywords, 4-D masks, a prepared
        cache (its sizes are marked only if Dynamo compiles the call: ``marks``). ``kw``: the
        call already bound to the model's signature (``_bind``), if it was."""
        if self.varargs:
            return args, kwargs
        if kw is None:
            kw = self._bind(args, kwargs)
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
            self._prepare_cache(cache)
        keep = kw.get("logits_to_keep")
        if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0:
            kw["logits_to_keep"] = self._positions_tensor(keep, tokens.device)
        # What ``marks`` marks, as fresh aliases: a tensor object carries its marks, so a mark
        # the caller set on their own tensor stays out of this trace (and ours off theirs).
        for name in _MARKED:
            t = kw.get(name)
            if isinstance(t, torch.Tensor):
                kw[name] = t.detach()
        masks = kw.get("attention_mask")
        if isinstance(masks, dict):
            kw["attention_mask"] = {
                k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in masks.items()
            }
        return (), kw

    def marks(self, kw: dict[str, Any]) -> Marks:
        """The sizes of a prepared call that vary between calls (batch, query and KV lengths),
        as Dynamo must trace them: what ``compiling`` marks while it compiles the call."""
        if self.varargs:
            return []
        tokens = kw.get("input_ids")
        if tokens is None:
            tokens = kw.get("inputs_embeds")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            return []
        batch = tokens.shape[0]
        marks: list[tuple[torch.Tensor, tuple[int, ...]]] = []
        cache = kw.get(self.cache_arg) if self.cache_arg else None
        if self._is_decoder_cache(cache):
            for layer in getattr(cache, "layers", []):
                for attr in ("keys", "values"):
                    t = getattr(layer, attr, None)
                    if isinstance(t, torch.Tensor) and t.dim() == 4:
                        marks.append((t, (0, 2)))
        for name in ("input_ids", "inputs_embeds"):
            if isinstance(kw.get(name), torch.Tensor):
                marks.append((kw[name], (0, 1)))
        for name in ("position_ids", "cache_position"):
            t = kw.get(name)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                # [B, L] or [L]; a batch of 1 broadcast over a larger batch stays static.
                marks.append((t, (-1, -2) if t.dim() >= 2 and t.shape[-2] == batch else (-1,)))
        masks = kw.get("attention_mask")
        for mask in masks.values() if isinstance(masks, dict) else (masks,):
            if not isinstance(mask, torch.Tensor):
                continue
            if mask.dim() == 4:
                marks.append((mask, (0, 2, 3) if mask.shape[0] == batch else (2, 3)))
            else:
                marks.append((mask, (0, 1) if mask.dim() == 2 else (-1,)))
        return marks

    def _is_decoder_cache(self, cache: object) -> bool:
        return isinstance(cache, self.cache_class) and not self.encoder_decoder

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
        heads, head_dim = _kv_heads_and_dim(text)
        cache.early_initialization(batch, heads, head_dim, self.model.dtype, device)

    def _plain_causal(self) -> bool:
        """Whether Hugging Face builds this model's masks as one causal mask and the padding
        mask, nothing else: a causal decoder-only model without per-layer mask types, sliding
        windows, chunked attention or a mask builder of its own."""
        config = self.model.config
        return (
            not config.is_encoder_decoder
            and config.get_text_config() is config
            and getattr(config, "is_causal", True)
            and not hasattr(config, "layer_types")
            and getattr(config, "sliding_window", None) is None
            and getattr(config, "attention_chunk_size", None) is None
            and not hasattr(self.model, "create_masks_for_generate")
        )

    def _decode_mask(self, mask: object, cache: Any, batch: int, length: int) -> Any:
        """The 4-D mask of a decode step built directly, or None where Hugging Face's builder
        must do it. One new query at the end of a full-attention DynamicCache sees every key up
        to and including its own, so its causal mask is the padding mask: ``mask[:, None, None,
        :]`` as bool is what ``create_masks_for_generate`` returns there (values, shape, strides;
        ``tests/test_hf.py`` compares them), in microseconds instead of tens of them."""
        if not (
            self.plain_causal
            and length == 1
            and isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and not mask.dtype.is_floating_point  # bool or integer: HF reads it as bool
            and not mask.dtype.is_complex
        ):
            return None
        layers = getattr(cache, "layers", None)
        dynamic = self.dynamic_layer
        if not layers or any(type(layer) is not dynamic for layer in layers):
            return None
        if tuple(mask.shape) != (batch, cache.get_seq_length() + 1):
            return None
        return mask.bool()[:, None, None, :]

    def _masks(self, kw: dict, cache: Any, batch: int, length: int, device: torch.device) -> Any:
        mask = kw.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            # Already prepared (generate() builds these for static caches): a 4-D mask, a dict
            # of them per layer type, or a flex-attention BlockMask.
            return mask
        if mask is None:
            past = int(cache.get_seq_length())
            mask = torch.ones((batch, past + length), dtype=torch.bool, device=device)
        decode = self._decode_mask(mask, cache, batch, length)
        if decode is not None:
            return decode
        from transformers.masking_utils import create_masks_for_generate

        build = getattr(self.model, "create_masks_for_generate", create_masks_for_generate)
        return build(
            config=self.model.config,
            inputs_embeds=torch.empty((batch, length, 0), dtype=self.model.dtype, device=device),
            attention_mask=mask,
            cache=cache,
            position_ids=kw.get("position_ids"),
        )

    def _prepare_cache(self, cache: Any) -> None:
        for layer in getattr(cache, "layers", []):
            for attr in ("keys", "values"):
                t = getattr(layer, attr, None)
                if not isinstance(t, torch.Tensor) or t.dim() != 4:
                    continue
                _, h, n, d = t.shape
                if t.stride() != (h * n * d, n * d, d, 1):
                    # Dynamo guards on every stride, size-1 dims included (which is_contiguous
                    # ignores). An Inductor-compiled prefill may leave the cache in another
                    # layout than decode produces; one copy avoids a recompile.
                    t = t.clone(memory_format=torch.contiguous_format)
                    setattr(layer, attr, t)
                # Static caches tag their tensors as static inputs, which Dynamo traces with
                # fixed sizes; xyserve does not use CUDA graphs, so the tag only costs graphs.
                if hasattr(t, "_dynamo_static_input_type"):
                    del t._dynamo_static_input_type

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


def _padding_of(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """The 2-D padding mask ``[B, L]`` of a prefill's causal 4-D mask ``[B, 1, L, Lk]`` whose
    rows are left-padded prompts ending at key slot L - 1 (keys after it not yet written), or
    None if it is anything else."""
    from xy_inductor.runtime.attention_plan import rows_from_mask

    if mask.shape[0] not in (1, batch) or mask.shape[2] != length or mask.shape[3] < length:
        return None
    rows = rows_from_mask(mask, batch, length, mask.shape[3])
    if rows is None or not rows.causal:
        return None
    for q_end, q_len, kv_start, kv_len in zip(
        rows.q_end, rows.q_len, rows.kv_start, rows.kv_len, strict=True
    ):
        if q_end != length or q_len != kv_len or kv_start + kv_len != length:
            return None
    lens = torch.tensor(rows.q_len, device=mask.device)
    return torch.arange(length, device=mask.device)[None, :] >= length - lens[:, None]


class _PackedCall:
    """The keyword arguments of one packed prefill, and how its output is put back in the form
    the padded call would have returned."""

    def __init__(
        self,
        kwargs: dict,
        marks: list[tuple[torch.Tensor, tuple[int, ...]]],
        cache: Any,
        dest: _PackedKV,
        batch: int,
        length: int,
        keep: int,
    ) -> None:
        self.kwargs = kwargs
        self.marks = marks
        """The sizes to mark dynamic if Dynamo compiles the call (``compiling``)."""
        self.cache = cache
        self.dest = dest
        self.batch = batch
        self.length = length
        self.keep = keep

    @classmethod
    def build(
        cls,
        acc: _Accelerator,
        kw: dict,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        lens: torch.Tensor,
        cache: Any,
        keep: int,
    ) -> _PackedCall:
        batch, length = tokens.shape
        # Sequence after sequence, in token order. Fresh tensors: nonzero's outputs are views at
        # storage offsets Dynamo would guard on.
        rows, slots = (t.clone() for t in mask.nonzero(as_tuple=True))
        positions = kw.get("position_ids")
        # Hugging Face's default positions of a padded prefill are the slots (0 … L-1).
        packed_positions = slots if positions is None else positions[rows, slots]
        # One more sequence of one token, whose results are dropped: a packed call then always
        # has two tokens and two sequences or more, so no size of its graph is traced as 1
        # (Inductor specialises views of size-1 dims, and the next prompt would recompile).
        device = tokens.device
        one = torch.zeros(1, dtype=torch.int64, device=device)
        cu = torch.zeros(batch + 2, dtype=torch.int64, device=device)
        cu[1:-1] = lens.cumsum(0)
        cu[-1] = cu[-2] + 1
        # The last `keep` tokens of each sequence: what generate() reads the logits of.
        last = (cu[1:-1, None] - keep + torch.arange(keep, device=device)).flatten()
        # The padded K/V of the prompt, handed to the cache's own update() after the call, so
        # every cache kind (dynamic, static) keeps its bookkeeping.
        text = acc.model.config.get_text_config()
        heads, dim = _kv_heads_and_dim(text)
        shape = (batch * length + 1, heads, dim)  # the padded [B, L, H, D], then a spare slot
        dtype = acc.model.dtype
        keys = [tokens.new_zeros(shape, dtype=dtype) for _ in range(text.num_hidden_layers)]
        values = [tokens.new_zeros(shape, dtype=dtype) for _ in range(text.num_hidden_layers)]
        index = torch.cat([rows * length + slots, one + batch * length])
        dest = _PackedKV(keys, values, index)
        packed = {
            k: v
            for k, v in kw.items()
            if k not in ("attention_mask", "position_ids", "cache_position", acc.cache_arg)
        }
        packed.update(
            input_ids=torch.cat([tokens[rows, slots], one.to(tokens.dtype)])[None],
            position_ids=torch.cat([packed_positions, one])[None],
            attention_mask=None,
            logits_to_keep=last,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu.detach(),  # an alias: two inputs, as the padded call has
            use_cache=True,
        )
        packed[acc.cache_arg] = dest
        marks = [(t, (0,)) for t in (*keys, *values, index, last, cu, packed["cu_seq_lens_k"])]
        marks += [(packed["input_ids"], (1,)), (packed["position_ids"], (1,))]
        return cls(packed, marks, cache, dest, batch, length, keep)

    def finish(self, out: Any) -> Any:
        """The output as the padded call returns it: logits ``[B, keep, V]`` and the real cache,
        filled for every layer."""
        b, n = self.batch, self.length
        for i, (k, v) in enumerate(zip(self.dest.keys, self.dest.values, strict=True)):
            # [B·L (+1 spare), H, D] -> [B, H, L, D], the padded prefill's layout.
            self.cache.update(
                k[: b * n].view(b, n, *k.shape[1:]).transpose(1, 2),
                v[: b * n].view(b, n, *v.shape[1:]).transpose(1, 2),
                i,
            )
        out["logits"] = out["logits"].view(self.batch, self.keep, -1)
        # transformers 5 names the output's cache "cache" (4.x: "past_key_values").
        name = next((n for n in ("cache", "past_key_values") if n in out.keys()), None)  # noqa: SIM118 (`in out` maps past_key_values to cache, warning)
        if name is not None:
            out[name] = self.cache
        return out


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
