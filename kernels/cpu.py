"""The ATen provider: every xyserve op as plain ATen calls.

It serves the CPU, and it is the fallback that accepts any call on any device, which is why it
stays last in ``PROVIDER_MODULES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xy_inductor.runtime.ops import attention_output
from xy_inductor.runtime.providers import OpKernel, Provider, accept_all

__all__ = ["PROVIDER", "attention", "gemm"]


def gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    # ATen blocks every M itself: max_tokens only matters to providers with a tile menu.
    return F.linear(x, weight, bias)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    # enable_gqa lets SDPA read the Hkv heads directly instead of repeating K and V.
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    # The op promises the [B, Lq, H, D] memory layout of its fake implementation. Some SDPA
    # kernels write [B, H, Lq, D]; then one copy fixes it (the transpose that follows attention
    # in the model would have copied anyway). is_contiguous ignores strides of size-1 dims.
    if not out.transpose(1, 2).is_contiguous():
        out = attention_output(q, v).copy_(out)
    return out


PROVIDER = Provider(
    name="aten",
    available=lambda: True,
    kernels={"gemm": OpKernel(accept_all, gemm), "attention": OpKernel(accept_all, attention)},
)
