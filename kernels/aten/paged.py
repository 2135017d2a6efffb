"""The ATen provider's executor of a serving step on the CPU: ``xyserve.attention_varlen`` over a
paged KV cache, each row reading only the keys its queries can see."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from xy_inductor.kernels.aten.attention import (
    SHORT_ROW,
    attend_row_fused,
    fused_flash,
)
from xy_inductor.kernels.attention_plan import AttentionPlan
from xy_inductor.kernels.tree_masks import tree_visible

__all__ = ["GROUP_SPREAD", "PagedRows", "run_paged"]

# -- paged layout, rows known by their lengths: each row reads only its own keys --------------
#
# The CPU's way to run a serving step (``xyserve.attention_varlen``): the keys each row's queries
# can see are gathered slot by slot through its block table, then run through ATen's fused CPU
# flash kernel like the dense rows above. Longer rows (prefill chunks) run one by one; short rows
# (decode, verify) run in groups of similar KV length (the tile menu of this executor: a group
# pads its rows to its longest, at most twice a row's own keys), one call per group. What a step
# costs grows with its rows' tokens and keys, never with the size of the cache.

# Short rows are grouped while the group's longest row has at most this many times a member's
# keys: bounds the keys gathered and attended for padding.
GROUP_SPREAD = 2


@functools.cache
def group_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype groups of one-query rows (decode) are attended in. ATen's CPU flash kernel runs
    one query over many keys far slower in bfloat16 or float16 than in float32 on a CPU without
    AMX tiles (``benchmarks/RESULTS.md``), so there the gathered tiles go up to float32, which
    also rounds the result once, at the end; with AMX, in their own dtype. Groups with more
    queries per row (verify, short prefills) stay in their own dtype: there the half-precision
    kernel is the faster one."""
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if half and not torch.cpu._is_amx_tile_supported() else dtype


def _visible_from(q_len: int, kv_len: int, window: int | None) -> int:
    """The first key position any query of the row can see."""
    if window is None:
        return 0
    return max(0, kv_len - q_len - window + 1)


