"""xyserve's attention backend for vLLM (v1): one plan per step, every layer runs it.

- ``XyserveMetadataBuilder.build`` runs once per step and KV-cache group. It reads the step's
  rows on the host (``query_start_loc``, ``seq_lens``, ``block_table``, causal) and builds one
  ``runtime.serving.VarlenStep``: the token table of the step, checked once. It also turns
  ``slot_mapping`` into the (block, slot) of each new token, once for all layers
  (``runtime.serving.SlotWrites``; slot -1 is padding and is not written).
- ``XyserveAttentionImpl.forward`` runs per layer: it writes the step's new K/V into the
  layer's cache through those slots (its own layout, below), then runs the step through the
  provider registry. The first layer's run picks the provider and its plan (token table →
  task table); every later layer of the step reuses that decision, so a layer neither reads
  lengths from the device nor plans again.

KV cache layout: vLLM's per-layer view is ``[blocks, Hkv, block_size, D + Dv]`` logically; the
backend prefers the ``LBHNC`` layout, so in memory each block is ``[Hkv, block_size, D + Dv]``
(each KV head's slots contiguous; ``LBNHC``, ``[block_size, Hkv, D + Dv]``, is accepted too),
and ``kv_cache.transpose(1, 2)`` is the ``[blocks, block_size, Hkv, ·]`` cache of
``xyserve.attention_varlen`` without a copy in either (K is the first D values of a slot, V
the rest).
Only this module writes it; it does not depend on any vLLM kernel's private block layout.

What the backend cannot serve (ALiBi, logit soft-capping, attention sinks, MLA,
encoder/cross-attention, quantized KV caches) fails when the engine starts, naming the layer
and the feature; it never runs such a layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from xy_inductor.kernels.cpu import build as cpu_build
from xy_inductor.runtime.serving import SlotWrites, VarlenStep

__all__ = [
    "XyserveAttentionBackend",
    "XyserveAttentionImpl",
    "XyserveAttentionMetadata",
    "XyserveMetadataBuilder",
    "unsupported_features",
]

NAME = "CUSTOM"

# Under vLLM's "vllm" logger, so its handlers print it in vLLM's format with its own lines.
logger = init_logger("vllm.xyserve")


class XyserveAttentionBackend(AttentionBackend):
    """vLLM's ``CUSTOM`` attention backend, served by xyserve's meta-attention."""

    # forward() writes the step's K/V itself, then attends.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[XyserveAttentionImpl]:
        return XyserveAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[XyserveMetadataBuilder]:
        return XyserveMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # LBHNC first (a block is [Hkv, block_size, D + Dv]: each KV head's slots contiguous),
        # which the CPU provider's kernel reads fastest (benchmarks/RESULTS.md); LBNHC (a block
        # is [block_size, Hkv, D + Dv]) too. Both are strided views of the paged [blocks,
        # block_size, Hkv, D] cache of xyserve.attention_varlen, which every provider reads
        # through its strides; CPU_ATTN uses LBHNC as well (a draft model on it shares it).
        return (KVCacheLayout.LBHNC, KVCacheLayout.LBNHC)

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class XyserveAttentionMetadata:
    """One step of one KV-cache group, shared by its layers."""

    step: VarlenStep
    """The step's token table; every layer runs it (``VarlenStep.run``)."""
    num_actual_tokens: int
    """Tokens of the step's rows: the first ``num_actual_tokens`` of q, k and v (vLLM may pad
    them past that)."""
    writes: SlotWrites
    """Where the step's new K/V go in each layer's cache (padding slots skipped)."""
    block_size: int


def _host_seq_lens(cm: CommonAttentionMetadata, upper_bound_exact: bool) -> torch.Tensor:
    """The step's KV lengths on the host, read once per step (on the CPU they are there; on a
    device, vLLM's host upper bound is exact without speculative decoding, else one copy)."""
    seq_lens = cm.seq_lens[: cm.num_reqs]
    if seq_lens.device.type == "cpu":
        return seq_lens
    if upper_bound_exact and cm.seq_lens_cpu_upper_bound is not None:
        return cm.seq_lens_cpu_upper_bound[: cm.num_reqs]
    return seq_lens.cpu()


