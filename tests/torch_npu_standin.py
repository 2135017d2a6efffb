"""A strict stand-in for the parts of ``torch_npu`` the Ascend provider calls, on CPU tensors.

No NPU exists on the team's machines, and installing ``torch_npu`` without CANN breaks
``import torch``. So the provider is tested against this module, put in ``sys.modules["torch_npu"]``
by the tests. It implements the documented contract of ``npu_fused_infer_attention_score``
(FIA) as written in Ascend/op-plugin's ``docs/zh/custom_APIs/torch_npu/
torch_npu-npu_fused_infer_attention_score.md`` (Atlas A2/A3 rows) and summarised in
``docs/ascend.md``, computes the attention in float32 like the device's kernels, and fails
loudly where the real operator would fail or, worse, silently compute something else:

- a float32 query, a float mask, a mask with SDPA's polarity (True = keep) or anything but the
  compressed ``triu(ones(2048, 2048), 1)`` for sparse modes 2/3/4;
- TND lengths that are not cumulative or do not end at the token count, a TND head dim the
  A2/A3 kernels do not take (128), sparse modes TND does not allow, and TND with sparse mode 0
  and no mask (a known silent bug: a uniform average, vllm-ascend#13699);
- a paged cache passed 4-D as ``[blocks, block_size, Hkv, D]`` (FIA reads a 4-D cache as
  ``[blocks, Hkv, block_size, D]``), block sizes page attention refuses, block ids out of range;
- a missing ``scale`` (the default 1.0 is not 1/√D), unknown keywords (the signature is the
  documented one), non-contiguous tensors, head counts and dims outside the limits.

What the real operator leaves unspecified, the stand-in makes visible: query slots outside a
batch's actual length read NaN, so a caller that forgets them is caught.

Band mode (``sparse_mode=4``): whether ``pre_tokens=W`` keeps W keys before the query or W + 1
(itself included) is not settled by the documents. ``BAND.pre_counts_self`` picks the reading
(default False: keys ``p - pre_tokens … p + next_tokens`` are visible, so ``pre_tokens=W`` keeps
W + 1 keys); tests run the provider under both readings.

This module checks the call's arguments and computes batch by batch; how the keys and values are
read (paged, dense, TND), which keys a query sees and the float32 attention are in
``torch_npu_standin_kv.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch_npu_standin_kv import (
    BAND,
    INT_MAX,
    FiaContractError,
    attend,
    check_compressed_mask,
    dense_kv,
    fail,
    lengths,
    paged_kv,
    per_batch,
    visible_keys,
)

__all__ = [
    "BAND",
    "FRACTAL_NZ",
    "FiaContractError",
    "calls",
    "get_npu_format",
    "npu_format_cast",
    "npu_format_cast_",
    "npu_fused_infer_attention_score",
]

FRACTAL_NZ = 29
_ND = 2
_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")


calls: list[dict] = []
"""Every FIA call's keyword arguments (tensors summarised by shape), for tests to inspect."""


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()


# -- formats (FRACTAL_NZ weights) ---------------------------------------------------------------


def npu_format_cast_(t: torch.Tensor, fmt: int) -> torch.Tensor:
    """In place: the values stay, the device storage format changes (recorded here)."""
    t._standin_npu_format = fmt
    return t


def npu_format_cast(t: torch.Tensor, fmt: int) -> torch.Tensor:
    out = t.clone()
    out._standin_npu_format = fmt
    return out


def get_npu_format(t: torch.Tensor) -> int:
    return getattr(t, "_standin_npu_format", _ND)


# -- FIA ------------------------------------------------------------------------------------------


