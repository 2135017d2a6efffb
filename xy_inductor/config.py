"""The one options object of xy-inductor: ``XyConfig``.

Every entry point builds it from keyword options (``xy_inductor.compile(m, inductor=True)``,
``torch.compile(m, backend="xyserve", options={"inductor": True})``,
``xy_inductor.hf.accelerate(model, inductor=True)``), so an unknown name or a value of the wrong
type is a ``ValueError`` naming it, at compile time.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["BACKEND_OPTIONS", "OPTIONS_ENV", "XyConfig", "backend_config", "options_from_env"]

OPTIONS_ENV = "XYSERVE_OPTIONS"
"""Environment variable holding backend options as a JSON object, for callers that name the
backend but cannot pass it options (vLLM's ``compilation_config``): e.g.
``XYSERVE_OPTIONS='{"inductor": true}'``. Options passed in code take precedence."""


@dataclass(frozen=True)
class XyConfig:
    lower_attention: bool = True
    """Rewrite ``F.scaled_dot_product_attention`` sites into ``torch.ops.xyserve.attention``."""

    lower_manual_attention: bool = True
    """Rewrite attention written out by hand (``softmax(q @ kᵀ * scale + mask) @ v``, as in
    Hugging Face's ``eager`` attention) into ``torch.ops.xyserve.attention``."""

    lower_linear: bool = True
    """Rewrite ``F.linear`` sites into ``torch.ops.xyserve.gemm``. With ``inductor=True`` in a
    process where only ATen serves GEMMs (no GPU or NPU provider), linear sites are left to
    Inductor instead, which calls the same kernel without the op's dispatch (``explain`` says
    so)."""

    fuse_siblings: bool = False
    """Fuse linear layers that read the same input (q/k/v, gate/up) into one GEMM. When the
    backend compiles, it moves each group's weights into one buffer (values and Parameter
    objects stay; later in-place updates are seen). Off by default: on the CPU it does not pay
    (``benchmarks/fusion.py``)."""

    max_tokens: int = 8192
    """Largest M (tokens per GEMM call) the tile plans cover, from 1 with no gaps. A larger M
    is served by the ATen fallback, counted in ``stats().gemm_over_max_tokens`` and warned
    about once; it never recompiles. ``explain`` reports GEMMs whose M can exceed it."""

    pack_prefill: bool = True
    """``hf.accelerate``: run each prefill packed, the real tokens of every prompt one after
    another without their padding (XY-Serve's token table), so linear layers, norms and MLPs
    compute nothing for padding; attention runs per prompt (``xyserve.attention_packed``).
    Decoder-only models with full attention in every layer; others run padded."""

    ascend_nz_weights: bool = False
    """Ascend only: cast every linear weight to FRACTAL_NZ once, when the backend compiles, so
    aclnn's WeightNz matmul kernels serve it (vllm-ascend does the same for speed). Off by
    default because it changes the parameters' storage format in place (their values stay):
    code that reads the weights' device memory directly sees the new layout."""

    inductor: bool = False
    """Compile the rest of each graph with Inductor, whole, once, with symbolic sizes; the
    xyserve ops stay opaque calls. Packed prefills (``hf.accelerate``) stay as traced: their
    time is in GEMMs and attention, and compiling them would add about a third to the compile
    time (``benchmarks/RESULTS.md``). Where ATen is the only GEMM provider,
    linear layers stay Inductor's (see ``lower_linear``). Off: the lowered graph runs as
    traced, and compiling costs only tracing."""

    inductor_regions: bool = False
    """With ``inductor``: compile each distinct repeated block (decoder layer) once and reuse its
    code for every block with the same code (regional compilation, as Hugging Face accelerate's
    ``compile_regions``; ``regions.py``). It saves compile time in proportion to the layers and
    costs every call the fusion across block boundaries and a call per block: on the tiny Llama
    (4 layers) about 1.5 s of a 20 s compile against 0.2 ms of a 2.1–2.3 ms decode step, on 16
    layers 10 of 34.5 s against 2.2 of 12 ms (``benchmarks/regions.py``). Off: each graph
    compiles whole."""

    dynamic: bool | None = True
    """``torch.compile(dynamic=...)`` for ``xy_inductor.compile``. True traces sizes as symbols
    from the first call, which gives the fewest graphs. (``hf.accelerate`` marks the varying
    sizes itself and ignores it.) Not a backend option."""

    fullgraph: bool = False
    """``torch.compile(fullgraph=...)`` for ``xy_inductor.compile`` and ``hf.accelerate``: raise
    on a graph break instead of splitting the model into several graphs. Not a backend option."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "max_tokens":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(
                        f"xyserve option 'max_tokens' expects a positive int, got {value!r} "
                        f"({type(value).__name__})"
                    )
                continue
            allowed = (bool, type(None)) if f.name == "dynamic" else (bool,)
            if not isinstance(value, allowed):
                expected = "True, False or None" if f.name == "dynamic" else "True or False"
                raise ValueError(
                    f"xyserve option {f.name!r} expects {expected}, got {value!r} "
                    f"({type(value).__name__})"
                )

    @classmethod
    def from_options(
        cls, options: Mapping[str, object] | None, *, backend_only: bool = False
    ) -> XyConfig:
        """Build from keyword options; ``backend_only`` rejects the torch.compile-level ones."""
        options = dict(options or {})
        names = BACKEND_OPTIONS if backend_only else tuple(f.name for f in dataclasses.fields(cls))
        for key in options:
            if key in names:
                continue
            if backend_only and key in _FRONT_END_OPTIONS:
                raise ValueError(
                    f"xyserve option {key!r} is a torch.compile argument, not a backend option: "
                    f"pass torch.compile(..., {key}=...) or use xy_inductor.compile(..., {key}=...)"
                )
            raise ValueError(f"unknown xyserve option {key!r}; valid options: {', '.join(names)}")
        return cls(**options)


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
    return XyConfig.from_options(options or options_from_env(), backend_only=True)


_FRONT_END_OPTIONS = ("dynamic", "fullgraph")
BACKEND_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(XyConfig) if f.name not in _FRONT_END_OPTIONS
)
