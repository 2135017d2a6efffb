"""The wrapper ``accelerate`` puts on a model's ``forward``: every call in one form for Dynamo.

Compiling a Hugging Face model's ``forward`` as it is recompiles on every new kind of call: the
guards that fail are Hugging Face's, not the model's (``len(kwargs)`` in a deprecation wrapper,
a cache layer's ``is_initialized``, the identity and strides of static cache tensors, sizes that
happen to be 0 or 1, ``q_length > 1`` in the SDPA integration). Where the model's probe showed
it exact (``routes.py``, the *prepared* route), the wrapper hands every call to the compiled
code in one form:

- the keyword arguments are the same set on every call;
- the 4-D attention masks are built outside the graph, as ``generate()`` itself does for static
  caches, with a mask function that never drops the mask for ``is_causal``;
- a static cache is initialised before the first call, so prefill and decode trace the same code;
- ``logits_to_keep=k`` becomes the positions tensor ``[-k..-1]``, which Hugging Face accepts and
  which gathers a contiguous slice (slicing specialises ``F.linear`` on batch 1 under Dynamo);
- batch, query and KV lengths are marked dynamic, traced with ``backed_size_oblivious`` and no
  duck sizing, only while Dynamo compiles a call (``compile_marks.py``);
- a left-padded prefill runs packed (``packed.py``), a prefill without padding in the decode
  graph once one exists, and a decode step's mask is built directly: each only where its own
  route was shown exact.

A model whose probe did not show the prepared route exact runs as a plain
``torch.compile(forward, backend="xyserve")``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer
from transformers.masking_utils import create_masks_for_generate

from xy_inductor.backend import make_backend
from xy_inductor.compile_marks import SETTINGS, Marks, compiling
from xy_inductor.config import AccelerateOptions, XyConfig
from xy_inductor.hf import caches
from xy_inductor.hf.attention import FALLBACK_ATTRIBUTE
from xy_inductor.hf.packed import PackedCall, padding_of
from xy_inductor.hf.routes import RouteMismatch, Routes

__all__ = ["Accelerator"]

log = logging.getLogger("xy_inductor")

# The inputs whose sizes ``Accelerator.marks`` marks (besides the cache's tensors).
_MARKED = ("input_ids", "inputs_embeds", "position_ids", "cache_position", "attention_mask")

# The cache layers a packed prefill fills through their own update(): full attention only.
_FULL_LAYERS = (DynamicLayer, StaticLayer)


class Accelerator:
    """The state ``accelerate`` keeps on a model (as ``model._xyserve_accelerator``).

    ``config``: the backend's options; ``options``: ``accelerate``'s own; ``forward``: the
    model's own ``forward``; ``routes``: what its probe showed exact;
    ``run``: the callable calls go to (None: compiled with xyserve, as ``accelerate`` does; the
    probe passes the model's own ``forward``, so a route runs eagerly)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: XyConfig,
        options: AccelerateOptions,
        forward: Callable[..., Any],
        routes: Routes,
        run: Callable[..., Any] | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.options = options
        self.forward = forward
        self.routes = routes
        self.signature = inspect.signature(forward)
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
        self.saved: Any = None
        """What ``accelerate`` changed on the model, to put back (set by ``accelerate``)."""
        self.probing = run is not None
        self.compiled = run if run is not None else self._compile(make_backend(config))
        self.settings: dict[str, object] = dict(SETTINGS)
        """The symbolic-shape settings calls compile with (``compile_marks``); emptied after a
        compile failed with them."""
        self.positions: dict[tuple[int, torch.device], torch.Tensor] = {}
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
            self.forward, backend=backend, dynamic=None, fullgraph=self.options.fullgraph
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(self.compiled, args, kwargs)

    def wrapper(self) -> Callable[..., Any]:
        """What replaces the model's ``forward``: a function with its signature (``generate()``
        reads it to decide what to pass, ``position_ids`` and ``logits_to_keep`` among it)."""

        @functools.wraps(self.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        return forward

    def trace_with(self, backend: Callable, args: tuple, kwargs: dict) -> Any:
        """Run one call through ``backend`` with exactly the preparation ``generate()`` gets
        (a prefill packed as ``generate()``'s would be)."""
        return self._run(self._compile(backend), args, kwargs)

    def _run(self, compiled: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.routes.prepared.taken:
            return self._call(compiled, args, kwargs, _no_marks, None, {})
        # Bound once: binding the call to the signature is a large part of this wrapper's cost.
        kw = None if self.varargs else self._bind(args, kwargs)
        if self.routes.packed_prefill.taken:
            packed = self._packed_prefill(compiled, kw)
            if packed is not None:
                return packed
        form = None
        if self.decode_generation != compiling.generation and kw and self._decode_step(kw):
            form = self._form(kw)  # read before prepare() rewrites kw
        args, kwargs = self.prepare(args, kwargs, kw)
        out = self._call(compiled, args, kwargs, self.marks, kwargs, self.settings)
        if form is not None:
            self.decode_form, self.decode_generation = form, compiling.generation
        return out

    def _call(
        self,
        compiled: Callable,
        args: tuple,
        kwargs: dict,
        marks: Callable[[Any], Marks],
        arg: Any,
        settings: dict[str, object],
    ) -> Any:
        """``compiled(*args, **kwargs)``, announced with its marks and symbolic settings
        (``compile_marks``). Where its compile failed, Dynamo ran the frame as it is; the next
        calls compile without the settings, or, failing again, run the model's own forward."""
        call = compiling(marks, arg, settings)
        with call:
            out = compiled(*args, **kwargs)
        if call.failure is not None and compiled is self.compiled:
            what = f"{type(call.failure).__name__}: {' '.join(str(call.failure).split())[:300]}"
            if settings and self.settings:
                self.settings = {}
                then = "later calls compile without backed_size_oblivious and duck sizing"
            else:
                self.compiled = self.forward
                then = "later calls run the model as it is"
            log.warning("xyserve: a compile failed (%s); that call ran eagerly, %s", what, then)
        return out

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

    # -- packed prefill: the token table -------------------------------------------------------

    def _packed_prefill(self, compiled: Callable, kw: dict[str, Any] | None) -> Any | None:
        """Run a prefill packed (``packed.py``) and return its output, or None when the call is
        not a prefill that packing serves exactly: a fresh full-attention decoder cache,
        input_ids with a left-padded (or no) 2-D mask, position ids given ``[B or 1, L]`` (what
        ``generate()`` passes: the model's own default positions are never guessed), and
        ``logits_to_keep`` no larger than the shortest prompt; nothing else asked of the
        outputs. ``kw``: the call bound to the signature, not changed here."""
        if kw is None:
            return None
        tokens, mask = kw.get("input_ids"), kw.get("attention_mask")
        cache = kw.get(self.cache_arg)
        keep = kw.get("logits_to_keep")
        positions = kw.get("position_ids")
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or not tokens.numel():
            return None
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            return None
        if any(kw.get(k) for k in ("output_attentions", "output_hidden_states", "labels")):
            return None
        if kw.get("inputs_embeds") is not None or kw.get("use_cache") is False:
            return None
        if kw.get("return_dict") is False or kw.get("cache_position") is not None:
            return None
        if not self._is_decoder_cache(cache):
            return None
        batch, length = tokens.shape
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2:
            return None
        if positions.shape[0] not in (1, batch) or positions.shape[1] != length:
            return None
        device = tokens.device
        self._initialise(cache, batch, device)
        if cache.get_seq_length() != 0:
            return None  # not a prefill: checked first, decode steps pay only for this
        if any(type(layer) not in _FULL_LAYERS for layer in cache.layers):
            return None
        if torch.is_autocast_enabled(device.type):
            return None  # the cache's dtype is the one autocast gives K/V, not the model's
        if mask is None:
            mask = torch.ones((batch, length), dtype=torch.bool, device=device)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = padding_of(mask, batch, length)  # generate() builds 4-D masks for static caches
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
        packed = PackedCall.build(
            kw,
            self.cache_arg,
            positions.expand(batch, length),
            tokens,
            mask,
            lens,
            cache,
            keep,
            self.routes.kv_shapes,
            self.model.dtype,
        )
        out = self._call(compiled, (), packed.kwargs, list, packed.marks, self.settings)
        return packed.finish(out)

    def _decode_ready(self, cache: Any, batch: int) -> bool:
        """Make a fresh cache take a prefill the way it takes a decode step, so that the prefill
        runs in the decode graph, Inductor's code included (packing a batch without padding
        saves nothing, and its graph runs as traced). A static cache is ready as initialised
        (``_initialise``); a dynamic one gets layers of length zero (``caches.start_empty``). False,
        and the cache untouched, where neither applies or the route was not shown exact."""
        if not self.routes.decode_prefill.taken or torch.is_autocast_enabled(
            self.model.device.type
        ):
            return False
        layers = getattr(cache, "layers", None)
        if getattr(cache, "is_compileable", False):
            return bool(layers) and all(getattr(x, "is_initialized", False) for x in layers)
        return caches.start_empty(
            cache, batch, self.routes.kv_shapes, self.model.dtype, self.model.device
        )

    def _decode_serves(self, kw: dict[str, Any]) -> bool:
        """Whether the decode graph Dynamo holds takes this prefill: one compiled in this Dynamo
        generation, for a call of the same form (while probing, eagerly: always)."""
        if self.probing:
            return True
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
        static = getattr(cache, "is_compileable", False)
        if not layers or not (static or all(type(layer) is DynamicLayer for layer in layers)):
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
            if self.routes.masks.taken:
                kw["attention_mask"] = self._masks(kw, cache, batch, length, tokens.device)
            caches.prepare(cache)
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
        return isinstance(cache, Cache) and not self.encoder_decoder

    def _initialise(self, cache: Any, batch: int, device: torch.device) -> None:
        caches.initialise(cache, batch, self.routes.kv_shapes, self.model.dtype, device)

    def _decode_mask(self, mask: object, cache: Any, batch: int, length: int) -> Any:
        """The 4-D mask of a decode step built directly, or None where Hugging Face's builder
        must do it. One new query at the end of a full-attention DynamicCache sees every key up
        to and including its own, so its causal mask is the padding mask: ``mask[:, None, None,
        :]`` as bool is what ``create_masks_for_generate`` returns there (values, shape, strides;
        the probe compares them per model), at a fraction of the builder's cost."""
        if not (
            self.routes.decode_mask.taken
            and length == 1
            and isinstance(mask, torch.Tensor)
            and mask.dim() == 2
            and not mask.dtype.is_floating_point  # bool or integer: HF reads it as bool
            and not mask.dtype.is_complex
        ):
            return None
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        if tuple(mask.shape) != (batch, cache.get_seq_length() + 1):
            return None
        keep = mask.bool()[:, None, None, :]
        if getattr(self.model.config, FALLBACK_ATTRIBUTE, None) != "eager":
            return keep
        # What transformers' eager_mask makes of it, for a model that ran eager attention.
        dtype = self.model.dtype
        return torch.where(keep, torch.tensor(0.0, dtype=dtype), torch.finfo(dtype).min)

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
        if decode is None:
            return self.hf_masks(kw, mask, cache, batch, length, device)
        if self.probing:
            theirs = self.hf_masks(kw, mask, cache, batch, length, device)
            same = isinstance(theirs, torch.Tensor) and theirs.dtype == decode.dtype
            if not (same and theirs.shape == decode.shape and torch.equal(theirs, decode)):
                raise RouteMismatch("the decode mask differs from Hugging Face's")
        return decode

    def hf_masks(
        self,
        kw: dict,
        mask: torch.Tensor,
        cache: Any,
        batch: int,
        length: int,
        device: torch.device,
    ) -> Any:
        """The masks Hugging Face's builder makes for this call (the model's own builder if it
        has one), as ``generate()`` builds them for a static cache."""
        build = getattr(self.model, "create_masks_for_generate", create_masks_for_generate)
        return build(
            config=self.model.config,
            inputs_embeds=torch.empty((batch, length, 0), dtype=self.model.dtype, device=device),
            attention_mask=mask,
            cache=cache,
            position_ids=kw.get("position_ids"),
        )

    def _positions_tensor(self, keep: int, device: torch.device) -> torch.Tensor:
        key = (keep, device)
        if key not in self.positions:
            self.positions[key] = torch.arange(-keep, 0, device=device)
        return self.positions[key]


def _no_marks(_arg: object) -> Marks:
    return ()
