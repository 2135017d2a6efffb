"""``LoweringOptions``: what the lowering passes read, and nothing else.

The front end builds it from its own config (``XyConfig.lowering_options()``); the passes never
see that config, so ``lowering/`` imports nothing above it. The defaults here are the options'
only defaults: ``XyConfig`` takes its lowering fields' defaults from this class, and
``max_tokens``' from the planner that uses it (``kernels.gemm_plan.DEFAULT_MAX_TOKENS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from xy_inductor.kernels.gemm_plan import DEFAULT_MAX_TOKENS

__all__ = ["LoweringOptions"]


@dataclass(frozen=True)
class LoweringOptions:
    lower_attention: bool = True
    """Run ``SdpaToAttention``: ``F.scaled_dot_product_attention`` -> ``xyserve.attention``."""

    lower_manual_attention: bool = True
    """Run ``ManualAttention``: attention written out by hand -> ``xyserve.attention``."""

    lower_linear: bool = True
    """Run ``LinearToGemm``: linear layers -> ``xyserve.gemm``."""

    fuse_siblings: bool = False
    """Run ``FuseSiblingGemms``: GEMMs that read one input -> one ``xyserve.gemm_fused``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    """The ``max_tokens`` argument the GEMM ops are given: the largest M their tile plans
    cover."""

    inductor: bool = False
    """Inductor compiles the lowered graph: where only ATen serves GEMMs in this process, the
    GEMM passes stand down (``pipeline.gemms_left_to_inductor``)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "max_tokens":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
                expected = "a positive int"
            else:
                ok, expected = isinstance(value, bool), "True or False"
            if not ok:
                raise ValueError(
                    f"lowering option {f.name!r} expects {expected}, got {value!r} "
                    f"({type(value).__name__})"
                )
