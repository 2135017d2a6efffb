"""The Triton provider: SmoothGEMM (``gemm.py``) and meta-attention (``attention.py``) on CUDA;
its tile menus in ``menus.py``.

Available when Triton is installed and a CUDA device is present. Under ``TRITON_INTERPRET=1``
its kernels also run on CPU tensors (slowly, for tests); it is then not in the default provider
list (no CUDA), and tests put it in front with ``use_providers``.

What its checkers decide, and the kernels then run:

- ``gemm``: the tile the SmoothGEMM plan for (N, K, dtype, ``max_tokens``) picks for this M
  (path ``smoothgemm``); declined above ``max_tokens``.
- ``attention`` (dense): the rows of padding the runtime recognises in the mask, and their plan
  for this kernel's menu (path ``rows``); other masks are declined.
- ``attention_varlen``: the plan of the call's token table (path ``plan``).
- ``attention_packed``: the plan of the packed sequences (path ``plan``); the packed keys are
  read as one block, each row from its own first token.

Every decline says why, and ``stats().declined`` counts it; the next provider (ATen) serves it.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from xy_inductor.kernels.attention_plan import AttentionMenu
from xy_inductor.kernels.calls import (
    DenseAttention,
    GemmCall,
    GemmWeight,
    PackedAttention,
    VarlenAttention,
)
from xy_inductor.kernels.contract import Accept, OpKernel, PlannedRows, Provider
from xy_inductor.kernels.triton.menus import DENSE_BLOCK, GEMM_MENU, attention_menu

__all__ = ["PROVIDER", "row_stride", "unavailable", "warm_up_gemm"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'xy-inductor[triton]')"
    if not torch.cuda.is_available():
        return "no CUDA device (Triton kernels run on CPU tensors only under TRITON_INTERPRET=1)"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting()):
        return None
    return f"{t.device.type} tensors (Triton runs CUDA, or CPU under TRITON_INTERPRET=1)"


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def row_stride(x: torch.Tensor) -> int | None:
    """The row stride of ``x [..., K]`` seen as ``[M, K]`` without a copy, or None when that
    view does not exist (K strided, or leading dims that do not collapse into one)."""
    k = x.shape[-1]
    if x.numel() == 0:
        return max(k, 1)  # nothing is read
    if x.stride(-1) != 1 and k > 1:
        return None
    stride, outer = k, None
    for size, step in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if outer is None:
            stride = step  # the innermost leading dim with more than one row
        elif step != outer:
            return None
        outer = step * size
    return stride


# -- gemm --------------------------------------------------------------------------------------


def check_gemm(call: GemmCall) -> Accept | str:
    x, weight, bias = call.x, call.weight, call.bias
    reason = _device_reason(x)
    if reason is not None:
        return reason
    if x.dtype not in DTYPES:
        return f"{x.dtype} (Triton GEMM takes float16, bfloat16, float32)"
    if row_stride(x) is None:
        return "x is not [M, K] rows with K contiguous (it would need a copy)"
    if weight.stride(1) != 1 and weight.stride(0) != 1:
        return "weight strided in both dims"
    # Triton specialises on 16-byte alignment: an unaligned pointer would compile a new variant
    # while serving. Views that start mid-row are rare; ATen serves them.
    if not (_aligned(x) and _aligned(weight)) or (bias is not None and not _aligned(bias)):
        return "input not 16-byte aligned"
    if bias is not None and bias.stride(0) != 1:
        return "bias not contiguous"
    if call.m > call.max_tokens:
        return "M above max_tokens"
    return Accept("smoothgemm", call.tile(GEMM_MENU))


def run_gemm(call: GemmCall, accept: Accept) -> torch.Tensor:
    from xy_inductor.kernels.triton.gemm import triton_gemm

    return triton_gemm(call.x, call.weight, call.bias, accept.decision)


def warm_up_gemm(gemm: GemmWeight) -> int:
    """Compile, before the first request, the tiles that serve the GEMM's range of M. Returns
    how many variants were compiled (or, under the interpreter, recorded)."""
    from xy_inductor.kernels.triton.gemm import warm_up

    weight = gemm.weight
    if weight.dtype not in DTYPES or _device_reason(weight) is not None:
        return 0
    return warm_up(gemm.tiles(GEMM_MENU), weight, has_bias=gemm.has_bias)


# -- attention ---------------------------------------------------------------------------------

_workers: dict[torch.device, int] = {}


def _menu(q: torch.Tensor, kv_heads: int) -> AttentionMenu:
    workers = _workers.get(q.device)
    if workers is None:
        props = torch.cuda.get_device_properties(q.device) if q.is_cuda else None
        workers = _workers[q.device] = props.multi_processor_count if props else 4
    return attention_menu(q.shape[1] // kv_heads, workers)


def _attention_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the attention kernel cannot take these tensors, or None."""
    reason = _device_reason(q)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"{q.dtype} (Triton attention takes float16, bfloat16, float32)"
    for size in (q.shape[-1], v.shape[-1]):
        if size < 16 or size & (size - 1):
            return "head dim not a power of two >= 16"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "q, k or v not contiguous in the head dim (it would need a copy)"
    return None


