"""The pieces of the torch_npu stand-in (``torch_npu_standin.py``) that read keys and values:
the contract's errors, length lists, the compressed causal mask, which keys each query sees
(sparse modes 0/2/3/4, the band's reading in ``BAND``), attention in float32 as the device
computes it, and the KV cache as FIA reads it in each layout: paged (``[blocks, bs, Hkv*D]`` or
``[blocks, Hkv, bs, D]``), dense (BSH/BSND/BNSD, left padding) and TND."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

INT_MAX = 2147483647
KvOf = Callable[[int], tuple[torch.Tensor, torch.Tensor]]
"""Batch index -> its keys and values, each [Hkv, kv_len, D]."""


@dataclass
class Band:
    """How band mode (``sparse_mode=4``) reads ``pre_tokens``: see ``torch_npu_standin.py``."""

    pre_counts_self: bool = False


BAND = Band()


class FiaContractError(ValueError):
    """A call the documented contract forbids, or one that would silently compute something
    else on the device."""


def fail(message: str) -> None:
    raise FiaContractError(f"npu_fused_infer_attention_score: {message}")


# -- lengths, masks, attention ---------------------------------------------------------------------


def lengths(name: str, values: object) -> list[int]:
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        fail(f"{name} must be a list of ints (SymInt[]), got {type(values).__name__}")
    if any(v < 0 for v in values):
        fail(f"{name} has a negative length: {list(values)}")
    return list(values)


def per_batch(name: str, values: Sequence[int], batch: int) -> list[int]:
    """Non-TND lengths: one value for every batch, or at least ``batch`` values."""
    if len(values) == 1:
        return list(values) * batch
    if len(values) < batch:
        fail(f"{name} has {len(values)} values for {batch} batches (1 or >= B are allowed)")
    return list(values[:batch])


def check_compressed_mask(mask: torch.Tensor | None, mode: int) -> None:
    if mask is None:
        fail(f"sparse_mode={mode} needs the compressed 2048x2048 atten_mask")
    if mask.dtype.is_floating_point:
        fail(f"atten_mask must be bool, int8 or uint8 (1 = masked), got {mask.dtype}")
    if tuple(mask.shape) not in ((2048, 2048), (1, 2048, 2048), (1, 1, 2048, 2048)):
        fail(f"sparse_mode={mode} takes a (2048, 2048) atten_mask, got {tuple(mask.shape)}")
    m = mask.reshape(2048, 2048).bool()
    upper = torch.ones(2048, 2048, dtype=torch.bool).triu(1)
    if torch.equal(m, ~upper):
        fail("atten_mask has SDPA's polarity (True = attend); FIA masks where it is 1")
    if not torch.equal(m, upper):
        fail("the compressed atten_mask must be triu(ones(2048, 2048), diagonal=1)")


def visible_keys(
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


def attend(
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
        fail(
            "a query sees no key and row-invalid correction is off (inner_precise 2/3): the "
            "device's result is undefined there (is the mask's polarity reversed?)"
        )
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))
    denom = p.sum(-1, keepdim=True)
    out = (p @ v) / torch.where(denom > 0, denom, 1.0)
    lse = torch.where(denom > 0, torch.log(denom) + m, float("-inf"))
    return out, lse


# -- the KV cache, as FIA reads it ----------------------------------------------------------------


def paged_kv(
    *,
    key: torch.Tensor,
    value: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    actual_seq_lengths_kv: Sequence[int] | None,
    input_layout: str,
    batch: int,
    hkv: int,
    d: int,
    incremental: bool,
    q_pad: int | None,
    kv_pad: int | None,
) -> tuple[list[int], KvOf]:
    """Page attention: the batches' kv lengths and their keys and values gathered from blocks."""
    if q_pad is not None or kv_pad is not None:
        fail("page attention takes no left padding")
    if block_table.dtype != torch.int32 or block_table.dim() != 2:
        fail(f"block_table must be 2-D int32, got {block_table.dim()}-D {block_table.dtype}")
    if block_table.shape[0] != batch:
        fail(f"block_table has {block_table.shape[0]} rows for {batch} batches")
    if actual_seq_lengths_kv is None:
        fail("page attention needs actual_seq_lengths_kv")
    kv_len = lengths("actual_seq_lengths_kv", actual_seq_lengths_kv)
    if len(kv_len) != batch:
        fail(f"paged actual_seq_lengths_kv has {len(kv_len)} values for {batch} batches")
    bs = block_size
    if bs <= 0 or bs > 512 or bs % 16:
        fail(f"block_size {bs}: page attention takes 16-aligned sizes up to 512")
    if not incremental and bs % 128:
        fail(f"block_size {bs}: with Q_S > 1 page attention takes multiples of 128")
    if key.dim() == 3:  # BnBsH
        if key.shape[1] != bs or key.shape[2] != hkv * d:
            fail(f"paged key as [blocks, {bs}, {hkv * d}] expected, got {tuple(key.shape)}")

        def block_rows(blk: int) -> torch.Tensor:  # [Hkv, bs, D]
            return key[blk].view(bs, hkv, d).transpose(0, 1)

        def value_rows(blk: int) -> torch.Tensor:
            return value[blk].view(bs, hkv, d).transpose(0, 1)

    elif key.dim() == 4:  # BnNBsD
        if input_layout in ("BSH", "BSND"):
            fail(f"{input_layout} page attention takes the cache as [blocks, bs, H] only")
        if tuple(key.shape[1:3]) != (hkv, bs):
            hint = (
                " (a [blocks, block_size, Hkv, D] cache passed as it is? view it as "
                "[blocks, block_size, Hkv*D])"
                if tuple(key.shape[1:3]) == (bs, hkv)
                else ""
            )
            fail(
                f"a 4-D paged key is read as [blocks, {hkv}, {bs}, D], got {tuple(key.shape)}{hint}"
            )

        def block_rows(blk: int) -> torch.Tensor:
            return key[blk]

        def value_rows(blk: int) -> torch.Tensor:
            return value[blk]

    else:
        fail(f"paged key must be 3-D or 4-D, got {key.dim()}-D")
    if key.shape[-1] != (d if key.dim() == 4 else hkv * d):
        fail("key head dim differs from query")
    for b, n in enumerate(kv_len):
        blocks = -(-n // bs)
        if blocks > block_table.shape[1]:
            fail(f"batch {b}: kv length {n} needs {blocks} blocks, table has fewer")
        ids = block_table[b, :blocks]
        if bool((ids < 0).any() | (ids >= key.shape[0]).any()):
            fail(f"batch {b}: block id out of range 0..{key.shape[0] - 1}")

    def kv_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = kv_len[b]
        blocks = block_table[b, : -(-n // bs)].tolist()
        ks = torch.cat([block_rows(x) for x in blocks], dim=1) if blocks else None
        vs = torch.cat([value_rows(x) for x in blocks], dim=1) if blocks else None
        if ks is None:
            return key.new_zeros(hkv, 0, d), key.new_zeros(hkv, 0, d)
        return ks[:, :n], vs[:, :n]

    return kv_len, kv_of


def dense_kv(
    *,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    actual_seq_lengths_kv: Sequence[int] | None,
    input_layout: str,
    tnd: bool,
    batch: int,
    hkv: int,
    d: int,
    kv_pad: int | None,
) -> tuple[list[int], KvOf]:
    """Keys and values in the query's layout (TND: cumulative lengths; else per batch, with
    left padding)."""
    if key.dim() != query.dim():
        fail(f"key has {key.dim()} dims, query {query.dim()} ({input_layout})")
    if tnd:
        cum_kv = lengths("actual_seq_lengths_kv", actual_seq_lengths_kv)
        if len(cum_kv) != batch or any(b < a for a, b in itertools.pairwise(cum_kv)):
            fail("TND actual_seq_lengths_kv must be cumulative, one value per batch")
        if cum_kv[-1] != key.shape[0]:
            fail(f"TND actual_seq_lengths_kv must end at {key.shape[0]}, got {cum_kv}")
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
            fail(f"key has {k4.shape[1]} heads, num_key_value_heads={hkv}")
        kv_len = (
            [kv_slots] * batch
            if actual_seq_lengths_kv is None
            else per_batch(
                "actual_seq_lengths_kv",
                lengths("actual_seq_lengths_kv", actual_seq_lengths_kv),
                batch,
            )
        )
        end_kv = kv_slots - (kv_pad or 0)
        for n in kv_len:
            lo = end_kv - n if kv_pad is not None else 0
            if lo < 0 or (kv_pad is None and n > kv_slots):
                fail(f"kv lengths {kv_len} do not fit KV_S={kv_slots} with padding")

        def kv_of(b: int) -> tuple[torch.Tensor, torch.Tensor]:
            n = kv_len[b]
            lo = end_kv - n if kv_pad is not None else 0
            return k4[b, :, lo : lo + n], v4[b, :, lo : lo + n]

    return kv_len, kv_of
