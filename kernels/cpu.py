"""The ATen provider: every xyserve op as plain ATen calls.

It serves the CPU, and it is the fallback that accepts any call on any device, which is why it
stays last in ``PROVIDER_MODULES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xy_inductor.kernels.cpu_attention import run_dense, run_plan
from xy_inductor.runtime import stats as _stats
from xy_inductor.runtime.attention_plan import DenseRows, plan_attention, rows_from_mask
from xy_inductor.runtime.ops import attention_output
from xy_inductor.runtime.providers import OpKernel, Provider, accept_all

__all__ = ["PROVIDER", "attention", "gemm"]


def gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    # ATen blocks every M itself: max_tokens only matters to providers with a tile menu.
    return F.linear(x, weight, bias)


# Below this many scores (B × Lq × Lk) one dense SDPA call costs less than recognising rows and
# planning them (a tiny model's decode step); above it, skipping padding pays.
PLANNED_MIN_SCORES = 1 << 18


def dense_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    min_scores: int | None = None,
) -> DenseRows | None:
    """The rows of a dense call when the planner can run it without its padding, else None.
    ``min_scores``: smallest B × Lq × Lk worth planning (default ``PLANNED_MIN_SCORES``)."""
    b, _, lq, _ = q.shape
    lk = k.shape[2]
    least = PLANNED_MIN_SCORES if min_scores is None else min_scores
    if b * lq * lk < least or (is_causal and lq > lk):
        return None
    if attn_mask is not None:
        return rows_from_mask(attn_mask, b, lq, lk)
    if is_causal and lq != lk:
        return None  # SDPA aligns is_causal top-left; the planner's rows end at their last key
    return DenseRows((lq,) * b, (lq,) * b, (0,) * b, (lk,) * b, causal=is_causal)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    rows = dense_rows(q, k, attn_mask, is_causal) if q.device.type == "cpu" else None
    if rows is not None:
        # Each sequence at its own length: nothing is computed for padding (meta-attention).
        plan = plan_attention(rows.q_len, rows.kv_len, causal=rows.causal, kv_heads=k.shape[1])
        _stats.record_planned_attention()
        return run_dense(
            plan,
            q,
            k,
            v,
            q_end=rows.q_end,
            kv_start=rows.kv_start,
            kv_lens=rows.kv_len,
            scale=scale if scale is not None else q.shape[-1] ** -0.5,
            out=attention_output(q, v),
        )
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


def attention_varlen(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_lens: list[int],
    kv_lens: list[int],
    block_table: torch.Tensor,
    causal: bool,
    window: int | None,
    scale: float | None,
) -> torch.Tensor:
    # The generic executor: it gathers each tile's blocks (correct for any table; not fast).
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=k_cache.shape[2])
    return run_plan(
        plan,
        q,
        k_cache,
        v_cache,
        kv_lens,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        block_table=block_table.long(),
        block_size=k_cache.shape[1],
    )


PROVIDER = Provider(
    name="aten",
    available=lambda: True,
    kernels={
        "gemm": OpKernel(accept_all, gemm),
        "attention": OpKernel(accept_all, attention),
        "attention_varlen": OpKernel(accept_all, attention_varlen),
    },
)
