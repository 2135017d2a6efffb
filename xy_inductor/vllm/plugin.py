"""The ``vllm.general_plugins`` entry point: register xyserve's attention backend as ``CUSTOM``.

vLLM calls ``register()`` in every process it starts, possibly more than once; it only records
names. It never changes what runs unless the user selects ``CUSTOM``:

- ``CUSTOM`` is registered to ``BACKEND_CLASS`` unless another plugin registered it first (then
  this one steps aside, with a warning, and stays unused);
- vLLM's CPU platform refuses every backend but its own (``CpuPlatform.get_attn_backend_cls``
  logs "Cannot use … backend on CPU" and runs ``CPU_ATTN``). It is wrapped so that ``CUSTOM``
  selects xyserve's backend when, and only when, ``CUSTOM`` is registered to it; any other
  selection goes to vLLM's own code unchanged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from xy_inductor.vllm import BACKEND_CLASS

if TYPE_CHECKING:
    from vllm.v1.attention.selector import AttentionSelectorConfig

__all__ = ["register", "selected"]

# A child of vLLM's "vllm" logger: vLLM's handlers print it with vLLM's own lines.
log = logging.getLogger("vllm.xyserve")

# Marks the wrapper, so a second register() in one process does not wrap it again.
_WRAPPED = "_xyserve_wraps"


def selected() -> bool:
    """Whether vLLM's ``CUSTOM`` backend is xyserve's in this process."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    custom = AttentionBackendEnum.CUSTOM
    return custom.is_overridden() and custom.get_path() == BACKEND_CLASS


def register() -> None:
    """Register xyserve's attention backend as vLLM's ``CUSTOM`` (the plugin entry point)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_CLASS:
        log.warning(
            "xyserve: vLLM's CUSTOM attention backend is already registered to %s; "
            "xyserve's backend (%s) is not registered",
            custom.get_path(),
            BACKEND_CLASS,
        )
        return
    register_backend(custom, BACKEND_CLASS)
    _honour_custom_on_cpu()


def _refusal(config: AttentionSelectorConfig) -> str | None:
    """What in a layer's selector config xyserve's backend cannot serve (the per-layer features
    vLLM does not pass here, such as ALiBi or soft-capping, the metadata builder checks)."""
    if config.use_mla:
        return "MLA (multi-head latent attention)"
    if config.use_sparse:
        return "sparse attention"
    if config.use_mm_prefix:
        return "multimodal prefix-LM (bidirectional) attention"
    if config.use_non_causal:
        return "non-causal decoder attention"
    if config.use_pcp or config.use_dcp:
        return "context parallelism (PCP/DCP)"
    return None


def _honour_custom_on_cpu() -> None:
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.__dict__["get_attn_backend_cls"]
    if getattr(original.__func__, _WRAPPED, None) is not None:
        return
    vllm_select = original.__func__

    def get_attn_backend_cls(
        cls: Any,
        selected_backend: AttentionBackendEnum | None,
        attn_selector_config: AttentionSelectorConfig,
        num_heads: int | None = None,
    ) -> str:
        if selected_backend != AttentionBackendEnum.CUSTOM or not selected():
            return vllm_select(cls, selected_backend, attn_selector_config, num_heads)
        refused = _refusal(attn_selector_config)
        if refused is not None:
            raise ValueError(
                f"xyserve attention backend (CUSTOM) cannot serve {refused}: this model or "
                "setting needs another attention backend"
            )
        return BACKEND_CLASS

    setattr(get_attn_backend_cls, _WRAPPED, vllm_select)
    get_attn_backend_cls.__doc__ = vllm_select.__doc__
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