class XyserveMetadataBuilder(AttentionMetadataBuilder[XyserveAttentionMetadata]):
    """Builds the step (``VarlenStep``) once per step; refuses unservable layers at start."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER
    reorder_batch_threshold: int | None = None  # rows may come in any order

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # Runs when the engine starts (KV cache set-up), before any request. Every layer of the
        # model is checked, not only this group's, so the message names all that need another
        # backend.
        refuse_unsupported(vllm_config)
        self.block_size = kv_cache_spec.block_size
        logger.info(
            "xyserve meta-attention (CUSTOM) serves %d attention layers, KV blocks of %d",
            len(layer_names),
            self.block_size,
        )
        spec = vllm_config.speculative_config
        self.upper_bound_exact = spec is None
        # With k drafts per step a request being verified has k + 1 queries: counted as
        # verify rows in stats() (vLLM's own builders treat such rows as decodes).
        drafts = getattr(spec, "num_speculative_tokens", None) if spec is not None else None
        self.verify_max_q = 1 + drafts if drafts else None
        if device.type == "cpu" and cpu_build.why_unavailable() is None:
            # The CPU attention kernels are built (or loaded) now, at engine start, rather than
            # inside the first step; a failure leaves ATen serving, with the reason logged.
            reason = cpu_build.why_not_loaded()
            if reason is not None:
                logger.warning(
                    "xyserve: CPU attention kernels unavailable, ATen serves: %s", reason
                )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> XyserveAttentionMetadata:
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor):
            raise NotImplementedError(
                "xyserve attention backend (CUSTOM): per-request causality is not supported"
            )
        rows = cm.num_reqs
        step = VarlenStep.from_cu_seqlens(
            cm.query_start_loc_cpu[: rows + 1],
            _host_seq_lens(cm, self.upper_bound_exact),
            cm.block_table_tensor[:rows],
            causal=bool(cm.causal),
            verify_max_q=self.verify_max_q,
        )
        # vLLM pads the token count past the rows' tokens: the rows' tokens come first. Any
        # of them may still have slot -1 (a token this rank does not store), skipped on every
        # device as vLLM's reshape_and_cache skips it.
        return XyserveAttentionMetadata(
            step=step,
            num_actual_tokens=step.tokens,
            writes=SlotWrites(cm.slot_mapping[: step.tokens], self.block_size),
            block_size=self.block_size,
        )


_ATTN_TYPES = {
    AttentionType.ENCODER_DECODER: "encoder-decoder cross-attention",
    AttentionType.ENCODER: "encoder (bidirectional) attention",
    AttentionType.ENCODER_ONLY: "encoder-only (bidirectional) attention",
}


class XyserveAttentionImpl(AttentionImpl[XyserveAttentionMetadata]):
    """One attention layer: write K/V through the step's slots, run the step's plan."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        # (vLLM's cache tensor, the K view, the V view) of the last forward (``_caches``).
        self._views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # What this layer asks for that xyserve cannot serve. The metadata builder raises at
        # engine start with the layer's name (vLLM does not give it here); forward refuses too.
        self.unsupported: tuple[str, ...] = tuple(
            feature
            for feature, present in (
                ("ALiBi position biases", alibi_slopes is not None),
                ("logit soft-capping", bool(logits_soft_cap)),
                ("attention sinks", extra.pop("sinks", None) is not None),
                (_ATTN_TYPES.get(attn_type, f"{attn_type} attention"), attn_type != "decoder"),
                (f"a {kv_cache_dtype} KV cache", kv_cache_dtype != "auto"),
            )
            if present
        ) + tuple(
            # any other feature vLLM asks an implementation for (by keyword) is one it lacks
            f"{name}={value!r}"
            for name, value in extra.items()
            if value is not None and value is not False
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: XyserveAttentionMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q ``[tokens, Hq, D]``, k/v ``[tokens, Hkv, D]``, ``kv_cache`` the layer's view
        ``[blocks, Hkv, block_size, D + Dv]``; writes ``output [tokens, Hq, Dv]``."""
        if self.unsupported:
            raise NotImplementedError(
                f"xyserve attention backend (CUSTOM) cannot serve {', '.join(self.unsupported)}"
            )
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                "xyserve attention backend (CUSTOM): fused output quantization is not supported"
            )
        if attn_metadata is None:  # vLLM's profiling and warm-up runs: no KV, no rows
            return output
        n = attn_metadata.num_actual_tokens
        k_cache, v_cache = self._caches(kv_cache)
        if k_cache.shape[1] != attn_metadata.block_size:
            raise ValueError(
                f"xyserve attention backend (CUSTOM): the layer's cache has blocks of "
                f"{k_cache.shape[1]} slots, the step was built for {attn_metadata.block_size}"
            )
        if self.kv_sharing_target_layer_name is None and key is not None and value is not None:
            attn_metadata.writes.write(k_cache, v_cache, key[:n], value[:n])
        # Views cost a microsecond each, per layer: none when vLLM did not pad the tokens.
        whole = n == query.shape[0] == output.shape[0]
        attn_metadata.step.run(
            query if whole else query[:n],
            k_cache,
            v_cache,
            window=self.sliding_window,
            scale=self.scale,
            out=output if whole else output[:n],
        )
        return output

    def _caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V caches ``[blocks, block_size, Hkv, D]`` as views of vLLM's
        ``kv_cache``, made once per cache tensor: it is allocated when the engine starts and
        kept, so every step's forward would make the same views again."""
        views = self._views
        if views is None or views[0] is not kv_cache:
            paged = kv_cache.transpose(1, 2)  # [blocks, block_size, Hkv, D + Dv], a view
            views = self._views = (
                kv_cache,
                paged[..., : self.head_size],
                paged[..., self.head_size :],
            )
        return views[1], views[2]


def unsupported_features(
    vllm_config: VllmConfig, layer_names: list[str] | None = None
) -> dict[str, tuple]:
    """Layer name → the features xyserve's backend cannot serve, for the attention layers
    (``layer_names``, default all) that have any."""
    found: dict[str, tuple] = {}
    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    for name, layer in layers.items():
        impl = layer.impl
        if isinstance(impl, XyserveAttentionImpl) and impl.unsupported:
            found[name] = impl.unsupported
    return found


def refuse_unsupported(vllm_config: VllmConfig, layer_names: list[str] | None = None) -> None:
    """Raise, naming each layer and feature, if any layer is one xyserve cannot serve."""
    found = unsupported_features(vllm_config, layer_names)
    if found:
        lines = "; ".join(f"layer {name}: {', '.join(feats)}" for name, feats in found.items())
        raise ValueError(
            f"xyserve attention backend (CUSTOM) cannot serve this model: {lines}. Select "
            "another attention backend for it."
        )
