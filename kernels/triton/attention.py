"""Meta-attention in Triton: one launch runs a plan's whole task table.

The grid is one program per worker (persistent): program ``w`` walks the tasks dealt to it
(``AttentionPlan``'s symmetric round-robin) and runs each with the one primitive, QK → online
softmax → SV over one query tile and one key chunk. A task covers a tile of queries and, for
grouped-query attention, all ``G`` query heads that share its KV head: the M dimension of the
tile is ``(query, head)`` pairs, so K and V are read once per group. Keys come from a paged cache
through the block table (a dense cache is one block per row). Every length (queries, keys, rows,
tasks) is a run-time value: nothing recompiles when a batch changes. Tasks of a query tile that
was split over several key chunks write partial results with their log-sum-exp; a second,
small launch merges them (one program per split query tile and KV head). The launch boundary
is what orders the partial writes before the merge reads them: no atomics, no cross-program
memory-ordering argument (FlashInfer's split-KV decode and vLLM's paged attention v2 merge the
same way).

The tables a launch reads (tasks per worker, merges) are built once per plan and device and
kept in the plan's ``cache``; plans are cached per shape class, so every layer of a step and
every decode step of one class reuse them. The per-row arrays (offsets and lengths) go to the
device in one copy, reused while the rows stay the same (every layer of a step).

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Import only when
Triton is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from xy_inductor.kernels.attention_plan import AttentionPlan
from xy_inductor.kernels.triton.menus import BLOCK_M, BLOCK_N, DENSE_BLOCK

__all__ = ["triton_attention"]
# Columns of the task table (row, q0, tile, k0, k1, KV head, partial slot or -1) and of the
# merge table (row, q0, tile, KV head, first slot, parts).
TASK_COLUMNS: tl.constexpr = tl.constexpr(7)
MERGE_COLUMNS: tl.constexpr = tl.constexpr(6)


# Batch-dependent integers are never specialised: the block table's row stride (its width
# follows the longest sequence) and a dense cache's row stride (its length).
@triton.jit(do_not_specialize=["stride_kb", "stride_vb", "stride_table"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    table_ptr, task_ptr, worker_start_ptr,
    row_q_base_ptr, row_o_base_ptr, row_q_len_ptr, row_kv_len_ptr, row_kv_off_ptr,
    row_token_ptr, tree_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    scale, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_TREE: tl.constexpr,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    w = tl.program_id(0)
    first = tl.load(worker_start_ptr + w)
    last = tl.load(worker_start_ptr + w + 1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    for t in range(first, last):
        # -- the task: row, query tile, key chunk, KV head, where its result goes -------------
        task = task_ptr + t * TASK_COLUMNS
        row = tl.load(task + 0)
        q0 = tl.load(task + 1)
        tile = tl.load(task + 2)
        k0 = tl.load(task + 3)
        k1 = tl.load(task + 4)
        head = tl.load(task + 5)
        part = tl.load(task + 6)  # -1: write the output; else: partial slot
        q_base = tl.load(row_q_base_ptr + row)  # element offset of the row's first query
        o_base = tl.load(row_o_base_ptr + row)
        q_len = tl.load(row_q_len_ptr + row)
        kv_len = tl.load(row_kv_len_ptr + row)
        kv_off = tl.load(row_kv_off_ptr + row)  # dense cache: slot of the row's first key

        # M rows are (query, head) pairs: query q0 + m // G, query head head * G + m % G.
        qi = (q0 + offs_m // G).to(tl.int64)
        qh = head * G + offs_m % G
        m_ok = (offs_m // G < tile) & (qi < q_len)
        qpos = kv_len - q_len + qi  # KV position of each query
        q = tl.load(
            q_ptr + q_base + qi[:, None] * stride_qt + qh[:, None] * stride_qh + offs_d[None, :],
            mask=m_ok[:, None], other=0.0,
        )  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        if HAS_TREE:  # each query's ancestor bits among its row's own tokens (-1: all)
            token = tl.load(row_token_ptr + row) + qi
            bits = tl.load(tree_ptr + token, mask=m_ok, other=-1)

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DV), tl.float32)
        end = tl.minimum(k1, kv_len)
        if CAUSAL:
            # Keys after the tile's last query are hidden from all of it.
            end = tl.minimum(end, kv_len - q_len + tl.minimum(q0 + tile, q_len))
        # -- walk the key chunk in BLOCK_N steps: online softmax ------------------------------
        for start in range(k0, end, BLOCK_N):
            n = start + offs_n
            n_ok = n < end
            block = tl.load(table_ptr + row * stride_table + n // KV_BLOCK, mask=n_ok, other=0)
            block = block.to(tl.int64)
            slot = n % KV_BLOCK + kv_off
            k = tl.load(
                k_ptr + block[:, None] * stride_kb + slot[:, None] * stride_kt
                + head * stride_kh + offs_d[None, :],
                mask=n_ok[:, None], other=0.0,
            )  # fmt: skip
            v = tl.load(
                v_ptr + block[:, None] * stride_vb + slot[:, None] * stride_vt
                + head * stride_vh + offs_dv[None, :],
                mask=n_ok[:, None], other=0.0,
            )  # fmt: skip
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:  # fp32: full precision, as torch computes it (no TF32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            ok = m_ok[:, None] & n_ok[None, :]
            if CAUSAL:
                ok = ok & (n[None, :] <= qpos[:, None])
            if HAS_WINDOW:
                ok = ok & (n[None, :] > qpos[:, None] - window)
            if HAS_TREE:
                rel = n - (kv_len - q_len)  # the key's index among the row's own tokens
                shift = tl.minimum(tl.maximum(rel, 0), 63).to(tl.int64)
                seen = ((bits[:, None] >> shift[None, :]) & 1) != 0
                ok = ok & ((rel < 0)[None, :] | seen)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        # -- epilogue: the output, or a partial result for the merge launch -------------------
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if part < 0:
            dest = out_ptr + o_base + qi[:, None] * stride_ot + qh[:, None] * stride_oh
            tl.store(dest + offs_dv[None, :], o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
        else:
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            slot = part.to(tl.int64) * BLOCK_M + offs_m
            tl.store(part_lse_ptr + slot, lse)
            tl.store(part_o_ptr + slot[:, None] * DV + offs_dv[None, :], o)


@triton.jit
def _merge_kernel(
    out_ptr, part_o_ptr, part_lse_ptr, merge_ptr,
    row_o_base_ptr, row_q_len_ptr,
    stride_ot, stride_oh,
    G: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # One program per split (query tile, KV head): the log-sum-exp merge of its parts.
    entry = merge_ptr + tl.program_id(0) * MERGE_COLUMNS
    row = tl.load(entry + 0)
    q0 = tl.load(entry + 1)
    tile = tl.load(entry + 2)
    head = tl.load(entry + 3)
    first = tl.load(entry + 4)  # the parts lie in consecutive slots first, first + 1, …
    parts = tl.load(entry + 5)
    o_base = tl.load(row_o_base_ptr + row)
    q_len = tl.load(row_q_len_ptr + row)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, DV)
    qi = (q0 + offs_m // G).to(tl.int64)
    qh = head * G + offs_m % G
    m_ok = (offs_m // G < tile) & (qi < q_len)

    top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for j in range(first, first + parts):
        top = tl.maximum(top, tl.load(part_lse_ptr + (j * BLOCK_M + offs_m).to(tl.int64)))
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.zeros((BLOCK_M,), tl.float32)
    merged = tl.zeros((BLOCK_M, DV), tl.float32)
    for j in range(first, first + parts):
        slot = (j * BLOCK_M + offs_m).to(tl.int64)
        weight = tl.exp(tl.load(part_lse_ptr + slot) - top)  # 0 for a part that saw no key
        total += weight
        merged += weight[:, None] * tl.load(part_o_ptr + slot[:, None] * DV + offs_dv[None, :])
    merged = merged / tl.where(total > 0, total, 1.0)[:, None]
    dest = out_ptr + o_base + qi[:, None] * stride_ot + qh[:, None] * stride_oh
    tl.store(dest + offs_dv[None, :], merged.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])


class _Tables:
    """The kernel's view of one plan on one device, built once (``_tables``)."""

    def __init__(self, plan: AttentionPlan, device: torch.device) -> None:
        order = torch.argsort(plan.task_worker, stable=True)  # load order within a worker
        tile = plan.task_tile[order]
        head = plan.task_head[order]
        chunks = torch.bincount(plan.tile_id, minlength=plan.query_tiles)
        is_split = chunks[plan.tile_id[tile]] > 1
        target = torch.where(is_split, plan.tile_id[tile] * plan.kv_heads + head, -1)
        # Partial slots grouped by target, so a target's parts are first, first + 1, …
        split_tasks = is_split.nonzero().flatten()
        by_target = split_tasks[torch.argsort(target[split_tasks], stable=True)]
        slot = torch.full_like(tile, -1)
        slot[by_target] = torch.arange(by_target.numel())
        tasks = torch.stack(
            [plan.row[tile], plan.q0[tile], plan.q_tile[tile], plan.k0[tile], plan.k1[tile],
             head, slot], dim=1,
        )  # fmt: skip
        _, parts = torch.unique_consecutive(target[by_target], return_counts=True)
        first = torch.cumsum(parts, 0) - parts
        some = by_target[first]  # one task of each target: its row, q0, tile and head
        merges = torch.stack(
            [tasks[some, 0], tasks[some, 1], tasks[some, 2], tasks[some, 5], first, parts], dim=1
        )
        starts = torch.zeros(plan.menu.workers + 1, dtype=torch.int64)
        starts[1:] = torch.cumsum(torch.bincount(plan.task_worker, minlength=plan.menu.workers), 0)
        # One host-to-device copy for the three tables. Each starts 16-byte aligned: Triton
        # specialises pointers on that, and a new alignment would compile a new variant.
        parts_ = [_pad16(t.flatten().to(torch.int32)) for t in (tasks, starts, merges)]
        packed = torch.cat(parts_).to(device)
        ends = torch.tensor([p.numel() for p in parts_]).cumsum(0).tolist()
        self.tasks = packed[: ends[0]]
        self.starts = packed[ends[0] : ends[1]]
        self.merges = packed[ends[1] :]
        self.slots = int(by_target.numel())
        self.n_merges = int(merges.shape[0])


