"""xy-inductor's options, one class per scope:

- ``XyConfig``: the backend's options, all a compiled graph depends on (a saved graph's key
  hashes exactly these); ``torch.compile(m, backend="xyserve", options={...})``,
  ``XYSERVE_OPTIONS`` and vLLM's piecewise compiler take only these;
- ``CompileOptions``: the ``torch.compile`` arguments ``xy_inductor.compile`` passes on;
- ``AccelerateOptions``: what ``xy_inductor.hf.accelerate`` reads besides the backend's options.

Every entry point takes its options as keywords and sorts them into these classes
(``compile_options``, ``accelerate_options``, ``backend_config``): an unknown name, a name the
entry point would ignore, or a value of the wrong type is a ``ValueError`` naming it, at compile
time. Each option's default is written once: the lowering's in ``LoweringOptions``, which the
backend hands to the passes (``XyConfig.lowering_options()``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

from xy_inductor.lowering.options import LoweringOptions

__all__ = [
    "BACKEND_OPTIONS",
    "OPTIONS_ENV",
    "AccelerateOptions",
    "CompileOptions",
    "XyConfig",
    "accelerate_options",
    "backend_config",
    "compile_options",
    "options_from_env",
]

OPTIONS_ENV = "XYSERVE_OPTIONS"
"""Environment variable holding backend options as a JSON object, for callers that name the
backend but cannot pass it options (vLLM's ``compilation_config``): e.g.
``XYSERVE_OPTIONS='{"inductor": true}'``. Options passed in code take precedence."""

_LOWERING = LoweringOptions()  # the lowering options' defaults

# What each annotation admits, in the words of the error that refuses a value.
_EXPECTED = {"bool": "True or False", "bool | None": "True, False or None", "int": "a positive int"}


def _check_fields(options: object) -> None:
    """Raise a ``ValueError`` naming the first field of a dataclass whose value its annotation
    does not admit (bools are not ints here: ``max_tokens=True`` is a mistake)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.type == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        else:
            ok = isinstance(value, bool) or (value is None and "None" in str(f.type))
        if not ok:
            raise ValueError(
                f"xyserve option {f.name!r} expects {_EXPECTED[str(f.type)]}, got {value!r} "
                f"({type(value).__name__})"
            )


@dataclass(frozen=True)
class XyConfig:
    """The backend's options: what a compiled graph, and a saved graph's key, depend on."""

    lower_attention: bool = _LOWERING.lower_attention
    """Rewrite ``F.scaled_dot_product_attention`` sites into ``torch.ops.xyserve.attention``."""

    lower_manual_attention: bool = _LOWERING.lower_manual_attention
    """Rewrite attention written out by hand (``softmax(q @ kᵀ * scale + mask) @ v``, as in
    Hugging Face's ``eager`` attention) into ``torch.ops.xyserve.attention``."""

    lower_linear: bool = _LOWERING.lower_linear
    """Rewrite ``F.linear`` sites into ``torch.ops.xyserve.gemm``. With ``inductor=True`` in a
    process where only ATen serves GEMMs (no GPU or NPU provider), linear sites are left to
    Inductor instead, which calls the same kernel without the op's dispatch (``explain`` says
    so)."""

    fuse_siblings: bool = _LOWERING.fuse_siblings
    """Fuse linear layers that read the same input (q/k/v, gate/up) into one GEMM. When the
    backend compiles, it moves each group's weights into one buffer (values and Parameter
    objects stay; later in-place updates are seen). Off by default: on the CPU it does not pay
    (``benchmarks/fusion.py``)."""

    max_tokens: int = _LOWERING.max_tokens
    """Largest M (tokens per GEMM call) the tile plans cover, from 1 with no gaps. A larger M
    is served by the ATen fallback, counted in ``stats().gemm_over_max_tokens`` and warned
    about once; it never recompiles. ``explain`` reports GEMMs whose M can exceed it."""

    ascend_nz_weights: bool = False
    """Ascend only: cast every linear weight to FRACTAL_NZ once, when the backend compiles, so
    aclnn's WeightNz matmul kernels serve it (vllm-ascend does the same for speed). Off by
    default because it changes the parameters' storage format in place (their values stay):
    code that reads the weights' device memory directly sees the new layout."""

    inductor: bool = _LOWERING.inductor
    """Compile the rest of each graph with Inductor, whole, once, with symbolic sizes; the
    xyserve ops stay opaque calls. Packed prefills (``hf.accelerate``) stay as traced: their
    time is in GEMMs and attention, which Inductor leaves to the xyserve ops, so compiling
    them would cost compile time and save little (``benchmarks/RESULTS.md``). Where ATen is
    the only GEMM provider, linear layers stay Inductor's (see ``lower_linear``). Off: the
    lowered graph runs as traced, and compiling costs only tracing."""

    inductor_regions: bool = False
    """With ``inductor``: compile each distinct repeated block (decoder layer) once and reuse its
    code for every block with the same code (regional compilation, as Hugging Face accelerate's
    ``compile_regions``; ``regions.py``). It saves compile time in proportion to the number of
    layers, and costs every call the fusion across block boundaries and a call per block
    (``benchmarks/regions.py``; figures in ``benchmarks/RESULTS.md``). Off: each graph compiles
    whole."""

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def from_options(cls, options: Mapping[str, object] | None) -> XyConfig:
        """Build from backend options (``torch.compile(..., options=...)``); any other name is
        a ``ValueError`` that says which entry point takes it, if one does."""
        (config,) = _split("backend", options)
        return config

    def lowering_options(self) -> LoweringOptions:
        """The options the lowering passes read (all they are given of this config)."""
        names = (f.name for f in dataclasses.fields(LoweringOptions))
        return LoweringOptions(**{name: getattr(self, name) for name in names})


@dataclass(frozen=True)
class CompileOptions:
    """The ``torch.compile`` arguments ``xy_inductor.compile`` passes on (not backend options:
    a compiled graph does not depend on them)."""

    dynamic: bool | None = True
    """``torch.compile(dynamic=...)``. True traces sizes as symbols from the first call, which
    gives the fewest graphs."""

    fullgraph: bool = False
    """``torch.compile(fullgraph=...)``: raise on a graph break instead of splitting the model
    into several graphs."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class AccelerateOptions:
    """What ``xy_inductor.hf.accelerate`` reads besides the backend's options. It takes no
    ``dynamic``: it marks the sizes that vary between calls itself (``compile_marks.py``)."""

    pack_prefill: bool = True
    """Run each prefill packed, the real tokens of every prompt one after another without their
    padding (XY-Serve's token table), so linear layers, norms and MLPs compute nothing for
    padding; attention runs per prompt (``xyserve.attention_packed``). Decoder-only models with
    full attention in every layer; others run padded."""

    fullgraph: bool = CompileOptions.fullgraph
    """``torch.compile(fullgraph=...)`` for the model's forward: raise on a graph break instead
    of splitting the model into several graphs."""

    def __post_init__(self) -> None:
        _check_fields(self)


def compile_options(options: Mapping[str, object] | None) -> tuple[XyConfig, CompileOptions]:
    """``xy_inductor.compile``'s keyword options: the backend's and torch.compile's."""
    config, arguments = _split("compile", options)
    return config, arguments


def accelerate_options(
    options: Mapping[str, object] | None,
) -> tuple[XyConfig, AccelerateOptions]:
    """``xy_inductor.hf.accelerate``'s keyword options: the backend's and its own."""
    config, accelerate = _split("accelerate", options)
    return config, accelerate


def options_from_env(environ: Mapping[str, str] | None = None) -> dict[str, object]:
    """The backend options in ``XYSERVE_OPTIONS`` (empty when unset); a clear ``ValueError``
    when it is not a JSON object."""
    text = (os.environ if environ is None else environ).get(OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{OPTIONS_ENV} must be a JSON object of xyserve backend options, e.g. "
            f"'{{\"inductor\": true}}'; got {text!r} ({e})"
        ) from None
    if not isinstance(options, dict):
        raise ValueError(
            f"{OPTIONS_ENV} must be a JSON object of xyserve backend options, got {text!r}"
        )
    return options


def backend_config(options: Mapping[str, object] | None = None) -> XyConfig:
    """The backend's config: ``options`` as given, or ``XYSERVE_OPTIONS`` when none are given
    (what the backend, a loaded graph and vLLM's piecewise compiler all compile with)."""
    return XyConfig.from_options(options or options_from_env())


BACKEND_OPTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(XyConfig))
"""The backend's option names: the fields of ``XyConfig``."""

# Each entry point: what it calls itself in errors, and the option classes it takes.
_ENTRIES: dict[str, tuple[str, tuple[type, ...]]] = {
    "backend": ("a backend option", (XyConfig,)),
    "compile": ("an xy_inductor.compile option", (XyConfig, CompileOptions)),
    "accelerate": ("an xy_inductor.hf.accelerate option", (XyConfig, AccelerateOptions)),
}


def _refusal(key: str, entry: str) -> str | None:
    """Why ``entry`` refuses an option that another entry point takes; None if none does."""
    this = _ENTRIES[entry][0]
    if key == "dynamic" and entry == "accelerate":
        return (
            f"xyserve option 'dynamic' is not {this}: accelerate marks the sizes that vary "
            "between calls (batch, query and KV lengths) dynamic itself, and the rest turns "
            "dynamic only if it changes"
        )
    if key in {f.name for f in dataclasses.fields(CompileOptions)}:
        return (
            f"xyserve option {key!r} is a torch.compile argument, not {this}: pass "
            f"torch.compile(..., {key}=...) or use xy_inductor.compile(..., {key}=...)"
        )
    if key in {f.name for f in dataclasses.fields(AccelerateOptions)}:
        return (
            f"xyserve option {key!r} is an xy_inductor.hf.accelerate option, not {this}: pass "
            f"xy_inductor.hf.accelerate(model, {key}=...)"
        )
    return None


def _split(entry: str, options: Mapping[str, object] | None) -> tuple:
    """``options`` sorted into the classes ``entry`` takes (``_ENTRIES``), each built from its
    own fields (a name in two classes goes to both)."""
    classes = _ENTRIES[entry][1]
    options = dict(options or {})
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in classes}
    valid = list(dict.fromkeys(f.name for cls in classes for f in dataclasses.fields(cls)))
    for key in options:
        if key in valid:
            continue
        refusal = _refusal(key, entry)
        if refusal is not None:
            raise ValueError(refusal)
        raise ValueError(f"unknown xyserve option {key!r}; valid options: {', '.join(valid)}")
    return tuple(cls(**{k: v for k, v in options.items() if k in names[cls]}) for cls in classes)