def _joint(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``[blocks, block_size, Hkv, D + Dv]`` viewing both caches when V is stored right after K
    in every slot (vLLM's layout: one tensor, K then V), so one gather reads both; else None."""
    d = k.shape[-1]
    if (
        k.shape[:-1] != v.shape[:-1]
        or k.stride() != v.stride()
        or k.dtype != v.dtype
        or k.stride(-1) != 1
        or v.data_ptr() != k.data_ptr() + d * k.element_size()
        or k.stride(-2) < d + v.shape[-1]
    ):
        return None
    return k.as_strided((*k.shape[:-1], d + v.shape[-1]), k.stride(), k.storage_offset())


def _row_mask(
    q_len: int,
    first: int,
    kv_len: int,
    causal: bool,
    window: int | None,
    bits: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Additive ``[1, 1, q_len, kv_len - first]`` mask of a windowed or tree row whose gathered
    keys start at position ``first``; ``bits``: a tree row's int64 ancestor bits per query."""
    qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
    kpos = torch.arange(first, kv_len)[None, :]
    ok = torch.ones(q_len, kv_len - first, dtype=torch.bool)
    if window is not None:
        ok &= kpos > qpos - window
    if causal:
        ok &= kpos <= qpos
    if bits is not None:
        ok &= tree_visible(bits[:, None], kpos - (kv_len - q_len))
    return torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf"))[None, None]


def _groups(short: list[int], length: dict[int, int]) -> list[list[int]]:
    """Short rows in groups of similar KV length: longest first, a group's longest at most
    ``GROUP_SPREAD`` times any member's."""
    groups: list[list[int]] = []
    for r in sorted(short, key=lambda r: -length[r]):
        if groups and length[groups[-1][0]] <= GROUP_SPREAD * max(length[r], 1):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


class PagedRows:
    """What ``run_paged`` derives from a step's rows alone, before it reads any layer's tensors:
    which rows run alone and which in groups, the cache slots each reads (through the block
    table), the query slots, the masks. Every attention layer of a serving step runs the same
    rows, so this is built once per step (``run_paged``'s ``cache``) and used by all of them.
    """

    def __init__(
        self,
        plan: AttentionPlan,
        kv_lens: Sequence[int],
        block_table: torch.Tensor,
        block_size: int,
        dtype: torch.dtype,
    ) -> None:
        table = plan.table
        causal, window = plan.causal, plan.window
        bits = plan.tree_tensor()  # int64 ancestor bits per query token, or None
        # What the rows were derived from. The block table is held and compared by identity:
        # an id() could be a later table's, at this one's address once it is freed.
        self.key = (tuple(kv_lens), block_size, dtype)
        self.block_table = block_table
        bs = block_size
        device = block_table.device
        self.empty: list[tuple[int, int]] = []  # (first query, queries) of rows seeing no key
        first: dict[int, int] = {}
        length: dict[int, int] = {}  # keys a row's queries can see
        short, long = [], []
        for r, (n, kv) in enumerate(zip(table.q_len, kv_lens, strict=True)):
            if n == 0:
                continue
            if kv == 0:  # non-causal row over an empty cache
                self.empty.append((table.q_start[r], n))
                continue
            first[r] = _visible_from(n, kv, window)
            length[r] = kv - first[r]
            (short if n <= SHORT_ROW else long).append(r)

        def blocks_of(rows: list[int], pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows_t = torch.tensor(rows, device=device)[:, None]
            pos = pos.to(device)
            return block_table[rows_t, pos // bs].long(), pos % bs

        # (query start, queries, block ids [1, L], slots [1, L], additive mask or None)
        self.long = []
        for r in long:
            n, kv = table.q_len[r], kv_lens[r]
            blocks, offsets = blocks_of([r], torch.arange(first[r], kv)[None])
            s0 = table.q_start[r]
            row_bits = None if bits is None or plan.tree[r] is None else bits[s0 : s0 + n]
            mask = (
                None
                if window is None and row_bits is None
                else _row_mask(n, first[r], kv, causal, window, row_bits, dtype)
            )
            self.long.append((table.q_start[r], n, blocks, offsets, mask))

        # (block ids [n, L], slots [n, L], query slots [n, t], valid [n, t], mask or None, the
        # dtype the group is attended in)
        self.groups = []
        for group in _groups(short, length):
            n_q = torch.tensor([table.q_len[r] for r in group])
            kv = torch.tensor([kv_lens[r] for r in group])
            starts = torch.tensor([first[r] for r in group])
            widest = max(length[r] for r in group)
            j = torch.arange(widest)[None, :]
            # Row i's keys first[i] … kv[i] - 1, padded with its last key (masked below).
            pos = torch.minimum(starts[:, None] + j, (kv - 1)[:, None])
            blocks, offsets = blocks_of(group, pos)
            t = int(n_q.max())
            compute = group_dtype(dtype) if t == 1 else dtype
            i = torch.arange(t)[None, :]
            valid = i < n_q[:, None]  # [n, t]: slot i holds the row's query i
            q_slots = torch.tensor([table.q_start[r] for r in group])[:, None] + torch.where(
                valid, i, 0
            )
            kpos = starts[:, None, None] + j[:, None, :]  # [n, 1, L] key positions
            qpos = (kv - n_q)[:, None, None] + i[:, :, None]  # [n, t, 1] query positions
            ok = (kpos < kv[:, None, None]) & (i[:, :, None] < n_q[:, None, None])
            ok = ok | ~valid[:, :, None]  # padding query slots: any finite row (discarded)
            if causal:
                ok = ok & ((kpos <= qpos) | ~valid[:, :, None])
            if window is not None:
                ok = ok & ((kpos > qpos - window) | ~valid[:, :, None])
            if bits is not None and any(plan.tree[r] is not None for r in group):
                seen = tree_visible(bits[q_slots][:, :, None], kpos - (kv - n_q)[:, None, None])
                ok = ok & (seen | ~valid[:, :, None])
            mask = (
                None
                if bool(ok.all())
                else torch.zeros(ok.shape, dtype=compute).masked_fill(~ok, float("-inf"))[:, None]
            )
            self.groups.append(
                (blocks, offsets, q_slots.to(device), valid.to(device), mask, compute)
            )


def _read(cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``cache``'s slots (``blocks``, ``offsets``, both ``[n, L]``): ``[n, L, Hkv, C]``. Reads
    those slots only, whatever the cache's size or strides."""
    bs = cache.shape[1]
    if cache.shape[0] <= 1 or cache.stride(0) == bs * cache.stride(1):
        # blocks follow each other slot by slot: one index_select over the flattened cache
        flat = cache.view(-1, *cache.shape[2:])
        got = flat.index_select(0, (blocks * bs + offsets).flatten())
        return got.view(*blocks.shape, *cache.shape[2:])
    return cache[blocks, offsets]


def run_paged(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: Sequence[int],
    *,
    block_table: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``q [Tq, Hq, D]`` (rows in ``plan``'s token-table order) over
    a paged cache ``k``/``v [blocks, block_size, Hkv, D]`` (any strides), ``block_table[r, j]``
    naming the block of row r's keys ``j * block_size …``; the plan's causality and window.

    Each row reads only the keys its queries can see. Rows with up to ``SHORT_ROW`` queries run
    in groups of similar length, masked per row; longer rows one by one. ``cache``: a dict kept
    for the step, where the rows' slots and masks (``PagedRows``) are kept for the step's next
    layers. Returns ``out [Tq, Hq, Dv]``, every element written (a row that sees no key gives
    zeros).
    """
    table = plan.table
    plan.check(table.q_len, kv_lens)
    if k.shape[1] != block_size:
        raise ValueError(f"run_paged: the cache has blocks of {k.shape[1]}, not {block_size}")
    key = (tuple(kv_lens), block_size, q.dtype)
    rows = cache.get("paged rows") if cache is not None else None
    if rows is None or rows.block_table is not block_table or rows.key != key:
        rows = PagedRows(plan, kv_lens, block_table, block_size, q.dtype)
        if cache is not None:
            cache["paged rows"] = rows
    causal = plan.causal
    hq, d, dv = q.shape[1], k.shape[3], v.shape[3]
    if out is None:
        out = q.new_empty((q.shape[0], hq, dv))
    joint = _joint(k, v)

    def read(blocks: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at those slots: ``[n, L, Hkv, D]`` each."""
        if joint is not None:
            both = _read(joint, blocks, offsets)
            return both[..., :d], both[..., d:]
        return _read(k, blocks, offsets), _read(v, blocks, offsets)

    for s0, n in rows.empty:
        out[s0 : s0 + n] = 0
    for s0, n, blocks, offsets, mask in rows.long:
        k_row, v_row = read(blocks, offsets)
        k_row, v_row = k_row[0].transpose(0, 1), v_row[0].transpose(0, 1)  # [Hkv, L, D]
        q_row = q[s0 : s0 + n].transpose(0, 1)  # [Hq, n, D]
        if mask is None:
            o = attend_row_fused(q_row, k_row, v_row, causal=causal, scale=scale)
        else:
            o = fused_flash(q_row[None], k_row[None], v_row[None], False, scale, mask)[0][0]
        out[s0 : s0 + n] = o.transpose(0, 1)

    for blocks, offsets, q_slots, valid, mask, compute in rows.groups:
        k_g, v_g = read(blocks, offsets)  # copies already: casting them adds no pass
        k_g, v_g = k_g.to(compute), v_g.to(compute)
        q_g = q[q_slots].to(compute).transpose(1, 2)  # [n, Hq, t, D]
        got = fused_flash(q_g, k_g.transpose(1, 2), v_g.transpose(1, 2), False, scale, mask)[
            0
        ].transpose(1, 2)  # [n, t, Hq, Dv]
        if q_slots.shape[1] == 1:
            out[q_slots[:, 0]] = got[:, 0].to(out.dtype)
        else:
            out[q_slots[valid]] = got[valid].to(out.dtype)
    return out
