"""A strict stand-in for the parts of ``torch_npu`` the Ascend provider calls, on CPU tensors.

No NPU exists on the team's machines, and installing ``torch_npu`` without CANN breaks
``import torch``. So the provider is tested against this module, put in ``sys.modules["torch_npu"]``
by the tests. It implements the documented contract of ``npu_fused_infer_attention_score``
(FIA) as written in Ascend/op-plugin's ``docs/zh/custom_APIs/torch_npu/
torch_npu-npu_fused_infer_attention_score.md`` (Atlas A2/A3 rows) and summarised in
``../shared/ASCEND.md``, computes the attention in float32 like the device's kernels, and fails
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
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BAND",
    "FRACTAL_NZ",
    "calls",
    "get_npu_format",
    "npu_format_cast",
    "npu_format_cast_",
    "npu_fused_infer_attention_score",
]

FRACTAL_NZ = 29
_ND = 2
_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
_INT_MAX = 2147483647


@dataclass
class _Band:
    pre_counts_self: bool = False


BAND = _Band()

calls: list[dict] = []
"""Every FIA call's keyword arguments (tensors summarised by shape), for tests to inspect."""


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()


class FiaContractError(ValueError):
    """A call the documented contract forbids, or one that would silently compute something
    else on the device."""


def _fail(message: str) -> None:
    raise FiaContractError(f"npu_fused_infer_attention_score: {message}")


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


def _lengths(name: str, values: object) -> list[int]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        _fail(f"{name} must be a list of ints (SymInt[]), got {type(values).__name__}")
    if any(v < 0 for v in values):
        _fail(f"{name} has a negative length: {list(values)}")
    return list(values)


def _per_batch(name: str, values: Sequence[int], batch: int) -> list[int]:
    """Non-TND lengths: one value for every batch, or at least ``batch`` values."""
    if len(values) == 1:
        return list(values) * batch
    if len(values) < batch:
        _fail(f"{name} has {len(values)} values for {batch} batches (1 or >= B are allowed)")
    return list(values[:batch])


def _check_compressed_mask(mask: torch.Tensor | None, mode: int) -> None:
    if mask is None:
        _fail(f"sparse_mode={mode} needs the compressed 2048x2048 atten_mask")
    if mask.dtype.is_floating_point:
        _fail(f"atten_mask must be bool, int8 or uint8 (1 = masked), got {mask.dtype}")
    if tuple(mask.shape) not in ((2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)):
        _fail(f"sparse_mode={mode} takes a (2048, 2048) atten_mask, got {tuple(mask.shape)}")
    m = mask.reshape(2048, 2048).bool()
    upper = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    if torch.equal(m, ~upper):
        _fail("atten_mask has SDPA's polarity (True = attend); FIA masks where it is 1")
    if not torch.equal(m, upper):
        _fail("the compressed atten_mask must be triu(ones(2048, 2048), diagonal=1)")


