"""Meta-attention with ATen calls: the ATen provider's executors of an ``AttentionPlan``.

``run_plan`` (the generic executor) runs the plan's tiles in batches of equal query-tile size:
the batch's query rows and key chunks are gathered once (``index_select``-style advanced
indexing), one batched matmul computes every tile's scores, the in-tile mask (causal diagonal,
window edge, tail of a row) is applied, a softmax with its running max and sum gives each tile's
partial output, and chunks of one query tile are merged with a log-sum-exp update. There is no
Python loop per tile: the loop is over batches (bounded by a memory budget).

KV comes in one of two layouts:

- dense: ``k``/``v`` ``[B, Hkv, L, D]`` (the form ``xyserve.attention`` has today), row ``r``'s
  key ``j`` at ``k[r, :, j]``;
- paged: ``k``/``v`` ``[num_blocks, block_size, Hkv, D]`` with ``block_table[r, j // block_size]``
  naming the block of row ``r``'s key ``j``.

Queries are packed ``[Tq, Hq, D]`` in token-table order. A query row with no visible key gives
zeros, as ``F.scaled_dot_product_attention`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from xy_inductor.kernels.attention_plan import AttentionPlan

__all__ = ["run_dense", "run_packed", "run_paged", "run_plan"]

# Score elements (tiles × heads × query rows × keys) computed per batch: bounds the memory of
# the gathered operands and scores (about 4 bytes × 4 of these at fp32).
SCORE_BUDGET = 1 << 24


def _gather_kv(
    cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    block_table: torch.Tensor | None,
    block_size: int | None,
) -> torch.Tensor:
    """Keys (or values) at positions ``pos [n, C]`` of rows ``rows [n]``: ``[n, C, Hkv, D]``.

    Reads only the rows it returns, whatever the cache's size or strides: nothing here copies
    the cache (a ``reshape`` of a cache that is not one run of slots would copy all of it)."""
    if block_table is None:
        return cache[rows[:, None], :, pos]  # dense [B, Hkv, L, D]
    blocks = block_table[rows[:, None], pos // block_size].long()  # [n, C]
    slots = pos % block_size
    if cache.shape[0] <= 1 or cache.stride(0) == cache.shape[1] * cache.stride(1):
        # paged [blocks, block_size, Hkv, D] whose blocks follow each other slot by slot: one
        # index_select of whole [Hkv, D] slots over the flattened cache (a view).
        flat = cache.view(-1, *cache.shape[2:])
        rows_of = flat.index_select(0, (blocks * block_size + slots).flatten())
        return rows_of.view(*pos.shape, *cache.shape[2:])
    # Blocks apart from each other (a per-layer view of a cache that interleaves layers, or
    # heads outside the block): index the block and slot dims directly.
    return cache[blocks, slots]


def run_plan(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: Sequence[int],
    *,
    scale: float,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed queries ``q [Tq, Hq, D]`` over each row's keys, per ``plan``.

    ``kv_lens`` are this run's KV lengths (checked against the plan). Returns ``out [Tq, Hq,
    Dv]``, every element written.
    """
    table = plan.table
    plan.check(table.q_len, kv_lens)
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = (k.shape[1], v.shape[3]) if block_table is None else (k.shape[2], v.shape[3])
    if hq % hkv:
        raise ValueError(f"run_plan: {hq} query heads is not a multiple of {hkv} KV heads")
    g = hq // hkv
    if out is None:
        out = q.new_empty((q.shape[0], hq, dv))
    # Rows that have no scheduled tile at all (q_len 0) write nothing; rows whose every tile
    # was skipped must still read as zeros.
    out.zero_()
    if plan.tiles == 0:
        return out
    device = q.device
    kv_host = torch.tensor(list(kv_lens), dtype=torch.int64)
    kv_len = kv_host.to(device)
    q_len = torch.tensor(table.q_len, dtype=torch.int64, device=device)
    q_start = torch.tensor(table.q_start, dtype=torch.int64, device=device)
    chunk = plan.menu.kv_chunk
    acc = q.new_zeros((plan.query_tiles, hkv, g, int(plan.q_tile.max()), dv), dtype=torch.float32)
    run_max = torch.full(acc.shape[:-1], float("-inf"), dtype=torch.float32, device=device)
    run_sum = torch.zeros_like(run_max)
    tile_of = torch.full((plan.query_tiles,), -1, dtype=torch.int64)
    tile_of[plan.tile_id] = torch.arange(plan.tiles)  # any tile of each query tile, for indexing

    for size in plan.q_tile.unique().tolist():
        members = (plan.q_tile == size).nonzero().flatten()
        per_batch = max(1, SCORE_BUDGET // (hq * size * chunk))
        for b0 in range(0, members.numel(), per_batch):
            batch = members[b0 : b0 + per_batch]
            # Keys gathered per tile: the most any tile of the batch really has (a decode row
            # planned for its shape class's longest KV has fewer), read from the host plan.
            width = int(
                (torch.minimum(plan.k1[batch], kv_host[plan.row[batch]]) - plan.k0[batch])
                .clamp_min(1)
                .max()
            )
            idx = batch.to(device)
            rows = plan.row.to(device)[idx]
            # -- gather this batch's query rows and key chunks --------------------------------
            qi = plan.q0.to(device)[idx, None] + torch.arange(size, device=device)  # [n, T]
            q_ok = qi < q_len[rows, None]
            qpos = kv_len[rows, None] - q_len[rows, None] + qi  # KV position of each query
            kpos = plan.k0.to(device)[idx, None] + torch.arange(width, device=device)  # [n, C]
            k_ok = kpos < torch.minimum(plan.k1.to(device)[idx], kv_len[rows])[:, None]
            q_rows = torch.where(q_ok, q_start[rows, None] + qi, 0)
            k_safe = torch.where(k_ok, kpos, 0)
            qt = q[q_rows]  # [n, T, Hq, D]
            kt = _gather_kv(k, rows, k_safe, block_table, block_size)  # [n, C, Hkv, D]
            vt = _gather_kv(v, rows, k_safe, block_table, block_size)
            n = idx.numel()
            if qt.dtype != torch.float32:
                qt, kt, vt = qt.float(), kt.float(), vt.float()
            # [n, Hkv, g*T, D]: a query head group's rows together (scaled once, small)
            qt = (qt * scale).view(n, size, hkv, g, d).permute(0, 2, 3, 1, 4)
            qt = qt.reshape(n, hkv, g * size, d)
            # -- scores: one batched matmul per KV head, on the gathered K as it lies --------
            # (K[:, :, h] is [n, C, D] with a row stride of Hkv * D: BLAS reads it in place,
            # where a permuted [n, Hkv, D, C] operand would be copied first.)
            s = torch.stack(
                [torch.bmm(qt[:, h], kt[:, :, h].transpose(1, 2)) for h in range(hkv)], dim=1
            ).view(n, hkv, g, size, width)
            allowed = q_ok[:, :, None] & k_ok[:, None, :]  # [n, T, C]
            if plan.causal:
                allowed &= kpos[:, None, :] <= qpos[:, :, None]
            if plan.window is not None:
                allowed &= kpos[:, None, :] > qpos[:, :, None] - plan.window
            s = s.masked_fill(~allowed[:, None, None], float("-inf"))
            # -- softmax pieces, merged into the query tile's running max and sum -------------
            m = s.amax(dim=-1)  # [n, Hkv, g, T]
            m_safe = torch.where(torch.isinf(m), 0.0, m)
            p = torch.exp(s - m_safe[..., None])
            psum = p.sum(dim=-1)
            pv = p.view(n, hkv, g * size, width)
            o = torch.stack([torch.bmm(pv[:, h], vt[:, :, h]) for h in range(hkv)], dim=1)
            o = o.view(n, hkv, g, size, -1)  # [n, Hkv, g, T, Dv]
            tid = plan.tile_id.to(device)[idx]
            if not plan.split:
                acc[tid, :, :, :size] = o
                run_sum[tid, :, :, :size] = psum
                run_max[tid, :, :, :size] = m
                continue
            target = run_max[:, :, :, :size]
            new_max = target.scatter_reduce(
                0, tid.view(-1, 1, 1, 1).expand_as(m), m, "amax", include_self=True
            )
            grown = torch.exp(
                torch.where(
                    torch.isinf(target),
                    0.0,
                    target - torch.where(torch.isinf(new_max), 0.0, new_max),
                )
            )
            grown = torch.where(torch.isinf(target), 0.0, grown)
            acc[:, :, :, :size] *= grown[..., None]
            run_sum[:, :, :, :size] *= grown
            weight = torch.exp(m - torch.where(torch.isinf(new_max[tid]), 0.0, new_max[tid]))
            weight = torch.where(torch.isinf(m), 0.0, weight)
            acc[:, :, :, :size].index_add_(0, tid, o * weight[..., None])
            run_sum[:, :, :, :size].index_add_(0, tid, psum * weight)
            run_max[:, :, :, :size] = new_max

    # -- normalise and write the real query rows -------------------------------------------
    result = acc / torch.where(run_sum > 0, run_sum, 1.0)[..., None]
    first = tile_of  # a tile of each query tile: its row, q0 and size
    rows = plan.row[first].to(device)
    size = plan.q_tile[first].to(device)
    t_max = acc.shape[3]
    qi = plan.q0[first].to(device)[:, None] + torch.arange(t_max, device=device)
    ok = (torch.arange(t_max, device=device) < size[:, None]) & (qi < q_len[rows, None])
    dest = q_start[rows, None] + qi  # [query tiles, T]
    # [tiles, Hkv, g, T, Dv] -> [tiles, T, Hq, Dv]
    values = result.permute(0, 3, 1, 2, 4).reshape(plan.query_tiles, t_max, hq, dv)
    out[dest[ok]] = values[ok].to(out.dtype)
    return out


# -- dense layout, rows known by their lengths: no gathers ------------------------------------
#
# When K/V are a dense [B, Hkv, L, D] cache and each row's keys are one contiguous range of it
# (right or left padding), the rows run on views of the cache through ATen's fused CPU flash
# kernel: short rows (decode, verify) all at once against the whole cache, masked per row; long
# rows one by one, their causal square in one call and the keys before it (a prefix-cached or
# chunked prefill) in a second, merged by log-sum-exp.


def attend_short_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_len: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    sees_all: bool = False,
) -> torch.Tensor:
    """Every row at once against the whole dense cache, masked per row: for decode and verify.
    ``sees_all``: the caller knows every query sees every key (no mask is built).

    q ``[B, Hq, T, D]`` (row r's queries in its first q_len[r] slots), k/v ``[B, Hkv, L, D]``
    with row r's keys at ``kv_start[r] : kv_start[r] + kv_len[r]``. Returns ``[B, Hq, T, Dv]``.
    """
    if sees_all:
        return fused_flash(q, k, v, False, scale)[0]
    t, length = q.shape[2], k.shape[2]
    kpos = torch.arange(length, device=q.device)[None, :] - kv_start[:, None]  # [B, L]
    qpos = (kv_len - q_len)[:, None] + torch.arange(t, device=q.device)  # [B, T]
    kpos, qpos = kpos[:, None, None, :], qpos[:, None, :, None]
    ok = (kpos >= 0) & (kpos < kv_len[:, None, None, None])
    if causal:
        ok = ok & (kpos <= qpos)
    # [B, 1, T, L]; when every row sees the whole cache (uniform decode) there is no mask at all.
    mask = (
        None
        if bool(ok.all())
        else torch.zeros(ok.shape, dtype=q.dtype).masked_fill(~ok, float("-inf"))
    )
    return fused_flash(q, k, v, False, scale, attn_mask=mask)[0]