def check_attention(call: DenseAttention) -> Accept | str:
    reason = _attention_reason(call.q, call.k, call.v)
    if reason is not None:
        return reason
    rows = call.rows()
    if rows is None:
        return "mask is not rows of padding (dense or per-head mask, window, or top-left causal)"
    return Accept("rows", PlannedRows(rows, call.plan(rows, _menu(call.q, call.k.shape[1]))))


def run_attention(call: DenseAttention, accept: Accept) -> torch.Tensor:
    from xy_inductor.kernels.triton.attention import triton_attention

    decision: PlannedRows = accept.decision
    rows = decision.rows
    return triton_attention(
        decision.plan,
        call.q,
        call.k,
        call.v,
        rows.kv_len,
        scale=call.softmax_scale,
        q_end=rows.q_end,
        kv_start=rows.kv_start,
        out=call.new_output(),
    )


def check_attention_varlen(call: VarlenAttention) -> Accept | str:
    reason = _attention_reason(call.q, call.k_cache, call.v_cache)
    if reason is not None:
        return reason
    return Accept("plan", call.plan(_menu(call.q, call.k_cache.shape[2])))


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    from xy_inductor.kernels.triton.attention import triton_attention

    return triton_attention(
        accept.decision,
        call.q,
        call.k_cache,
        call.v_cache,
        call.kv_lens,
        scale=call.softmax_scale,
        block_table=call.block_table,
        block_size=call.block_size,
    )


def check_attention_packed(call: PackedAttention) -> Accept | str:
    reason = _attention_reason(call.q, call.k, call.v)
    if reason is not None:
        return reason
    return Accept("plan", call.plan(_menu(call.q, call.k.shape[1])))


def run_attention_packed(call: PackedAttention, accept: Accept) -> torch.Tensor:
    from xy_inductor.kernels.triton.attention import triton_attention

    plan = accept.decision
    key = ("triton packed table", call.q.device)
    table = plan.cache.get(key)
    if table is None:  # every row reads block 0: the whole packed tensor
        table = plan.cache[key] = torch.zeros(
            (len(call.lens), 1), dtype=torch.int32, device=call.q.device
        )
    return triton_attention(
        plan,
        call.q,
        call.k.unsqueeze(0),  # [1 block, tokens, Hkv, D]
        call.v.unsqueeze(0),
        call.lens,
        scale=call.softmax_scale,
        block_table=table,
        block_size=DENSE_BLOCK,
        kv_start=call.starts,
    )


PROVIDER = Provider(
    name="triton",
    unavailable=unavailable,
    kernels={
        "gemm": OpKernel(check_gemm, run_gemm),
        "attention": OpKernel(check_attention, run_attention),
        "attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen),
        "attention_packed": OpKernel(check_attention_packed, run_attention_packed),
    },
    prepare={"gemm": warm_up_gemm},
    gemm_menu=GEMM_MENU,
)
