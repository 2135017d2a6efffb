"""The Triton provider: SmoothGEMM (``kernels/triton_gemm.py``) and meta-attention
(``kernels/triton_attention.py``) on CUDA.

Available when Triton is installed and a CUDA device is present. Under ``TRITON_INTERPRET=1``
its kernels also run on CPU tensors (slowly, for tests); it is then not in the default provider
list (no CUDA), and tests put it in front with ``use_providers``.

A GEMM call is accepted when the plan for its (N, K, dtype, max_tokens) covers its M; the tile
that serves it comes from the plan (``runtime.gemm_plan``), a binary search per call. Calls it
declines go to the next provider (ATen), counted with the reason in ``stats().declined``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from xy_inductor.runtime.gemm_plan import MENUS, GemmPlan, plan_gemm, rows_of
from xy_inductor.runtime.providers import OpKernel, Provider

__all__ = ["PROVIDER", "gemm_plan_for", "warm_up_gemm"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> bool:
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return None
    return f"{t.device.type} tensors (Triton runs CUDA, or CPU under TRITON_INTERPRET=1)"


_plans: dict[tuple, GemmPlan] = {}


def gemm_plan_for(n: int, k: int, dtype: torch.dtype, max_tokens: int) -> GemmPlan:
    """The Triton tile plan serving this (N, K, dtype, max_tokens); built once, then a dict hit."""
    key = (n, k, dtype, max_tokens)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = plan_gemm(
            n, k, dtype=dtype, max_tokens=max_tokens, provider=MENUS["triton"].provider
        )
    return plan


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def check_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> str | None:
    reason = _device_reason(x)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"{x.dtype} (Triton GEMM takes float16, bfloat16, float32)"
    if rows_of(x) > max_tokens:
        return "M above max_tokens"
    if weight.stride(1) != 1 and weight.stride(0) != 1:
        return "weight strided in both dims"
    # Triton specialises on 16-byte alignment: an unaligned pointer would compile a new variant
    # while serving. Views that start mid-row are rare; ATen serves them.
    if not (_aligned(x) and _aligned(weight)) or (bias is not None and not _aligned(bias)):
        return "input not 16-byte aligned"
    if bias is not None and bias.stride(0) != 1:
        return "bias not contiguous"
    return None


def run_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    from xy_inductor.kernels.triton_gemm import triton_gemm

    m = rows_of(x)
    plan = gemm_plan_for(weight.shape[0], weight.shape[1], x.dtype, max_tokens)
    tile = plan.tile_for(m) if m else plan.buckets[0].tile
    return triton_gemm(x, weight, bias, tile)


def warm_up_gemm(
    weight: torch.Tensor, *, has_bias: bool, max_tokens: int, rows: tuple[int, int] | None = None
) -> int:
    """Compile, before the first request, the tiles that serve M in ``rows`` (default
    1…max_tokens) for this weight. Returns how many variants were compiled (or, under the
    interpreter, recorded)."""
    from xy_inductor.kernels.triton_gemm import warm_up

    if weight.dtype not in DTYPES:
        return 0
    if _device_reason(weight) is not None:
        return 0
    plan = gemm_plan_for(weight.shape[0], weight.shape[1], weight.dtype, max_tokens)
    lo, hi = rows if rows is not None else (1, max_tokens)
    tiles = tuple(
        dict.fromkeys(
            b.tile
            for b in plan.buckets
            if b.tile is not None and b.hi >= max(lo, 1) and b.lo <= min(hi, max_tokens)
        )
    )
    return warm_up(tiles, weight, has_bias=has_bias)


def _rows(q, k, attn_mask, is_causal):
    from xy_inductor.kernels.cpu import dense_rows

    return dense_rows(q, k, attn_mask, is_causal, min_scores=0)


def _attention_reason(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the attention kernel cannot take these tensors, or None."""
    reason = _device_reason(q)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"{q.dtype} (Triton attention takes float16, bfloat16, float32)"
    for size in (q.shape[-1], v.shape[-1]):
        if size < 16 or size & (size - 1):
            return "head dim not a power of two >= 16"
    return None


def _attention_menu(q: torch.Tensor, kv_heads: int):
    from xy_inductor.kernels.triton_attention import menu_for

    workers = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    return menu_for(q.shape[1] // kv_heads, workers)


def check_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> str | None:
    reason = _attention_reason(q, v)
    if reason is not None:
        return reason
    if _rows(q, k, attn_mask, is_causal) is None:
        return "mask is not rows of padding (dense or per-head mask, window, or top-left causal)"
    return None


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    from xy_inductor.kernels.triton_attention import triton_attention
    from xy_inductor.runtime.attention_plan import plan_attention
    from xy_inductor.runtime.ops import attention_output

    rows = _rows(q, k, attn_mask, is_causal)
    hkv = k.shape[1]
    menu = _attention_menu(q, hkv)
    plan = plan_attention(rows.q_len, rows.kv_len, causal=rows.causal, kv_heads=hkv, menu=menu)
    return triton_attention(
        plan,
        q,
        k,
        v,
        rows.kv_len,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        q_end=rows.q_end,
        kv_start=rows.kv_start,
        out=attention_output(q, v),
    )


def check_attention_varlen(
    q, k_cache, v_cache, q_lens, kv_lens, block_table, causal, window, scale
):
    return _attention_reason(q, v_cache)


def run_attention_varlen(q, k_cache, v_cache, q_lens, kv_lens, block_table, causal, window, scale):
    from xy_inductor.kernels.triton_attention import triton_attention
    from xy_inductor.runtime.attention_plan import plan_attention

    hkv = k_cache.shape[2]
    menu = _attention_menu(q, hkv)
    plan = plan_attention(q_lens, kv_lens, causal=causal, window=window, kv_heads=hkv, menu=menu)
    return triton_attention(
        plan,
        q,
        k_cache,
        v_cache,
        kv_lens,
        scale=scale if scale is not None else q.shape[-1] ** -0.5,
        block_table=block_table,
        block_size=k_cache.shape[1],
    )


PROVIDER = Provider(
    name="triton",
    available=available,
    kernels={
        "gemm": OpKernel(check_gemm, run_gemm),
        "attention": OpKernel(check_attention, run_attention),
        "attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen),
    },
    prepare={"gemm": warm_up_gemm},
)