def _visible(
    q: int, kv: int, mode: int, pre: int, nxt: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """[q, kv] bool: which keys each query of one batch sees."""
    i = torch.arange(q)[:, None]
    j = torch.arange(kv)[None, :]
    if mode == 0:
        if mask is None:
            return torch.ones(q, kv, dtype=torch.bool)
        return ~mask.bool()
    if mode == 2:
        return j <= i
    diagonal = i + (kv - q)  # bottom-right aligned: the query's own key position
    if mode == 3:
        return j <= diagonal
    lo = diagonal - pre + (1 if BAND.pre_counts_self else 0)
    return (j >= lo) & (j <= diagonal + nxt)


def _attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    row_invalid: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Nq, s, D], k/v [Nkv, kv, D], visible [s, kv] (or [Nq, s, kv]): float32 output and lse."""
    group = q.shape[0] // k.shape[0]
    k = k.float().repeat_interleave(group, 0)
    v = v.float().repeat_interleave(group, 0)
    s = (q.float() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    dead = ~visible.any(-1)
    if bool(dead.any()) and k.shape[1] > 0 and not row_invalid:
        _fail(
            "a query sees no key and row-invalid correction is off (inner_precise 2/3): the "
            "device's result is undefined there (is the mask's polarity reversed?)"
        )
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, 1.0)
    lse = torch.where(denom > 0, torch.log(denom) + m, float("-inf"))
    return out, lse


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
    pre_tokens: int = _INT_MAX,
    next_tokens: int = _INT_MAX,
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
        _fail("scale not given: its default 1.0 is not 1/sqrt(D); pass scale=")
    if query.dtype not in (torch.float16, torch.bfloat16):
        _fail(f"query must be float16 or bfloat16, got {query.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            _fail(f"{name} is {t.dtype}, query {query.dtype}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not t.is_contiguous():
            _fail(f"{name} is not contiguous (FIA takes no strided tensors)")
    if tuple(key.shape) != tuple(value.shape):
        _fail(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if input_layout not in _LAYOUTS:
        raise NotImplementedError(f"the torch_npu stand-in does not model layout {input_layout}")
    if sparse_mode not in (0, 2, 3, 4):
        _fail(f"sparse_mode {sparse_mode} (1 and 5-8 are not modelled or not supported)")
    if inner_precise not in (0, 1, 2, 3):
        _fail(f"inner_precise must be 0-3, got {inner_precise}")
    hq = num_heads
    hkv = num_key_value_heads or num_heads
    if not (1 <= hq <= 256 and 1 <= hkv <= 256) or hq % hkv or hq // hkv > 64:
        _fail(f"num_heads {hq} and num_key_value_heads {hkv}: need <= 256, a multiple, ratio <= 64")
    d = query.shape[-1]
    if d > 512 or d % 8:
        _fail(f"head dim {d}: FIA takes D <= 512, 16-byte aligned")

    # -- query layout -----------------------------------------------------------------------------
    tnd = input_layout == "TND"
    if tnd:
        if query.dim() != 3 or query.shape[1] != hq:
            _fail(f"TND query must be [T, {hq}, D], got {tuple(query.shape)}")
        if d != 128:
            _fail(f"TND takes head dim 128 on Atlas A2/A3 (Q/K 192 not modelled), got {d}")
        if actual_seq_lengths is None or actual_seq_lengths_kv is None:
            _fail("TND needs actual_seq_lengths and actual_seq_lengths_kv")
        cum = _lengths("actual_seq_lengths", actual_seq_lengths)
        if any(b < a for a, b in itertools.pairwise(cum)):
            _fail(f"TND actual_seq_lengths must be cumulative (non-decreasing), got {cum}")
        if not cum or cum[-1] != query.shape[0]:
            _fail(f"TND actual_seq_lengths must end at T={query.shape[0]}, got {cum}")
        if len(cum) > 4096:
            _fail(f"TND takes at most 4096 batches, got {len(cum)}")
        batch = len(cum)
        q_len = [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)]
        q_slots = max(q_len, default=0)
        if sparse_mode not in (0, 3, 4):
            _fail(f"TND takes sparse_mode 0 (no mask), 3 or 4, got {sparse_mode}")
        if sparse_mode == 0 and atten_mask is None:
            _fail("TND with sparse_mode=0 and no mask: a known silent bug (vllm-ascend#13699)")
        if sparse_mode == 0:
            _fail("TND with sparse_mode=0 and a mask is not allowed")
    else:
        if query.dim() != (3 if input_layout == "BSH" else 4):
            _fail(f"{input_layout} query has {query.dim()} dims")
        batch = query.shape[0]
        heads_dim = 1 if input_layout.startswith("BNSD") else 2
        if input_layout != "BSH" and query.shape[heads_dim] != hq:
            _fail(f"{input_layout} query has {query.shape[heads_dim]} heads, num_heads={hq}")
        q_slots = query.shape[2] if heads_dim == 1 else query.shape[1]
        if input_layout == "BNSD_BSND" and q_slots == 1:
            _fail("BNSD_BSND takes Q_S > 1 only")
        q_len = (
            [q_slots] * batch
            if actual_seq_lengths is None
            else _per_batch(
                "actual_seq_lengths", _lengths("actual_seq_lengths", actual_seq_lengths), batch
            )
        )
        if any(n > q_slots for n in q_len):
            _fail(f"actual_seq_lengths {q_len} exceed the query's S={q_slots}")
    incremental = not tnd and q_slots == 1
    if sparse_mode in (2, 3, 4) and not incremental:
        _check_compressed_mask(atten_mask, sparse_mode)
    elif atten_mask is not None and atten_mask.dtype.is_floating_point:
        _fail(f"atten_mask must be bool, int8 or uint8 (1 = masked), got {atten_mask.dtype}")
    if (
        not incremental
        and sparse_mode in (0, 2, 3)
        and (pre_tokens, next_tokens)
        != (
            _INT_MAX,
            _INT_MAX,
        )
    ):
        _fail("pre_tokens/next_tokens are only modelled with sparse_mode=4")

    # -- padding --------------------------------------------------------------------------
    def pad_value(name: str, t: torch.Tensor | None) -> int | None:
        if t is None:
            return None
        if t.dtype != torch.int64 or t.numel() != 1:
            _fail(f"{name} must be a one-element int64 tensor, got {t.dtype} {tuple(t.shape)}")
        return max(int(t.item()), 0)

    q_pad = pad_value("query_padding_size", query_padding_size)
    kv_pad = pad_value("kv_padding_size", kv_padding_size)
    if q_pad is not None and (incremental or tnd or actual_seq_lengths is None):
        _fail("query_padding_size needs Q_S > 1, a non-TND layout and actual_seq_lengths")
    if kv_pad is not None and (tnd or actual_seq_lengths_kv is None):
        _fail("kv_padding_size needs a non-TND layout and actual_seq_lengths_kv")

    # -- keys: paged or dense -------------------------------------------------------------
    paged = block_table is not None
    if paged:
        if q_pad is not None or kv_pad is not None:
            _fail("page attention takes no left padding")
        if block_table.dtype != torch.int32 or block_table.dim() != 2:
            _fail(f"block_table must be 2-D int32, got {block_table.dim()}-D {block_table.dtype}")
        if block_table.shape[0] != batch:
            _fail(f"block_table has {block_table.shape[0]} rows for {batch} batches")
        if actual_seq_lengths_kv is None:
            _fail("page attention needs actual_seq_lengths_kv")
        kv_len = _lengths("actual_seq_lengths_kv", actual_seq_lengths_kv)
        if len(kv_len) != batch:
            _fail(f"paged actual_seq_lengths_kv has {len(kv_len)} values for {batch} batches")
        bs = block_size
        if bs <= 0 or bs > 512 or bs % 16:
            _fail(f"block_size {bs}: page attention takes 16-aligned sizes up to 512")
        if not incremental and bs % 128:
            _fail(f"block_size {bs}: with Q_S > 1 page attention takes multiples of 128")
        if key.dim() == 3:  # BnBsH
            if key.shape[1] != bs or key.shape[2] != hkv * d:
                _fail(f"paged key as [blocks, {bs}, {hkv * d}] expected, got {tuple(key.shape)}")

            def block_rows(blk: int) -> torch.Tensor:  # [Hkv, bs, D]
                return key[blk].view(bs, hkv, d).transpose(0, 1)

            def value_rows(blk: int) -> torch.Tensor:
                return value[blk].view(bs, hkv, d).transpose(0, 1)

        elif key.dim() == 4:  # BnNBsD
            if input_layout in ("BSH", "BSND"):
                _fail(f"{input_layout} page attention takes the cache as [blocks, bs, H] only")
            if tuple(key.shape[1:3]) != (hkv, bs):
                hint = (
                    " (a [blocks, block_size, Hkv, D] cache passed as it is? view it as "
                    "[blocks, block_size, Hkv*D])"
                    if tuple(key.shape[1:3]) == (bs, hkv)
                    else ""
                )
                _fail(
                    f"a 4-D paged key is read as [blocks, {hkv}, {bs}, D], got "
                    f"{tuple(key.shape)}{hint}"
                )

            def block_rows(blk: int) -> torch.Tensor:
                return key[blk]

            def value_rows(blk: int) -> torch.Tensor:
                return value[blk]

        else:
            _fail(f"paged key must be 3-D or 4-D, got {key.dim()}-D")
        if key.shape[-1] != (d if key.dim() == 4 else hkv * d):
            _fail("key head dim differs from query")
        for b, n in enumerate(kv_len):
            blocks = -(-n // bs)
            if blocks > block_table.shape[1]:
                _fail(f"batch {b}: kv length {n} needs {blocks} blocks, table has fewer")
            ids = block_table[b, :blocks]
            if bool((ids < 0).any() | (ids >= key.shape[0]).any()):
                _fail(f"batch {b}: block id out of range 0..{key.shape[0] - 1}")

        def kv_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            n = kv_len[b]
            blocks = block_table[b, : -(-n // bs)].tolist()
            ks = torch.cat([block_rows(x) for x in blocks], dim=1) if blocks else None
            vs = torch.cat([value_rows(x) for x in blocks], dim=1) if blocks else None
            if ks is None:
                return key.new_zeros(hkv, 0, d), key.new_zeros(hkv, 0, d)
            return ks[:, :n], vs[:, :n]

    else:
        if key.dim() != query.dim():
            _fail(f"key has {key.dim()} dims, query {query.dim()} ({input_layout})")
        if tnd:
            cum_kv = _lengths("actual_seq_lengths_kv", actual_seq_lengths_kv)
            if len(cum_kv) != batch or any(b < a for a, b in itertools.pairwise(cum_kv)):
                _fail("TND actual_seq_lengths_kv must be cumulative, one value per batch")
            if cum_kv[-1] != key.shape[0]:
                _fail(f"TND actual_seq_lengths_kv must end at {key.shape[0]}, got {cum_kv}")
            starts = [0, *cum_kv[:-1]]
            kv_len = [b - a for a, b in zip(starts, cum_kv, strict=True)]

            def kv_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
                sl = slice(starts[b], cum_kv[b])
                return key[sl].transpose(0, 1), value[sl].transpose(0, 1)

        else:
            bnsd = input_layout.startswith("BNSD")
            kv_slots = key.shape[2] if bnsd else key.shape[1]
            k4 = key if bnsd else key.view(batch, kv_slots, hkv, d).transpose(1, 2)
            v4 = value if bnsd else value.view(batch, kv_slots, hkv, d).transpose(1, 2)
            if k4.shape[1] != hkv:
                _fail(f"key has {k4.shape[1]} heads, num_key_value_heads={hkv}")
            kv_len = (
                [kv_slots] * batch
                if actual_seq_lengths_kv is None
                else _per_batch(
                    "actual_seq_lengths_kv",
                    _lengths("actual_seq_lengths_kv", actual_seq_lengths_kv),
                    batch,
                )
            )
            end_kv = kv_slots - (kv_pad or 0)
            for n in kv_len:
                lo = end_kv - n if kv_pad is not None else 0
                if lo < 0 or (kv_pad is None and n > kv_slots):
                    _fail(f"kv lengths {kv_len} do not fit KV_S={kv_slots} with padding")

            def kv_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
                n = kv_len[b]
                lo = end_kv - n if kv_pad is not None else 0
                return k4[b, :, lo : lo + n], v4[b, :, lo : lo + n]

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
                _fail(f"batch {b}: query padding leaves no room for {n} queries")
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
            visible = _visible(n, m, sparse_mode, pre_tokens, next_tokens, mask_b)
        # Row-invalid correction is automatic where the op can see it (sparse_mode 3, Q > KV).
        auto = sparse_mode == 3 and n > m
        o, _ = _attend(q_b, k_b, v_b, visible, float(scale), bool(inner_precise & 2) or auto)
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
