"""The ATen provider: every xyserve op as ATen calls. Every device's fallback.

It accepts any call on any device, which is why it stays last in the provider list. What it
decides per call:

- ``gemm``: ``F.linear`` (path ``linear``); ATen blocks every M itself.
- ``attention``: on the CPU, a call big enough to be worth planning whose mask is rows of
  padding runs each sequence at its own length (path ``rows``, ``aten_attention.run_dense``),
  so nothing is computed for padding; anything else is one SDPA call (path ``sdpa``).
- ``attention_varlen``: on the CPU, each row over only the cache blocks it can see, through
  ATen's fused flash kernel (path ``rows``, ``aten_attention.run_paged``); elsewhere the generic
  executor over the plan's tiles (path ``plan``, ``aten_attention.run_plan``).
- ``attention_packed``: each packed sequence on views of its own tokens (path ``rows``,
  ``aten_attention.run_packed``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from xy_inductor.kernels.aten_attention import run_dense, run_packed, run_paged, run_plan
from xy_inductor.kernels.contract import Accept, OpKernel, Provider

if TYPE_CHECKING:  # the runtime's call objects, for annotations only
    from xy_inductor.runtime.calls import (
        DenseAttention,
        GemmCall,
        PackedAttention,
        VarlenAttention,
    )

__all__ = ["MENU", "PLANNED_MIN_SCORES", "PROVIDER", "provider"]

# The planner's menu for the CPU executors: query tiles per row length, keys per chunk, and
# how many tasks run at once.
MENU = {"q_tiles": (1, 16, 64, 128), "kv_chunk": 512, "workers": 2}

# Below this many scores (B × Lq × Lk) one dense SDPA call costs less than recognising rows and
# planning them (a tiny model's decode step); above it, skipping padding pays.
PLANNED_MIN_SCORES = 1 << 18

_LINEAR = Accept("linear")
# One SDPA call. The decision is (enable_gqa: query heads share kv heads, one_query: Lq == 1),
# indexed the same way, so that the decode path builds nothing.
_SDPA = tuple(tuple(Accept("sdpa", (gqa, one)) for one in (False, True)) for gqa in (False, True))


def check_gemm(call: GemmCall) -> Accept:
    return _LINEAR


def run_gemm(call: GemmCall, accept: Accept) -> torch.Tensor:
    return F.linear(call.x, call.weight, call.bias)


def check_attention(call: DenseAttention, planned_min_scores: int = PLANNED_MIN_SCORES) -> Accept:
    # Every decode layer pays for this test: sizes unpacked once, is_cpu rather than a
    # torch.device object (which costs about as much as the rest of it).
    b, hq, lq, _ = call.q.shape
    _, hkv, lk, _ = call.k.shape
    sdpa = _SDPA[hq != hkv][lq == 1]
    if not call.q.is_cpu or b * lq * lk < planned_min_scores:
        return sdpa
    rows = call.rows()
    if rows is None:
        return sdpa
    return Accept("rows", (rows, call.plan(rows, **MENU)))


def run_attention(call: DenseAttention, accept: Accept) -> torch.Tensor:
    q, k, v = call.q, call.k, call.v
    if accept.path == "rows":
        rows, plan = accept.decision
        return run_dense(
            plan,
            q,
            k,
            v,
            q_end=rows.q_end,
            kv_start=rows.kv_start,
            kv_lens=rows.kv_len,
            scale=call.softmax_scale,
            out=call.new_output(),
        )
    # enable_gqa lets SDPA read the Hkv heads directly instead of repeating K and V.
    gqa, one_query = accept.decision
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        scale=call.scale,
        enable_gqa=gqa,
    )
    # The op promises the [B, Lq, H, D] memory layout of its fake implementation. Some SDPA
    # kernels write [B, H, Lq, D]; then one copy fixes it (the transpose that follows attention
    # in the model would have copied anyway). With one query both layouts are the same
    # (is_contiguous ignores size-1 dims), and is_contiguous costs a fraction of _blhd.
    if not (out.is_contiguous() if one_query else _blhd(out)):
        out = call.new_output().copy_(out)
    return out


def _blhd(out: torch.Tensor) -> bool:
    """``out.transpose(1, 2).is_contiguous()`` (size-1 dims' strides ignored) from the sizes
    and strides, without making the view: a third of the cost, paid by every decode layer."""
    b, h, lq, d = out.shape
    sb, sh, sl, sd = out.stride()
    return (
        (d == 1 or sd == 1)
        and (h == 1 or sh == d)
        and (lq == 1 or sl == h * d)
        and (b == 1 or sb == lq * h * d)
    )


def check_attention_varlen(call: VarlenAttention) -> Accept:
    plan = call.plan(**MENU)
    if call.q.device.type == "cpu":
        # The plan, and a place for what run_paged derives from the rows (their slots and
        # masks): a serving step (runtime.serving.VarlenStep) hands this one decision to each of
        # its layers, so that is derived once per step.
        return Accept("rows", (plan, {}))
    return Accept("plan", plan)


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    if accept.path == "rows":
        plan, cache = accept.decision
        return run_paged(
            plan,
            call.q,
            call.k_cache,
            call.v_cache,
            call.kv_lens,
            block_table=call.block_table,
            block_size=call.block_size,
            scale=call.softmax_scale,
            cache=cache,
        )
    return run_plan(
        accept.decision,
        call.q,
        call.k_cache,
        call.v_cache,
        call.kv_lens,
        scale=call.softmax_scale,
        block_table=call.block_table,
        block_size=call.block_size,
    )


def check_attention_packed(call: PackedAttention) -> Accept:
    return Accept("rows", call.plan(**MENU))


def run_attention_packed(call: PackedAttention, accept: Accept) -> torch.Tensor:
    return run_packed(accept.decision, call.q, call.k, call.v, scale=call.softmax_scale)


def provider(*, planned_min_scores: int = PLANNED_MIN_SCORES) -> Provider:
    """The ATen provider; ``planned_min_scores`` (default ``PLANNED_MIN_SCORES``) is the
    smallest B × Lq × Lk a dense CPU call needs to be run as planned rows (tests pass 0 to run
    every call with rows that way)."""
    if planned_min_scores == PLANNED_MIN_SCORES:
        attention = check_attention
    else:

        def attention(call: DenseAttention) -> Accept:
            return check_attention(call, planned_min_scores)

    return Provider(
        name="aten",
        unavailable=lambda: None,
        kernels={
            "gemm": OpKernel(check_gemm, run_gemm),
            "attention": OpKernel(attention, run_attention),
            "attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen),
            "attention_packed": OpKernel(check_attention_packed, run_attention_packed),
        },
    )


PROVIDER = provider()