def npu_fused_infer_attention_score(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    pse_shift: torch.Tensor | None = None,
    atten_mask: torch.Tensor | None = None,
    actual_seq_lengths: Sequence[int] | None = None,
    actual_seq_lengths_kv: Sequence[int] | None = None,
    dequant_scale1: torch.Tensor | None = None,
    quant_scale1: torch.Tensor | None = None,
    dequant_scale2: torch.Tensor | None = None,
    quant_scale2: torch.Tensor | None = None,
    quant_offset2: torch.Tensor | None = None,
    antiquant_scale: torch.Tensor | None = None,
    antiquant_offset: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    query_padding_size: torch.Tensor | None = None,
    kv_padding_size: torch.Tensor | None = None,
    key_antiquant_scale: torch.Tensor | None = None,
    key_antiquant_offset: torch.Tensor | None = None,
    value_antiquant_scale: torch.Tensor | None = None,
    value_antiquant_offset: torch.Tensor | None = None,
    key_shared_prefix: torch.Tensor | None = None,
    value_shared_prefix: torch.Tensor | None = None,
    actual_shared_prefix_len: Sequence[int] | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    key_rope_antiquant_scale: torch.Tensor | None = None,
    num_heads: int = 1,
    scale: float | _Unset = _UNSET,
    pre_tokens: int = INT_MAX,
    next_tokens: int = INT_MAX,
    input_layout: str = "BSH",
    num_key_value_heads: int = 0,
    sparse_mode: int = 0,
    inner_precise: int = 0,
    block_size: int = 0,
    antiquant_mode: int = 0,
    softmax_lse_flag: bool = False,
    key_antiquant_mode: int = 0,
    value_antiquant_mode: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FIA on CPU tensors, per the documented contract (module docstring)."""
    unmodelled = {
        "pse_shift": pse_shift,
        "dequant_scale1": dequant_scale1,
        "quant_scale1": quant_scale1,
        "dequant_scale2": dequant_scale2,
        "quant_scale2": quant_scale2,
        "quant_offset2": quant_offset2,
        "antiquant_scale": antiquant_scale,
        "antiquant_offset": antiquant_offset,
        "key_antiquant_scale": key_antiquant_scale,
        "key_antiquant_offset": key_antiquant_offset,
        "value_antiquant_scale": value_antiquant_scale,
        "value_antiquant_offset": value_antiquant_offset,
        "key_shared_prefix": key_shared_prefix,
        "value_shared_prefix": value_shared_prefix,
        "actual_shared_prefix_len": actual_shared_prefix_len,
        "query_rope": query_rope,
        "key_rope": key_rope,
        "key_rope_antiquant_scale": key_rope_antiquant_scale,
    }
    for name, given in unmodelled.items():
        if given is not None:
            raise NotImplementedError(f"the torch_npu stand-in does not model {name}")
    if antiquant_mode or key_antiquant_mode or value_antiquant_mode or softmax_lse_flag:
        raise NotImplementedError("the torch_npu stand-in does not model quantization or lse")

    # -- scalars and dtypes ---------------------------------------------------------------------
    if isinstance(scale, _Unset):
        fail("scale not given: its default 1.0 is not 1/sqrt(D); pass scale=")
    if query.dtype not in (torch.float16, torch.bfloat16):
        fail(f"query must be float16 or bfloat16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            fail(f"{name} is {t.dtype}, query {query.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_contiguous():
            fail(f"{name} is not contiguous (FIA takes no strided tensors)")
    if tuple(key.shape) != tuple(value.shape):
        fail(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if input_layout not in _LAYOUTS:
        raise NotImplementedError(f"the torch_npu stand-in does not model layout {input_layout}")
    if sparse_mode not in (0, 2, 3, 4):
        fail(f"sparse_mode {sparse_mode} (1 and 5-8 are not modelled or not supported)")
    if inner_precise not in (0, 1, 2, 3):
        fail(f"inner_precise must be 0-3, got {inner_precise}")
    hq = num_heads
    hkv = num_key_value_heads or num_heads
    if not (1 <= hq <= 256 and 1 <= hkv <= 256) or hq % hkv or hq // hkv > 64:
        fail(f"num_heads {hq} and num_key_value_heads {hkv}: need <= 256, a multiple, ratio <= 64")
    d = query.shape[-1]
    if d > 512 or d % 8:
        fail(f"head dim {d}: FIA takes D <= 512, 16-byte aligned")

    # -- query layout -----------------------------------------------------------------------------
    tnd = input_layout == "TND"
    if tnd:
        if query.dim() != 3 or query.shape[1] != hq:
            fail(f"TND query must be [T, {hq}, D], got {tuple(query.shape)}")
        if d != 128:
            fail(f"TND takes head dim 128 on Atlas A2/A3 (Q/K 192 not modelled), got {d}")
        if actual_seq_lengths is None or actual_seq_lengths_kv is None:
            fail("TND needs actual_seq_lengths and actual_seq_lengths_kv")
        cum = lengths("actual_seq_lengths", actual_seq_lengths)
        if any(b < a for a, b in itertools.pairwise(cum)):
            fail(f"TND actual_seq_lengths must be cumulative (non-decreasing), got {cum}")
        if not cum or cum[-1] != query.shape[0]:
            fail(f"TND actual_seq_lengths must end at T={query.shape[0]}, got {cum}")
        if len(cum) > 4096:
            fail(f"TND takes at most 4096 batches, got {len(cum)}")
        batch = len(cum)
        q_len = [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)]
        q_slots = max(q_len, default=0)
        if sparse_mode not in (0, 3, 4):
            fail(f"TND takes sparse_mode 0 (no mask), 3 or 4, got {sparse_mode}")
        if sparse_mode == 0 and atten_mask is None:
            fail("TND with sparse_mode=0 and no mask: a known silent bug (vllm-ascend#13699)")
        if sparse_mode == 0:
            fail("TND with sparse_mode=0 and a mask is not allowed")
    else:
        if query.dim() != (3 if input_layout == "BSH" else 4):
            fail(f"{input_layout} query has {query.dim()} dims")
        batch = query.shape[0]
        heads_dim = 1 if input_layout.startswith("BNSD") else 2
        if input_layout != "BSH" and query.shape[heads_dim] != hq:
            fail(f"{input_layout} query has {query.shape[heads_dim]} heads, num_heads={hq}")
        q_slots = query.shape[2] if heads_dim == 1 else query.shape[1]
        if input_layout == "BNSD_BSND" and q_slots == 1:
            fail("BNSD_BSND takes Q_S > 1 only")
        q_len = (
            [q_slots] * batch
            if actual_seq_lengths is None
            else per_batch(
                "actual_seq_lengths", lengths("actual_seq_lengths", actual_seq_lengths), batch
            )
        )
        if any(n > q_slots for n in q_len):
            fail(f"actual_seq_lengths {q_len} exceed the query's S={q_slots}")
    incremental = not tnd and q_slots == 1
    if sparse_mode in (2, 3, 4) and not incremental:
        check_compressed_mask(atten_mask, sparse_mode)
    elif atten_mask is not None and atten_mask.dtype.is_floating_point:
        fail(f"atten_mask must be bool, int8 or uint8 (1 = masked), got {atten_mask.dtype}")
    if (
        not incremental
        and sparse_mode in (0, 2, 3)
        and (pre_tokens, next_tokens)
        != (
            INT_MAX,
            INT_MAX,
        )
    ):
        fail("pre_tokens/next_tokens are only modelled with sparse_mode=4")

    # -- padding --------------------------------------------------------------------------
    def pad_value(name: str, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if t.dtype != torch.int64 or t.numel() != 1:
            fail(f"{name} must be a one-element int64 tensor, got {t.dtype} {tuple(t.shape)}")
        return max(int(t.item()), 0)

    q_pad = pad_value("query_padding_size", query_padding_size)
    kv_pad = pad_value("kv_padding_size", kv_padding_size)
    if q_pad is not None and (incremental or tnd or actual_seq_lengths is None):
        fail("query_padding_size needs Q_S > 1, a non-TND layout and actual_seq_lengths")
    if kv_pad is not None and (tnd or actual_seq_lengths_kv is None):
        fail("kv_padding_size needs a non-TND layout and actual_seq_lengths_kv")

    # -- keys: paged or dense -------------------------------------------------------------
    paged = block_table is not None
    if paged:
        kv_len, kv_of = paged_kv(
            key=key,
            value=value,
            block_table=block_table,
            block_size=block_size,
            actual_seq_lengths_kv=actual_seq_lengths_kv,
            input_layout=input_layout,
            batch=batch,
            hkv=hkv,
            d=d,
            incremental=incremental,
            q_pad=q_pad,
            kv_pad=kv_pad,
        )
    else:
        kv_len, kv_of = dense_kv(
            query=query,
            key=key,
            value=value,
            actual_seq_lengths_kv=actual_seq_lengths_kv,
            input_layout=input_layout,
            tnd=tnd,
            batch=batch,
            hkv=hkv,
            d=d,
            kv_pad=kv_pad,
        )

    # -- compute, batch by batch -----------------------------------------------------------------
    if tnd:
        out = torch.full((query.shape[0], hq, d), float("nan"), dtype=torch.float32)
    else:
        out = torch.full((batch, hq, q_slots, d), float("nan"), dtype=torch.float32)
    q4 = None
    if not tnd:
        if input_layout.startswith("BNSD"):
            q4 = query
        else:
            q4 = query.view(batch, q_slots, hq, d).transpose(1, 2)
    start = 0
    for b in range(batch):
        n = q_len[b]
        k_b, v_b = kv_of(b)
        if tnd:
            q_b = query[start : start + n].transpose(0, 1)
        else:
            lo = (q_slots - q_pad - n) if q_pad is not None else 0
            if lo < 0:
                fail(f"batch {b}: query padding leaves no room for {n} queries")
            q_b = q4[b, :, lo : lo + n]
        m = kv_len[b]
        if incremental:  # the incremental kernel: sparse_mode and pre/next tokens are ignored
            visible = torch.ones(n, m, dtype=torch.bool)
        else:
            mask_b = None
            if sparse_mode == 0 and atten_mask is not None:
                mask_b = atten_mask.reshape(-1, *atten_mask.shape[-2:])[
                    b if atten_mask.dim() >= 3 and atten_mask.shape[0] == batch else 0
                ][:n, :m]
            visible = visible_keys(n, m, sparse_mode, pre_tokens, next_tokens, mask_b)
        # Row-invalid correction is automatic where the op can see it (sparse_mode 3, Q > KV).
        auto = sparse_mode == 3 and n > m
        o, _ = attend(q_b, k_b, v_b, visible, float(scale), bool(inner_precise & 2) or auto)
        if m == 0:
            o = torch.zeros_like(o)  # empty KV gives zeros
        if tnd:
            out[start : start + n] = o.transpose(0, 1)
        else:
            out[b, :, lo : lo + n] = o
        start += n
    calls.append(
        {
            "input_layout": input_layout,
            "sparse_mode": sparse_mode,
            "paged": paged,
            "block_size": block_size,
            "q_len": q_len,
            "kv_len": kv_len,
            "q_pad": q_pad,
            "kv_pad": kv_pad,
            "pre_tokens": pre_tokens,
            "next_tokens": next_tokens,
            "key_shape": tuple(key.shape),
        }
    )
    out = out.to(query.dtype)
    if input_layout == "BNSD_BSND" or input_layout == "BSND":
        out = out.transpose(1, 2).contiguous()
    elif input_layout == "BSH":
        out = out.transpose(1, 2).reshape(batch, q_slots, hq * d)
    return out, torch.zeros(1)
