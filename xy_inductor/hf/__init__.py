"""Hugging Face ``generate()`` with xyserve, exact on every model: ``xy_inductor.hf.accelerate``.

``accelerate(model)`` replaces the model's ``forward`` with a wrapper of the same signature that
hands every call to code compiled with the ``"xyserve"`` backend, in the one form that compiles
least often (``accelerator.py``). What the wrapper may do differs between models, so it is
decided once per model by running it (``probe.py``), never guessed: each route (``routes.py``)
is taken only where a few tiny ``generate()`` calls give the model's own tokens and logits
through it. A model none of whose routes holds runs as a plain ``torch.compile(forward,
backend="xyserve")``; a model that cannot be probed at all is refused.

- ``attention.py``: the ``AttentionInterface`` functions and their mask function;
- ``packed.py``: the packed prefill (the token table of XY-Serve);
- ``probe.py`` / ``routes.py``: which routes a model takes, and why not.
"""

from __future__ import annotations

import functools
import warnings

import torch
from transformers import PreTrainedConfig

from xy_inductor.config import accelerate_options
from xy_inductor.hf import attention, probe
from xy_inductor.hf.accelerator import Accelerator
from xy_inductor.hf.attention import (
    ATTN_IMPLEMENTATION,
    FALLBACK_ATTRIBUTE,
    TRACED_IMPLEMENTATION,
    attention_forward,
)
from xy_inductor.hf.routes import Route, Routes

__all__ = [
    "ATTN_IMPLEMENTATION",
    "TRACED_IMPLEMENTATION",
    "RefusedError",
    "Route",
    "Routes",
    "accelerate",
    "attention_forward",
    "restore",
    "routes",
]


class RefusedError(ValueError):
    """``accelerate`` could not verify any route for the model (it names why)."""


class _Saved:
    """What ``accelerate`` changed on a model, to put back (``restore``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.forward = model.forward
        self.had_instance_forward = "forward" in vars(model)
        self.implementation = model.config._attn_implementation
        generation = getattr(model, "generation_config", None)
        self.disable_compile = getattr(generation, "disable_compile", None)
        self.configs = {
            id(c): c
            for m in model.modules()
            if isinstance(c := getattr(m, "config", None), PreTrainedConfig)
        }

    def use(self, implementation: str, on: bool) -> str | None:
        """Switch the model to ``implementation`` (on) or back to its own; why it cannot."""
        if not on:
            self.model.set_attn_implementation(self.implementation)
            for c in self.configs.values():
                vars(c).pop(FALLBACK_ATTRIBUTE, None)
            return None
        for c in self.configs.values():
            setattr(c, FALLBACK_ATTRIBUTE, c._attn_implementation)
        try:
            self.model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as e:
            return f"transformers refused the attention implementation: {e}"
        if self.model.config._attn_implementation != implementation:
            return (
                "its attention implementation cannot be set (transformers: it does not call "
                "AttentionInterface functions)"
            )
        return None

    def restore(self) -> None:
        if self.had_instance_forward:
            self.model.forward = self.forward
        else:
            vars(self.model).pop("forward", None)
        self.use("", False)
        if self.disable_compile is not None:
            self.model.generation_config.disable_compile = self.disable_compile


def accelerate(model: torch.nn.Module, strict: bool = True, **options: object) -> torch.nn.Module:
    """Make ``model.generate()`` (and calls of ``model``) run through xyserve, in place.

    ``options`` are the fields of ``XyConfig`` (the backend's) and of ``AccelerateOptions``
    (``pack_prefill``, ``fullgraph``); ``dynamic`` is refused, as the wrapper marks the sizes
    that vary between calls itself. The model is probed first (a few tiny greedy
    ``generate()`` calls, run eagerly, whose op calls count in ``stats()``), and takes only the
    routes that gave its own answers there (``routes(model)`` says which, and why not the
    others); with none, it runs as a plain ``torch.compile(backend="xyserve")``, with a warning.
    Its ``forward`` is replaced by a wrapper with the same signature, its attention
    implementation set to ``"xyserve"``, and Hugging Face's own auto-compilation turned off for
    it; ``restore(model)`` undoes all three. Caches passed to the model are prepared in place,
    without changing their contents: a static cache is initialised early, KV tensors are made
    contiguous, and their static-address tag (used only by CUDA graphs) is dropped.

    A model whose own ``generate()`` fails on the probe cannot be verified: ``RefusedError``, or
    with ``strict=False`` a warning and the model left as it was. Returns the model.
    """
    for attr in ("config", "forward", "generate"):
        if not hasattr(model, attr):
            raise ValueError(
                f"xy_inductor.hf.accelerate expects a Hugging Face PreTrainedModel, got "
                f"{type(model).__name__} (it has no .{attr})"
            )
    config, accelerating = accelerate_options(options)
    if getattr(model, "_xyserve_accelerator", None) is not None:
        restore(model)
    attention.register()
    saved = _Saved(model)
    implementation = ATTN_IMPLEMENTATION if config.lower_attention else TRACED_IMPLEMENTATION
    try:
        chosen = probe.decide(
            model,
            config,
            accelerating,
            saved.forward,
            functools.partial(saved.use, implementation),
        )
    except probe.ProbeError as e:
        saved.restore()
        message = f"xyserve: cannot accelerate {type(model).__name__}: {e}"
        if strict:
            raise RefusedError(message) from e
        warnings.warn(message + "; the model is left as it was", stacklevel=2)
        return model
    except BaseException:
        saved.restore()
        raise
    if not chosen.prepared.taken:
        warnings.warn(
            f"xyserve: {type(model).__name__} runs as a plain torch.compile(backend='xyserve'), "
            f"without accelerate's routes: {chosen.prepared.reason}",
            stacklevel=2,
        )
    accelerator = Accelerator(model, config, accelerating, saved.forward, chosen)
    accelerator.saved = saved
    if getattr(model, "generation_config", None) is not None:
        # HF would otherwise wrap __call__ in its own torch.compile on CUDA.
        model.generation_config.disable_compile = True
    model._xyserve_accelerator = accelerator
    model.forward = accelerator.wrapper()
    return model


def routes(model: torch.nn.Module) -> Routes:
    """The routes ``accelerate`` took for ``model``, and why not the others."""
    accelerator = getattr(model, "_xyserve_accelerator", None)
    if accelerator is None:
        raise ValueError(f"{type(model).__name__} was not accelerated by xy_inductor.hf.accelerate")
    return accelerator.routes


def restore(model: torch.nn.Module) -> torch.nn.Module:
    """Undo ``accelerate``: original ``forward``, attention implementation, HF compile flag."""
    accelerator = getattr(model, "_xyserve_accelerator", None)
    if accelerator is None:
        raise ValueError(f"{type(model).__name__} was not accelerated by xy_inductor.hf.accelerate")
    accelerator.saved.restore()
    del model._xyserve_accelerator
    return model
