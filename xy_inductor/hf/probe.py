"""The probe: which of ``accelerate``'s routes one model takes, decided once, by running it.

A route is never taken on a guess about the model. ``decide`` first rules out what the model's
structure excludes (its forward's parameters, its cache layers, its masks), then runs a few
tiny greedy ``generate()`` calls (``PROBES``) twice: with the model as it is, and through the
accelerating wrapper run eagerly (no compile: the compiled code's exactness is the backend's).
Where every call gives the same tokens and logits within the dtype's tolerance, every route
tried is taken. Where not, the prepared route is tried alone (without it, the model runs as a
plain compile), then each other route on top of it.

So a model that computes attention itself, reads its masks in its own way, passes attention
sinks, uses other position ids than it is given, or has cache layers the wrapper does not
know, loses the route it breaks and keeps the others. The probe's op calls are real calls and
count in ``xy_inductor.stats()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import PreTrainedConfig
from transformers.cache_utils import DynamicLayer

from xy_inductor.config import AccelerateOptions, XyConfig
from xy_inductor.hf.accelerator import Accelerator
from xy_inductor.hf.routes import KVShape, Route, Routes

__all__ = ["NEW_TOKENS", "PROBES", "ProbeError", "decide", "plain_causal"]


@dataclass(frozen=True)
class Probe:
    """One ``generate()`` call of the probe."""

    name: str
    cache: str
    """``"dynamic"`` (the model's default) or ``"static"``."""
    lengths: tuple[int, ...]
    """Prompt lengths, left-padded into one batch."""


PROBES = (
    Probe("a left-padded batch", "dynamic", (4, 2)),
    Probe("one prompt without padding", "dynamic", (3,)),
    Probe("a left-padded batch on a static cache", "static", (4, 2)),
)
NEW_TOKENS = 2

WINDOW_FIELDS = ("sliding_window", "attention_chunk_size")
"""Config fields of a length past which a model's masks change (windows, chunks)."""

PROBED_WINDOW = 32
"""Windows up to this length are probed with prompts longer than them; past it, building the
masks outside the graph is not taken (the probe could not show them exact)."""


def _window(model: torch.nn.Module) -> int | None:
    """The longest window or chunk the model's configs set, or None."""
    configs = {id(c): c for c in (model.config, model.config.get_text_config())}.values()
    sizes = [v for c in configs for f in WINDOW_FIELDS if isinstance(v := getattr(c, f, None), int)]
    return max(sizes) if sizes else None


def probes_for(model: torch.nn.Module) -> tuple[Probe, ...]:
    """``PROBES``, and for a model with a short window, the same past its window."""
    window = _window(model)
    if window is None or window > PROBED_WINDOW:
        return PROBES
    lengths = (window + 3, window + 1)
    return (
        *PROBES,
        Probe("left-padded prompts longer than its window", "dynamic", lengths),
        Probe("prompts longer than its window on a static cache", "static", lengths),
    )


TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
"""Largest logit difference that agrees, relative to the largest logit (at least 1): an exact
route differs by rounding only; a dropped term (a sink, a position, a mask) by far more."""


class ProbeError(Exception):
    """The model could not be probed: its own ``generate()`` failed on the probe's calls."""


@dataclass
class _Outcome:
    tokens: torch.Tensor
    logits: torch.Tensor
    cache: Any


def _prompts(probe: Probe, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(probe.lengths)
    ids = torch.zeros((len(probe.lengths), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    low = min(3, vocab - 1)  # past the usual pad, BOS and EOS ids where the vocabulary allows
    for row, n in enumerate(probe.lengths):
        tokens = low + (torch.arange(n, device=device) * 7919 + row * 104729) % (vocab - low)
        ids[row, width - n :] = tokens
        mask[row, width - n :] = 1
    return ids, mask


def _generate(model: torch.nn.Module, probe: Probe) -> _Outcome:
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids, mask = _prompts(probe, vocab, model.device)
    extra = {"cache_implementation": "static"} if probe.cache == "static" else {}
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **extra,
        )
    return _Outcome(out.sequences, torch.stack(out.logits, 1), getattr(out, "cache", None))


def _disagreement(want: _Outcome, got: _Outcome, dtype: torch.dtype) -> str | None:
    """Why ``got`` is not ``want`` (None: it is). Steps are compared in order; once logits agree
    but the greedy tokens differ (a near tie under rounding), later steps cannot be compared."""
    if want.tokens.shape != got.tokens.shape or want.logits.shape != got.logits.shape:
        return f"other output shapes ({tuple(got.tokens.shape)} for {tuple(want.tokens.shape)})"
    tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    start = want.tokens.shape[1] - want.logits.shape[1]
    for step in range(want.logits.shape[1]):
        w, g = want.logits[:, step].double(), got.logits[:, step].double()
        scale = max(1.0, float(w.abs().max()))
        error = float((w - g).abs().nan_to_num(float("inf")).max()) / scale
        if error > tolerance:
            return f"logits of step {step} differ by {error:.1e} (relative)"
        if not torch.equal(want.tokens[:, start + step], got.tokens[:, start + step]):
            return None
    return None


def _kv_shapes(cache: Any) -> tuple[KVShape | None, ...]:
    shapes = []
    for layer in getattr(cache, "layers", []):
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4:
            shapes.append((k.shape[1], k.shape[3], v.shape[3]))
        else:
            shapes.append(None)
    return tuple(shapes)


def plain_causal(model: torch.nn.Module) -> str | None:
    """Why Hugging Face may build this model's masks as more than one causal mask and the
    padding mask (None: it builds just those): per-layer mask types, windows, chunks, a mask
    builder of its own. The probe's calls are too short to show a window, so this is read
    from the config."""
    config = model.config
    if config.is_encoder_decoder or config.get_text_config() is not config:
        return "not a decoder-only language model"
    if not getattr(config, "is_causal", True):
        return "not causal"
    for name in ("layer_types", "sliding_window", "attention_chunk_size"):
        if getattr(config, name, None) is not None:
            return f"its config sets {name} (masks per layer kind)"
    if hasattr(model, "create_masks_for_generate"):
        return "it builds its own masks"
    return None


def packable_signature(params: Mapping[str, inspect.Parameter]) -> str | None:
    """Why calls of a forward with these parameters cannot run packed, or None."""
    if any(p.kind is p.VAR_POSITIONAL for p in params.values()):
        return "its forward takes *args"
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return "its forward takes no **kwargs (to pass the packed sequences to attention)"
    missing = [n for n in ("logits_to_keep", "position_ids") if n not in params]
    if not any(n in params for n in ("cache", "past_key_values")):
        missing.append("cache")
    if missing:
        return f"its forward takes no {', '.join(missing)} keyword"
    return None


def _structural(
    model: torch.nn.Module,
    config: XyConfig,
    options: AccelerateOptions,
    forward: Callable,
    cache: Any,
) -> dict[str, Route]:
    """The routes the model's structure allows, before any is run."""
    params = inspect.signature(forward).parameters
    kv = _kv_shapes(cache)
    full = bool(kv) and all(type(layer) is DynamicLayer for layer in cache.layers)
    full = full and None not in kv
    kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})
    layers = None if full else f"its cache layers are {', '.join(kinds) or 'unknown'}"
    causal = plain_causal(model)
    packed = (
        "disabled by option pack_prefill=False"
        if not options.pack_prefill
        else "disabled by option lower_attention=False"
        if not config.lower_attention
        else packable_signature(params)
        or ("not a decoder-only language model" if _multimodal(model.config) else None)
        or layers
    )
    window = _window(model)
    masks = (
        None
        if window is None or window <= PROBED_WINDOW
        else f"its window ({window} tokens) is longer than the probe's prompts: its own code "
        "builds its masks, in the graph"
    )
    return {
        "masks": Route(masks is None, masks or ""),
        "packed_prefill": Route(packed is None, packed or ""),
        "decode_prefill": Route(not (causal or layers), causal or layers or ""),
        "decode_mask": Route(not (causal or layers or masks), causal or layers or masks or ""),
    }


def _multimodal(config: PreTrainedConfig) -> bool:
    return bool(config.is_encoder_decoder) or config.get_text_config() is not config


def _agrees(
    model: torch.nn.Module,
    config: XyConfig,
    options: AccelerateOptions,
    forward: Callable,
    routes: Routes,
    probes: tuple[Probe, ...],
    reference: list[_Outcome | None],
) -> str | None:
    """Run the probes through the wrapper with ``routes``, eagerly; why they do not agree with
    the reference, or None."""
    accelerator = Accelerator(model, config, options, forward, routes, run=forward)
    had = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = accelerator.wrapper()
    try:
        for probe, want in zip(probes, reference, strict=True):
            if want is None:
                continue  # the model itself cannot run this probe
            try:
                got = _generate(model, probe)
            except Exception as e:
                return f"{probe.name} raised {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            reason = _disagreement(want, got, model.dtype)
            if reason is not None:
                return f"{probe.name}: {reason}"
        return None
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward


def decide(
    model: torch.nn.Module,
    config: XyConfig,
    options: AccelerateOptions,
    forward: Callable,
    use: Callable[[bool], str | None],
) -> Routes:
    """The routes ``model`` takes (module docstring). ``forward``: its own forward; ``use(on)``
    switches the model to xyserve's attention function (True; the reason if it cannot) or back
    to its own (False), and is left in the state the prepared route needs. Raises
    ``ProbeError`` if the model's own ``generate()`` fails on the first probe."""
    probes = probes_for(model)
    reference: list[_Outcome | None] = []
    for i, probe in enumerate(probes):
        try:
            reference.append(_generate(model, probe))
        except Exception as e:
            if i == 0:
                raise ProbeError(
                    f"generate() on {probe.name} raised {type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}"
                ) from e
            reference.append(None)
    cache = reference[0].cache
    kv = _kv_shapes(cache)
    allowed = _structural(model, config, options, forward, cache)
    off = {name: Route(False, "needs the prepared route") for name in allowed}
    if any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(forward).parameters.values()):
        use(False)
        return Routes(Route(False, "its forward takes *args"), **off, kv_shapes=kv)
    reason = use(True)
    if reason is not None:
        use(False)
        return Routes(Route(False, reason), **off, kv_shapes=kv)
    every = Routes(Route(True), **allowed, kv_shapes=kv)
    if _agrees(model, config, options, forward, every, probes, reference) is None:
        return every
    chosen = Routes(
        Route(True), **{n: Route(False, r.reason) for n, r in allowed.items()}, kv_shapes=kv
    )
    mismatch = _agrees(model, config, options, forward, chosen, probes, reference)
    if mismatch is not None:
        use(False)
        return Routes(Route(False, mismatch), **off, kv_shapes=kv)
    # Each route the structure allows, on top of those taken before it (in Routes' order).
    for name, route in allowed.items():
        if route.taken:
            trial = replace(chosen, **{name: Route(True)})
            mismatch = _agrees(model, config, options, forward, trial, probes, reference)
            chosen = (
                trial if mismatch is None else replace(chosen, **{name: Route(False, mismatch)})
            )
    return chosen
