"""The Ascend provider: xyserve's ops on torch_npu's prebuilt AscendC operators.

Available when ``torch_npu`` imports and ``torch.npu.is_available()``; the import is guarded,
and a failure is a reason ``xyserve providers`` and ``stats()`` show, never an exception. With
``XYSERVE_ASCEND_ON_CPU=1`` it also accepts CPU tensors and calls whatever module ``import
torch_npu`` yields: the tests' strict stand-in of the documented operator contract
(``tests/torch_npu_standin.py``), the way Triton's interpreter lets its kernels run here.

What its checkers decide, and the kernels then run (sources: Ascend/op-plugin's
``torch_npu-npu_fused_infer_attention_score.md``, vllm-ascend's ``attention_v1.py``,
summarised in the team's ASCEND.md):

- ``attention_varlen``: ONE ``npu_fused_infer_attention_score`` (FIA) call per step, the way
  vllm-ascend serves mixed batches. Head dim 128 (what TND takes on Atlas A2/A3): layout TND,
  ``actual_seq_lengths`` the cumulative query lengths, ``actual_seq_lengths_kv`` each row's
  KV length, the ``[blocks, block_size, Hkv, D]`` cache viewed ``[blocks, block_size, Hkv·D]``
  (BnBsH; a 4-D cache would be read as ``[blocks, Hkv, block_size, D]``), the block table,
  ``sparse_mode=3`` with the compressed 2048×2048 mask (built once per device) for causal rows,
  ``sparse_mode=4`` for a sliding window (``band_tokens``: open after the query when not
  causal). Other head dims: layout BSND, the packed queries padded to ``[rows, longest, Hq,
  D]`` (one copy in, one out), per-row lengths.
- ``attention`` (the dense form of the Hugging Face path): the rows of padding the runtime
  recognises in the mask become per-row lengths and one padding count per side; layout
  ``BNSD_BSND`` (``BNSD`` for one query slot), which writes the op's ``[B, Lq, Hq, D]`` output
  layout directly. A query that is not contiguous as ``[B, Hq, Lq, D]`` is copied (counted as
  path ``bnsd+qcopy``; the KV cache never is). FIA's output for padding slots is unspecified;
  the kernel zeroes them, as SDPA writes them.
- ``attention_packed`` (a prompt batch packed without padding): one FIA call in TND with the
  packed keys themselves (``actual_seq_lengths_kv`` cumulative, no block table).
- ``gemm``: ``F.linear`` on NPU tensors (aclnn's matmul kernels). With the option
  ``ascend_nz_weights`` the backend casts each weight to FRACTAL_NZ once at compile time.

Declined with a reason (counted in ``stats().declined``; the next provider serves the call):
float32 attention, head counts, ratios or dims outside FIA's limits, block sizes page attention
refuses, inputs it would have to copy (a KV cache not contiguous), masks that are not rows of
padding (additive float masks included: FIA takes bool masks, biases would go through
``pse_shift``), non-causal varlen rows without a window (TND with ``sparse_mode=0`` and no mask
returned a uniform average, vllm-ascend#13699), and windowed decode-only batches outside TND
(the incremental kernel ignores ``pre_tokens``).

Nothing here has run on an NPU: the contract is verified through the stand-in, not speed or
the device's own numerics.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from xy_inductor.kernels.calls import (
    DenseAttention,
    GemmCall,
    GemmWeight,
    PackedAttention,
    VarlenAttention,
)
from xy_inductor.kernels.contract import Accept, OpKernel, Provider

__all__ = [
    "BLOCK_SIZES",
    "ON_CPU_ENV",
    "PROVIDER",
    "band_tokens",
    "compressed_mask",
    "unavailable",
]

ON_CPU_ENV = "XYSERVE_ASCEND_ON_CPU"
FRACTAL_NZ = 29  # torch_npu's format id for the NZ layout of matmul weights
# Page attention with query rows longer than 1 takes multiples of 128 up to 512 (valid for
# every layout and both kernels); 128 is what vllm-ascend uses.
BLOCK_SIZES = (128, 256, 384, 512)
MAX_HEADS = 256
MAX_GROUP = 64
MAX_HEAD_DIM = 512
TND_HEAD_DIMS = (128,)  # Atlas A2/A3 TND without rope: Q, K and V head dims of 128
MAX_TND_ROWS = 4096
INT_MAX = 2147483647
DTYPES = (torch.float16, torch.bfloat16)


def band_tokens(window: int, causal: bool) -> tuple[int, int]:
    """``(pre_tokens, next_tokens)`` of ``sparse_mode=4`` for our window: a query at position p
    sees keys p - window < j, and j <= p when ``causal`` (without it, every later key too: the
    op's reading of ``causal=False`` with a window, which ATen and Triton compute). The one
    place the reading of ``pre_tokens`` is pinned: the band keeps keys ``p - pre_tokens … p``,
    so ``pre_tokens = window - 1``. The documents do not settle whether the query's own key
    counts; if a device run shows it does, this is the line to change (tests check both readings
    against the stand-in). ``next_tokens`` counts keys after the diagonal (documented default
    INT_MAX: all of them)."""
    return window - 1, 0 if causal else INT_MAX


# -- availability --------------------------------------------------------------------------------


def _on_cpu() -> bool:
    return os.environ.get(ON_CPU_ENV, "0") == "1"


def _torch_npu() -> ModuleType:
    return importlib.import_module("torch_npu")


def unavailable() -> str | None:
    if "torch_npu" not in sys.modules and importlib.util.find_spec("torch_npu") is None:
        return (
            "torch_npu is not installed (it needs Ascend's CANN; pip install torch-npu "
            "matching torch)"
        )
    try:
        _torch_npu()
    except Exception as e:  # a broken install (no CANN) raises anything; it is a reason here
        return f"torch_npu failed to import ({type(e).__name__}: {e})"
    if _on_cpu():
        return None
    npu = getattr(torch, "npu", None)
    if npu is None or not npu.is_available():
        return "no NPU device (torch.npu.is_available() is False)"
    return None


def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "npu" or (t.device.type == "cpu" and _on_cpu()):
        return None
    return f"{t.device.type} tensors (FIA runs on NPU, or on CPU under {ON_CPU_ENV}=1)"


def _heads_reason(hq: int, hkv: int, d: int, dv: int) -> str | None:
    if hq > MAX_HEADS or hkv > MAX_HEADS:
        return f"{hq} query / {hkv} KV heads (FIA takes at most {MAX_HEADS})"
    if hq // hkv > MAX_GROUP:
        return f"{hq // hkv} query heads per KV head (FIA takes at most {MAX_GROUP})"
    if d != dv:
        return f"value head dim {dv} differs from {d} (FIA's key and value share one shape)"
    if d > MAX_HEAD_DIM or d % 8:
        return f"head dim {d} (FIA takes multiples of 8 up to {MAX_HEAD_DIM})"
    return None


def _tensor_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    reason = _device_reason(q)
    if reason is not None:
        return reason
    if q.dtype not in DTYPES:
        return f"{q.dtype} attention (FIA takes float16 or bfloat16)"
    return None


_masks: dict[torch.device, torch.Tensor] = {}


def compressed_mask(device: torch.device) -> torch.Tensor:
    """The compressed causal mask sparse modes 3 and 4 take: ``triu(ones(2048, 2048), 1)`` as
    int8, 1 = masked. Built once per device."""
    mask = _masks.get(device)
    if mask is None:
        mask = _masks[device] = torch.ones(2048, 2048, dtype=torch.int8).triu(1).to(device)
    return mask


# -- gemm ----------------------------------------------------------------------------------------

_LINEAR = Accept("linear")


def check_gemm(call: GemmCall) -> Accept | str:
    reason = _device_reason(call.x)
    if reason is not None:
        return reason
    if call.x.dtype not in (*DTYPES, torch.float32):
        return f"{call.x.dtype} (aclnn matmul takes float16, bfloat16, float32)"
    return _LINEAR


def run_gemm(call: GemmCall, accept: Accept) -> torch.Tensor:
    return F.linear(call.x, call.weight, call.bias)


def prepare_gemm(gemm: GemmWeight) -> int:
    """With ``nz_weights``: cast the weight to FRACTAL_NZ in place, once (aclnn's WeightNz
    kernels). Its values stay; its device storage format changes. Returns 0: nothing is
    compiled."""
    weight = gemm.weight
    if not gemm.nz_weights or _device_reason(weight) is not None or weight.dtype not in DTYPES:
        return 0
    npu = _torch_npu()
    if npu.get_npu_format(weight) != FRACTAL_NZ:
        with torch.no_grad():
            npu.npu_format_cast_(weight, FRACTAL_NZ)
    return 0


# -- attention_varlen: one FIA call per step -----------------------------------------------------


@dataclass(frozen=True)
class VarlenFia:
    """What the varlen checker decided: the FIA call's layout and scalar arguments."""

    layout: str
    """``TND`` (head dim 128) or ``BSND`` (queries padded per row)."""
    actual_q: tuple[int, ...]
    """TND: cumulative query lengths; BSND: each row's query length."""
    actual_kv: tuple[int, ...]
    """Each row's KV length (absolute: the cache is paged)."""
    sparse_mode: int
    pre_tokens: int
    next_tokens: int
    longest: int
    """BSND: the padded query length (the longest row)."""


def check_attention_varlen(call: VarlenAttention) -> Accept | str:
    q, k, v = call.q, call.k_cache, call.v_cache
    if call.tree is not None:
        # FIA's one step-wide mask (sparse_mode 3) is causal; a per-row tree mask is not in the
        # documented contract, so tree verify rows go to a provider that runs them.
        return "tree verify rows (FIA takes no per-row tree mask)"
    reason = _tensor_reason(q, k, v)
    if reason is not None:
        return reason
    hq, d = q.shape[1], q.shape[2]
    bs, hkv = k.shape[1], k.shape[2]
    reason = _heads_reason(hq, hkv, d, v.shape[3])
    if reason is not None:
        return reason
    if bs not in BLOCK_SIZES:
        return f"block size {bs} (FIA's page attention takes {', '.join(map(str, BLOCK_SIZES))})"
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return "q or the KV cache is not contiguous (FIA would need a copy)"
    if not call.causal and call.window is None:
        return (
            "non-causal rows without a window: FIA's TND with sparse_mode=0 and no mask returned "
            "a uniform average (vllm-ascend#13699)"
        )
    rows = len(call.q_lens)
    longest = max(call.q_lens, default=0)
    if call.window is not None:
        mode, (pre, nxt) = 4, band_tokens(call.window, call.causal)
    else:
        mode, (pre, nxt) = 3, (INT_MAX, INT_MAX)
    if d in TND_HEAD_DIMS:
        if rows > MAX_TND_ROWS:
            return f"{rows} rows (TND takes at most {MAX_TND_ROWS})"
        cum, total = [], 0
        for n in call.q_lens:
            total += n
            cum.append(total)
        decision = VarlenFia("TND", tuple(cum), call.kv_lens, mode, pre, nxt, longest)
        return Accept("tnd", decision)
    if longest == 1 and call.window is not None:
        return "windowed decode rows outside TND (the incremental kernel ignores pre_tokens)"
    decision = VarlenFia("BSND", call.q_lens, call.kv_lens, mode, pre, nxt, longest)
    return Accept("bsnd", decision)


def _fia_varlen(
    call: VarlenAttention, fia: VarlenFia, q: torch.Tensor, layout: str
) -> torch.Tensor:
    k, v = call.k_cache, call.v_cache
    nb, bs, hkv, d = k.shape
    incremental = layout != "TND" and fia.longest == 1
    sparse = {}
    if not incremental:
        sparse = {"atten_mask": compressed_mask(q.device), "sparse_mode": fia.sparse_mode}
        if fia.sparse_mode == 4:
            sparse.update(pre_tokens=fia.pre_tokens, next_tokens=fia.next_tokens)
    out, _ = _torch_npu().npu_fused_infer_attention_score(
        q,
        k.view(nb, bs, hkv * d),  # BnBsH: a 4-D cache would be read as [nb, Hkv, bs, D]
        v.view(nb, bs, hkv * d),
        actual_seq_lengths=list(fia.actual_q),
        actual_seq_lengths_kv=list(fia.actual_kv),
        block_table=call.block_table.to(torch.int32),
        block_size=bs,
        num_heads=q.shape[-2],
        num_key_value_heads=hkv,
        scale=call.softmax_scale,
        input_layout=layout,
        **sparse,
    )
    return out


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    fia: VarlenFia = accept.decision
    if fia.layout == "TND":
        return _fia_varlen(call, fia, call.q, "TND")
    # BSND: the packed queries padded per row, and the real rows gathered back.
    q = call.q
    rows = len(fia.actual_q)
    row = torch.repeat_interleave(torch.arange(rows), torch.tensor(fia.actual_q))
    starts = torch.tensor([0, *fia.actual_q]).cumsum(0)[:-1]
    slot = torch.arange(q.shape[0]) - starts[row]
    row, slot = row.to(q.device), slot.to(q.device)
    padded = q.new_zeros((rows, fia.longest, q.shape[1], q.shape[2]))
    padded[row, slot] = q
    out = _fia_varlen(call, fia, padded, "BSND")
    return out[row, slot]


# -- attention_packed: a prompt batch without its padding, TND over the packed keys -----------


def check_attention_packed(call: PackedAttention) -> Accept | str:
    q, k, v = call.q, call.k, call.v
    reason = _tensor_reason(q, k, v)
    if reason is not None:
        return reason
    d = q.shape[2]
    reason = _heads_reason(q.shape[1], k.shape[1], d, v.shape[2])
    if reason is not None:
        return reason
    if d not in TND_HEAD_DIMS:
        return f"packed rows of head dim {d} (TND takes {TND_HEAD_DIMS[0]} on Atlas A2/A3)"
    if len(call.lens) > MAX_TND_ROWS:
        return f"{len(call.lens)} rows (TND takes at most {MAX_TND_ROWS})"
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return "packed q/k/v not contiguous (FIA would need a copy)"
    if not call.causal and call.window is None:
        return "non-causal rows without a window (TND with sparse_mode=0: vllm-ascend#13699)"
    cum, total = [], 0
    for n in call.lens:
        total += n
        cum.append(total)
    if call.window is not None:
        mode, (pre, nxt) = 4, band_tokens(call.window, call.causal)
    else:
        mode, (pre, nxt) = 3, (INT_MAX, INT_MAX)
    return Accept("tnd", VarlenFia("TND", tuple(cum), tuple(cum), mode, pre, nxt, max(call.lens)))


def run_attention_packed(call: PackedAttention, accept: Accept) -> torch.Tensor:
    fia: VarlenFia = accept.decision
    q = call.q
    sparse: dict[str, object] = {"atten_mask": compressed_mask(q.device), "sparse_mode": 3}
    if fia.sparse_mode == 4:
        sparse.update(sparse_mode=4, pre_tokens=fia.pre_tokens, next_tokens=fia.next_tokens)
    out, _ = _torch_npu().npu_fused_infer_attention_score(
        q,
        call.k,
        call.v,
        actual_seq_lengths=list(fia.actual_q),
        actual_seq_lengths_kv=list(fia.actual_kv),  # cumulative: the keys are packed too
        num_heads=q.shape[1],
        num_key_value_heads=call.k.shape[1],
        scale=call.softmax_scale,
        input_layout="TND",
        **sparse,
    )
    return out


# -- attention: the dense form, rows of padding as lengths ---------------------------------------


@dataclass(frozen=True)
class DenseFia:
    """What the dense checker decided: per-row lengths, padding counts, causal mode."""

    layout: str
    """``BNSD_BSND`` (Lq > 1) or ``BNSD`` (one query slot)."""
    actual_q: tuple[int, ...] | None
    actual_kv: tuple[int, ...]
    q_pad: int | None
    """Left padding: each row's queries end this many slots before Lq (None: they start at 0)."""
    kv_pad: int | None
    causal: bool
    q_copy: bool
    """The query is not contiguous as [B, Hq, Lq, D]: one copy of it."""
    padded_slots: tuple[tuple[int, int], ...]
    """Per row, the query slots ``[start, end)`` that hold its queries (others are zeroed)."""


def _side(starts: tuple[int, ...], ends: tuple[int, ...], size: int) -> tuple[bool, int | None]:
    """Whether rows with these ``[start, end)`` slots fit FIA's one-sided padding, and the
    left-padding count (None: right padding, every row starts at slot 0)."""
    if all(s == 0 for s in starts):
        return True, None
    if len(set(ends)) == 1:
        return True, size - ends[0]
    return False, None


def check_attention(call: DenseAttention) -> Accept | str:
    q, k, v = call.q, call.k, call.v
    reason = _tensor_reason(q, k, v)
    if reason is not None:
        return reason
    hq, lq, d = q.shape[1], q.shape[2], q.shape[3]
    hkv, lk = k.shape[1], k.shape[2]
    reason = _heads_reason(hq, hkv, d, v.shape[3])
    if reason is not None:
        return reason
    if not (k.is_contiguous() and v.is_contiguous()):
        return "k/v not contiguous as [B, Hkv, Lk, D] (FIA would need a copy of the cache)"
    rows = call.rows()
    if rows is None:
        mask = call.attn_mask
        if mask is not None and mask.dtype.is_floating_point:
            return (
                "additive float mask that is not rows of padding (FIA takes bool masks, 1 = "
                "masked; a bias would need pse_shift)"
            )
        return "mask is not rows of padding (per-head or windowed mask, or top-left causal)"
    if any(n == 0 for n in rows.q_len) or any(m == 0 for m in rows.kv_len):
        return "a row with no queries or no keys"
    q_starts = tuple(e - n for e, n in zip(rows.q_end, rows.q_len, strict=True))
    ok_q, q_pad = _side(q_starts, rows.q_end, lq)
    kv_ends = tuple(s + m for s, m in zip(rows.kv_start, rows.kv_len, strict=True))
    ok_kv, kv_pad = _side(rows.kv_start, kv_ends, lk)
    if not (ok_q and ok_kv):
        return "rows padded on both sides (FIA takes one padding count per side)"
    decision = DenseFia(
        layout="BNSD_BSND" if lq > 1 else "BNSD",
        actual_q=rows.q_len if lq > 1 else None,
        actual_kv=rows.kv_len,
        q_pad=q_pad if lq > 1 else None,
        kv_pad=kv_pad,
        causal=rows.causal,
        q_copy=not q.is_contiguous(),
        padded_slots=tuple(zip(q_starts, rows.q_end, strict=True)),
    )
    return Accept("bnsd+qcopy" if decision.q_copy else "bnsd", decision)


def run_attention(call: DenseAttention, accept: Accept) -> torch.Tensor:
    fia: DenseFia = accept.decision
    q, k, v = call.q, call.k, call.v
    b, hq, lq, d = q.shape
    extra: dict[str, object] = {}
    if fia.actual_q is not None:
        extra["actual_seq_lengths"] = list(fia.actual_q)
    if fia.q_pad is not None:
        extra["query_padding_size"] = torch.tensor([fia.q_pad], device=q.device)
    if fia.kv_pad is not None:
        extra["kv_padding_size"] = torch.tensor([fia.kv_pad], device=q.device)
    if fia.causal and lq > 1:
        extra.update(atten_mask=compressed_mask(q.device), sparse_mode=3)
    out, _ = _torch_npu().npu_fused_infer_attention_score(
        q.contiguous() if fia.q_copy else q,
        k,
        v,
        actual_seq_lengths_kv=list(fia.actual_kv),
        num_heads=hq,
        num_key_value_heads=k.shape[1],
        scale=call.softmax_scale,
        input_layout=fia.layout,
        **extra,
    )
    # The op's layout: [B, Hq, Lq, D] stored as [B, Lq, Hq, D]. BNSD_BSND writes exactly that;
    # with one query slot the two layouts hold the same bytes.
    result = out.transpose(1, 2) if fia.layout == "BNSD_BSND" else out
    result = result.as_strided((b, hq, lq, d), (lq * hq * d, d, hq * d, 1))
    if any(s > 0 or e < lq for s, e in fia.padded_slots):
        keep = torch.zeros(b, lq, dtype=torch.bool)
        for r, (s, e) in enumerate(fia.padded_slots):
            keep[r, s:e] = True
        result.masked_fill_(~keep.to(q.device)[:, None, :, None], 0)
    return result


PROVIDER = Provider(
    name="ascend",
    unavailable=unavailable,
    kernels={
        "gemm": OpKernel(check_gemm, run_gemm),
        "attention": OpKernel(check_attention, run_attention),
        "attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen),
        "attention_packed": OpKernel(check_attention_packed, run_attention_packed),
    },
    prepare={"gemm": prepare_gemm},
)
