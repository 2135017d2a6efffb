"""The ATen provider: every xyserve op as ATen calls. Every device's fallback.

It accepts any call on any device, which is why it stays last in the provider list. What it
decides per call:

- ``gemm``: ``F.linear`` (path ``linear``); ATen blocks every M itself.
- ``attention``: on the CPU, a call big enough to be worth planning whose mask is rows of
  padding runs each sequence at its own length (path ``rows``, ``attention.run_dense``),
  so nothing is computed for padding; anything else is one SDPA call (path ``sdpa``).
- ``attention_varlen``: on the CPU, each row over only the cache blocks it can see, through
  ATen's fused flash kernel (path ``rows``, ``attention.run_paged``); elsewhere the generic
  executor over the plan's tiles (path ``plan``, ``attention.run_plan``).
- ``attention_packed``: each packed sequence on views of its own tokens (path ``rows``,
  ``attention.run_packed``).

Its menus are in ``menus.py``; its C++ fast path for CPU calls (``native.cpp``, built and
loaded by ``native.py``) serves, without Python, the calls this module would run as one
``F.linear`` or one SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from xy_inductor.kernels.aten.attention import run_dense, run_packed
from xy_inductor.kernels.aten.menus import ATTENTION_MENU, GEMM_MENU, PLANNED_MIN_SCORES
from xy_inductor.kernels.aten.paged import run_paged
from xy_inductor.kernels.aten.plan_executor import run_plan
from xy_inductor.kernels.attention_plan import AttentionPlan
from xy_inductor.kernels.calls import DenseAttention, GemmCall, PackedAttention, VarlenAttention
from xy_inductor.kernels.contract import Accept, OpKernel, PlannedRows, Provider

__all__ = ["PROVIDER", "PagedPlan", "SdpaCall", "provider"]


@dataclass(frozen=True, slots=True)
class SdpaCall:
    """The decision of a dense call run as one SDPA call (path ``sdpa``)."""

    enable_gqa: bool
    """Query heads share KV heads: SDPA reads the Hkv heads without repeating K and V."""
    one_query: bool
    """Lq == 1 (decode): the output's two layouts coincide, so the cheaper layout test serves."""


@dataclass(frozen=True, slots=True)
class PagedPlan:
    """The decision of a CPU ``attention_varlen`` call (path ``rows``)."""

    plan: AttentionPlan
    """The plan of the call's token table."""
    derived: dict = field(default_factory=dict)
    """What ``run_paged`` derives from the rows (their slots and masks), kept here because a
    serving step (``runtime.serving.VarlenStep``) hands this one decision to each of its layers,
    so it is derived once per step."""


_LINEAR = Accept("linear")
# Indexed [enable_gqa][one_query], so that the decode path builds nothing.
_SDPA = tuple(
    tuple(Accept("sdpa", SdpaCall(gqa, one)) for one in (False, True)) for gqa in (False, True)
)


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
    return Accept("rows", PlannedRows(rows, call.plan(rows, ATTENTION_MENU)))


def run_attention(call: DenseAttention, accept: Accept) -> torch.Tensor:
    q, k, v = call.q, call.k, call.v
    if accept.path == "rows":
        decision: PlannedRows = accept.decision
        rows = decision.rows
        return run_dense(
            decision.plan,
            q,
            k,
            v,
            q_end=rows.q_end,
            kv_start=rows.kv_start,
            kv_lens=rows.kv_len,
            scale=call.softmax_scale,
            out=call.new_output(),
        )
    sdpa: SdpaCall = accept.decision
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=call.attn_mask,
        is_causal=call.is_causal,
        scale=call.scale,
        enable_gqa=sdpa.enable_gqa,
    )
    # The op promises the [B, Lq, H, D] memory layout of its fake implementation. Some SDPA
    # kernels write [B, H, Lq, D]; then one copy fixes it (the transpose that follows attention
    # in the model would have copied anyway). With one query both layouts are the same
    # (is_contiguous ignores size-1 dims), and is_contiguous costs a fraction of _blhd.
    if not (out.is_contiguous() if sdpa.one_query else _blhd(out)):
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
    plan = call.plan(ATTENTION_MENU)
    if call.q.device.type == "cpu":
        return Accept("rows", PagedPlan(plan))
    return Accept("plan", plan)


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    if accept.path == "rows":
        paged: PagedPlan = accept.decision
        return run_paged(
            paged.plan,
            call.q,
            call.k_cache,
            call.v_cache,
            call.kv_lens,
            block_table=call.block_table,
            block_size=call.block_size,
            scale=call.softmax_scale,
            out=call.out,
            cache=paged.derived,
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
    return Accept("rows", call.plan(ATTENTION_MENU))


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
        gemm_menu=GEMM_MENU,
    )


PROVIDER = provider()