def _pad16(t: torch.Tensor) -> torch.Tensor:
    """``t`` (1-D, 4-byte elements) padded with zeros to a multiple of 16 bytes."""
    return torch.cat([t, t.new_zeros(-t.numel() % 4)])


def _tables(plan: AttentionPlan, device: torch.device) -> _Tables:
    key = ("triton", device)
    tables = plan.cache.get(key)
    if tables is None:
        tables = plan.cache[key] = _Tables(plan, device)
    return tables


def _row_arrays(plan: AttentionPlan, device: torch.device, values: tuple) -> torch.Tensor:
    """``[6, rows]`` int64 on ``device``: query base, output base, query length, KV length,
    dense-cache offset and first query token of each row. Copied when the values change, else
    the last copy (every layer of a step has the same rows). Rows are padded to an even count
    so that each array starts 16-byte aligned, like the tables."""
    key = ("triton rows", device)
    last = plan.cache.get(key)
    if last is not None and last[0] == values:
        return last[1]
    arrays = torch.tensor(values, dtype=torch.int64)
    arrays = torch.cat([arrays, arrays.new_zeros(6, arrays.shape[1] % 2)], dim=1).to(device)
    plan.cache[key] = (values, arrays)
    return arrays


def _tree(plan: AttentionPlan, device: torch.device) -> torch.Tensor | None:
    """The plan's tree masks (int64 per query token) on ``device``, copied once per plan."""
    host = plan.tree_tensor()
    if host is None:
        return None
    key = ("triton tree", device)
    found = plan.cache.get(key)
    if found is None:
        found = plan.cache[key] = host.to(device)
    return found