def fused_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    scale: float,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATen's fused CPU flash kernel (``[B, H, L, D]``): output ``[B, Hq, Lq, Dv]`` and
    log-sum-exp. The kernel takes one head size for q, k and v; where the value head size differs
    (DeepSeek's MLA), the smaller side is padded with zeros, which adds nothing to a score
    (``scale`` is explicit) or to an output column kept, and the output is cut back to Dv."""
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
    )
    return (out if dv == out.shape[-1] else out[..., :dv]), lse


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float):
    """``fused_flash`` on one row (``[H, L, D]`` views): output and log-sum-exp. The kernel
    skips the causal upper triangle block by block itself and reads grouped KV heads."""
    out, lse = fused_flash(q[None], k[None], v[None], causal, scale)
    return out[0], lse[0]


def attend_row_fused(
    q_row: torch.Tensor, k_row: torch.Tensor, v_row: torch.Tensor, *, causal: bool, scale: float
) -> torch.Tensor:
    """One row without a window: queries ``[Hq, ql, D]`` (the row's last ql tokens) over keys
    ``[Hkv, kl, D]``. The causal square runs as one fused call; keys before the row's queries (a
    chunked or prefix-cached prefill) as a second, merged by log-sum-exp. Returns [Hq, ql, Dv]."""
    ql, kl = q_row.shape[1], k_row.shape[1]
    off = kl - ql
    if not causal or off == 0:
        return _flash(q_row, k_row, v_row, causal, scale)[0]
    o_sq, lse_sq = _flash(q_row, k_row[:, off:], v_row[:, off:], True, scale)
    o_pre, lse_pre = _flash(q_row, k_row[:, :off], v_row[:, :off], False, scale)
    lse = torch.logaddexp(lse_sq, lse_pre)
    w_sq = torch.exp(lse_sq - lse)[..., None]
    w_pre = torch.exp(lse_pre - lse)[..., None]
    return (o_sq.float() * w_sq + o_pre.float() * w_pre).to(q_row.dtype)


# Rows with at most this many queries run together against the whole cache (decode, verify).
SHORT_ROW = 16


def run_dense(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_end: Sequence[int],
    kv_start: Sequence[int],
    kv_lens: Sequence[int],
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a dense cache whose rows are known by their lengths (left or right padded),
    causal or full (``plan`` has no window: rows come from masks of padding).

    q ``[B, Hq, Lq, D]`` with row r's ``plan.table.q_len[r]`` queries ending before
    ``q_end[r]``; k/v ``[B, Hkv, L, D]`` with row r's keys at ``kv_start[r] :
    kv_start[r] + kv_lens[r]``. Query slots outside the rows (padding) are written as zeros, as
    SDPA writes a query that sees no key. Returns ``out [B, Hq, Lq, Dv]``.
    """
    table = plan.table
    plan.check(table.q_len, kv_lens)
    if plan.window is not None:
        raise ValueError("run_dense: rows of a dense cache are planned without a window")
    b, hq, lq, _ = q.shape
    if out is None:
        out = q.new_empty((b, hq, lq, v.shape[3]))
    out.zero_()
    short = [r for r in range(table.rows) if 0 < table.q_len[r] <= SHORT_ROW]
    if short:
        t = max(table.q_len[r] for r in short)
        rows = torch.tensor(short)
        n_q = torch.tensor([table.q_len[r] for r in short])
        first = torch.tensor([q_end[r] for r in short]) - n_q
        j = torch.arange(t)[None, :]
        valid = j < n_q[:, None]  # [n, t]: slot j holds the row's j-th query
        slots = torch.where(valid, first[:, None] + j, 0)
        # Every row short (decode): the cache as it is; a mixed batch copies the short rows.
        every = short == list(range(b))
        # Every row's queries fill q exactly (uniform decode or verify): no gather, no scatter.
        direct = every and t == lq and all(table.q_len[r] == t for r in short)
        qs = q if direct else q[rows[:, None], :, slots].transpose(1, 2)  # [n, Hq, t, D]
        got = attend_short_rows(
            qs,
            k if every else k[rows],
            v if every else v[rows],
            n_q,
            torch.tensor([kv_start[r] for r in short]),
            torch.tensor([kv_lens[r] for r in short]),
            causal=plan.causal,
            scale=scale,
            sees_all=every
            and all(kv_start[r] == 0 and kv_lens[r] == k.shape[2] for r in short)
            and (not plan.causal or all(table.q_len[r] == 1 for r in short)),
        )
        if direct:
            out.copy_(got)
        else:
            i, jj = valid.nonzero(as_tuple=True)
            out[rows[i], :, slots[i, jj]] = got[i, :, jj].to(out.dtype)
    for r in range(table.rows):
        n = table.q_len[r]
        if n <= SHORT_ROW:
            continue
        q_row = q[r, :, q_end[r] - n : q_end[r]]
        k_row = k[r, :, kv_start[r] : kv_start[r] + kv_lens[r]]
        v_row = v[r, :, kv_start[r] : kv_start[r] + kv_lens[r]]
        out[r, :, q_end[r] - n : q_end[r]] = attend_row_fused(
            q_row, k_row, v_row, causal=plan.causal, scale=scale
        )
    return out


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


def _window_mask(
    q_len: int, first: int, kv_len: int, causal: bool, window: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive ``[1, 1, q_len, kv_len - first]`` mask of a windowed row whose gathered keys
    start at position ``first``."""
    qpos = torch.arange(kv_len - q_len, kv_len)[:, None]
    kpos = torch.arange(first, kv_len)[None, :]
    ok = kpos > qpos - window
    if causal:
        ok &= kpos <= qpos
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
            mask = None if window is None else _window_mask(n, first[r], kv, causal, window, dtype)
            self.long.append((table.q_start[r], n, blocks, offsets, mask))

        # (block ids [n, L], slots [n, L], query slots [n, t], valid [n, t], mask or None)
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
            mask = (
                None
                if bool(ok.all())
                else torch.zeros(ok.shape, dtype=dtype).masked_fill(~ok, float("-inf"))[:, None]
            )
            self.groups.append((blocks, offsets, q_slots.to(device), valid.to(device), mask))


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

    for blocks, offsets, q_slots, valid, mask in rows.groups:
        k_g, v_g = read(blocks, offsets)
        q_g = q[q_slots].transpose(1, 2)  # [n, Hq, t, D]
        got = fused_flash(q_g, k_g.transpose(1, 2), v_g.transpose(1, 2), False, scale, mask)[
            0
        ].transpose(1, 2)  # [n, t, Hq, Dv]
        if q_slots.shape[1] == 1:
            out[q_slots[:, 0]] = got[:, 0].to(out.dtype)
        else:
            out[q_slots[valid]] = got[valid].to(out.dtype)
    return out


def run_packed(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of packed sequences: row r's queries and keys are the same tokens
    ``plan.table.q_start[r] :`` + ``q_len[r]`` of q ``[tokens, Hq, D]`` and k/v ``[tokens, Hkv,
    D]``. Each row runs on views of its tokens (ATen's fused flash kernel; one SDPA call with
    the band mask when the plan has a window), so nothing is padded or copied in. Returns
    ``out [tokens, Hq, Dv]``."""
    table = plan.table
    plan.check(table.q_len, table.kv_len)
    if out is None:
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    for r in range(table.rows):
        s, n = table.q_start[r], table.q_len[r]
        if n == 0:
            continue
        q_row, k_row, v_row = (t[s : s + n].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if plan.window is None:
            got = _flash(q_row, k_row, v_row, plan.causal, scale)[0]
        else:
            i = torch.arange(n, device=q.device)
            keep = i[None, :] > i[:, None] - plan.window
            if plan.causal:
                keep = keep & (i[None, :] <= i[:, None])
            got = F.scaled_dot_product_attention(
                q_row[None], k_row[None], v_row[None], attn_mask=keep, scale=scale,
                enable_gqa=q_row.shape[0] != k_row.shape[0],
            )[0]  # fmt: skip
        out[s : s + n] = got.transpose(0, 1)
    return out
