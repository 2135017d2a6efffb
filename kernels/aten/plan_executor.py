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

from xy_inductor.kernels.attention_plan import AttentionPlan
from xy_inductor.kernels.tree_masks import tree_visible

__all__ = ["run_plan"]

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
    tree = plan.tree_tensor()
    if tree is not None:
        tree = tree.to(device)

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
            if tree is not None:  # tree verify rows: a query sees its own ancestors only
                offset = (kv_len[rows] - q_len[rows])[:, None, None]
                allowed &= tree_visible(tree[q_rows][:, :, None], kpos[:, None, :] - offset)
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