def _dense_block_table(plan: AttentionPlan, device: torch.device) -> torch.Tensor:
    """A dense ``[B, Hkv, L, D]`` cache as a paged one: row r is block r."""
    key = ("triton dense table", device)
    table = plan.cache.get(key)
    if table is None:
        table = torch.arange(plan.table.rows, dtype=torch.int32)[:, None].to(device)
        plan.cache[key] = table
    return table


def triton_attention(
    plan: AttentionPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: Sequence[int],
    *,
    scale: float,
    block_table: torch.Tensor | None = None,
    block_size: int | None = None,
    q_end: Sequence[int] | None = None,
    kv_start: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``plan``: one launch over its task table, and a second that merges split tiles.

    Queries: packed ``[Tq, Hq, D]`` in token-table order, or, with ``q_end``, dense
    ``[B, Hq, Lq, D]`` with row r's queries in the slots ending before ``q_end[r]`` (the output
    then has the same form, padding slots zero). Keys: a paged cache ``[blocks, block_size, Hkv,
    D]`` with ``block_table``, or a dense cache ``[B, Hkv, L, D]``; row r's keys start at slot
    ``kv_start[r]`` (default 0) of its first block. Every tensor's last dim must be contiguous.
    """
    # -- check the constraints ----------------------------------------------------------------
    table = plan.table
    plan.check(table.q_len, kv_lens)
    hq, d = q.shape[1], q.shape[-1]
    dv = v.shape[-1]
    hkv = k.shape[1] if block_table is None else k.shape[2]
    group = hq // hkv
    if max(table.q_tile, default=1) * group > BLOCK_M:
        raise ValueError(
            f"triton_attention: query tiles of {max(table.q_tile)} × {group} heads exceed "
            f"BLOCK_M={BLOCK_M}; plan with attention_menu(group={group}, ...)"
        )
    for name, size in (("head dim", d), ("value head dim", dv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"triton_attention: {name} must be a power of two >= 16, got {size}")
    if out is None:
        out = q.new_empty((*q.shape[:-1], dv))
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        # The kernel reads a head's D values as one run of memory.
        if t.stride(-1) != 1:
            raise ValueError(
                f"triton_attention: {name} must be contiguous in its last dim, got stride "
                f"{t.stride(-1)} (the Triton provider's checker declines such calls)"
            )

    # -- the plan's tables on the device (built once per plan) and this run's row arrays ------
    device = q.device
    rows = table.rows
    tables = _tables(plan, device)
    if block_table is None:  # dense cache: row r is block r, slots are positions
        kv_block = DENSE_BLOCK
        block_table = _dense_block_table(plan, device)
        strides_k = (k.stride(0), k.stride(2), k.stride(1))
        strides_v = (v.stride(0), v.stride(2), v.stride(1))
        kv_off = tuple(kv_start) if kv_start is not None else (0,) * rows
    else:
        kv_block = block_size
        block_table = block_table.to(device=device, dtype=torch.int32)
        strides_k = (k.stride(0), k.stride(1), k.stride(2))
        strides_v = (v.stride(0), v.stride(1), v.stride(2))
        kv_off = tuple(kv_start) if kv_start is not None else (0,) * rows
    if q_end is not None:
        first = [q_end[r] - table.q_len[r] for r in range(rows)]
        q_base = tuple(r * q.stride(0) + first[r] * q.stride(2) for r in range(rows))
        o_base = tuple(r * out.stride(0) + first[r] * out.stride(2) for r in range(rows))
        q_strides = (q.stride(2), q.stride(1))
        o_strides = (out.stride(2), out.stride(1))
    else:
        q_base = tuple(s * q.stride(0) for s in table.q_start)
        o_base = tuple(s * out.stride(0) for s in table.q_start)
        q_strides = (q.stride(0), q.stride(1))
        o_strides = (out.stride(0), out.stride(1))
    row_arrays = _row_arrays(
        plan, device, (q_base, o_base, table.q_len, tuple(kv_lens), kv_off, table.q_start)
    )
    q_base_t, o_base_t, q_len_t, kv_len_t, kv_off_t, token_t = row_arrays.unbind(0)
    tree = _tree(plan, device)

    # -- launch: the tasks, then the merges of split query tiles -----------------------------
    out.zero_()  # padding slots and rows with no task (every key hidden) read as zeros
    if not plan.tiles:
        return out
    slots = max(tables.slots, 1)
    part_o = torch.empty((slots, BLOCK_M, dv), dtype=torch.float32, device=device)
    part_lse = torch.empty((slots, BLOCK_M), dtype=torch.float32, device=device)
    _attention_kernel[(plan.menu.workers,)](
        q, k, v, out, part_o, part_lse,
        block_table, tables.tasks, tables.starts,
        q_base_t, o_base_t, q_len_t, kv_len_t, kv_off_t,
        token_t, token_t if tree is None else tree,
        *q_strides,
        *strides_k, *strides_v,
        *o_strides,
        block_table.stride(0),
        scale, plan.window or 0,
        CAUSAL=plan.causal, HAS_WINDOW=plan.window is not None, HAS_TREE=tree is not None,
        G=group, D=d, DV=dv, KV_BLOCK=kv_block,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        UPCAST=q.device.type != "cuda" and q.dtype != torch.float32,
        IEEE=q.dtype == torch.float32 or q.device.type != "cuda",
    )  # fmt: skip
    if tables.n_merges:
        _merge_kernel[(tables.n_merges,)](
            out, part_o, part_lse, tables.merges,
            o_base_t, q_len_t,
            *o_strides,
            G=group, DV=dv, BLOCK_M=BLOCK_M,
        )  # fmt: skip
    return out
