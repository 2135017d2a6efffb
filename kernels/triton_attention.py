"""Meta-attention in Triton: one launch runs a plan's whole task table.

The grid is one program per worker (persistent): program ``w`` walks the tasks dealt to it
(``AttentionPlan``'s symmetric round-robin) and runs each with the one primitive, QK → online
softmax → SV over one query tile and one key chunk. A task covers a tile of queries and, for
grouped-query attention, all ``G`` query heads that share its KV head: the M dimension of the
tile is ``(query, head)`` pairs, so K and V are read once per group. Keys come from a paged cache
through the block table (a dense cache is one block per row). Every length (queries, keys, rows,
tasks) is a run-time value: nothing recompiles when a batch changes. Tasks of a query tile that
was split over several key chunks write partial results with their log-sum-exp, and the last
of them to finish (an atomic count per query tile) merges them, inside the same launch.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (the tests). Import only when
Triton is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from xy_inductor.runtime.attention_plan import AttentionMenu, AttentionPlan

__all__ = ["BLOCK_M", "BLOCK_N", "DENSE_BLOCK", "menu_for", "triton_attention"]

BLOCK_M = 64  # (query, head) rows per task
BLOCK_N = 32  # keys per inner step
# A dense [B, Hkv, L, D] cache is passed as one block per row of this many slots (a constant,
# so a new L never compiles a new variant).
DENSE_BLOCK = 1 << 30


def menu_for(group: int, workers: int, kv_chunk: int = 512) -> AttentionMenu:
    """The planner's menu for this kernel: query tiles that fill BLOCK_M with ``group`` heads."""
    largest = max(1, BLOCK_M // group)
    tiles = tuple(sorted({t for t in (1, 4, 16, largest) if t <= largest}))
    return AttentionMenu(q_tiles=tiles, kv_chunk=kv_chunk, workers=workers)


# Batch-dependent integers are never specialised: the block table's row stride (its width
# follows the longest sequence) and a dense cache's row stride (its length).
@triton.jit(do_not_specialize=["stride_kb", "stride_vb", "stride_table"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    arrived_ptr, target_first_ptr, target_parts_ptr,
    table_ptr, task_ptr, worker_start_ptr,
    row_q_base_ptr, row_o_base_ptr, row_q_len_ptr, row_kv_len_ptr, row_kv_off_ptr,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    scale, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
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
        task = task_ptr + t * 8
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

        # -- epilogue: the output, or a partial result merged by the last part to finish ------
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        dest = out_ptr + o_base + qi[:, None] * stride_ot + qh[:, None] * stride_oh
        if part < 0:
            tl.store(dest + offs_dv[None, :], o.to(out_ptr.dtype.element_ty), mask=m_ok[:, None])
        else:
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + part * BLOCK_M + offs_m, lse)
            tl.store(part_o_ptr + (part * BLOCK_M + offs_m)[:, None] * DV + offs_dv[None, :], o)
            target = tl.load(task + 7)
            parts = tl.load(target_parts_ptr + target)
            # acq_rel: the other parts' stores happened before their increments.
            if tl.atomic_add(arrived_ptr + target, 1) == parts - 1:
                first_part = tl.load(target_first_ptr + target)
                top = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                for j in range(first_part, first_part + parts):
                    lse_j = tl.load(part_lse_ptr + j * BLOCK_M + offs_m, cache_modifier=".cg")
                    top = tl.maximum(top, lse_j)
                top = tl.where(top == float("-inf"), 0.0, top)
                total = tl.zeros((BLOCK_M,), tl.float32)
                merged = tl.zeros((BLOCK_M, DV), tl.float32)
                for j in range(first_part, first_part + parts):
                    lse_j = tl.load(part_lse_ptr + j * BLOCK_M + offs_m, cache_modifier=".cg")
                    o_j = tl.load(
                        part_o_ptr + (j * BLOCK_M + offs_m)[:, None] * DV + offs_dv[None, :],
                        cache_modifier=".cg",
                    )
                    weight = tl.exp(lse_j - top)  # 0 for a part that saw no key
                    total += weight
                    merged += weight[:, None] * o_j
                merged = merged / tl.where(total > 0, total, 1.0)[:, None]
                tl.store(
                    dest + offs_dv[None, :],
                    merged.to(out_ptr.dtype.element_ty),
                    mask=m_ok[:, None],
                )


def _task_table(plan: AttentionPlan, device: torch.device) -> dict[str, torch.Tensor]:
    """The kernel's view of the plan.

    ``tasks`` ``[tasks, 8]`` int32, grouped by worker in load order: row, q0, tile, k0, k1, KV
    head, partial slot and merge target (both -1 for a query tile that is not split);
    ``starts``: each worker's first task. A split (query tile, KV head) is a merge target whose
    parts occupy consecutive slots (``first``, ``parts``); ``arrived`` counts finished parts.
    """
    order = torch.argsort(plan.task_worker, stable=True)  # keep the load order within a worker
    tile = plan.task_tile[order]
    head = plan.task_head[order]
    chunks = torch.bincount(plan.tile_id, minlength=plan.query_tiles)
    is_split = chunks[plan.tile_id[tile]] > 1
    target = torch.where(is_split, plan.tile_id[tile] * plan.kv_heads + head, -1)
    # Slots grouped by target, so a target's parts are first, first + 1, ...
    slot = torch.full_like(tile, -1)
    split_tasks = is_split.nonzero().flatten()
    by_target = split_tasks[torch.argsort(target[split_tasks], stable=True)]
    slot[by_target] = torch.arange(by_target.numel())
    n_targets = max(plan.query_tiles * plan.kv_heads, 1)
    parts = torch.bincount(target[split_tasks], minlength=n_targets)
    first = torch.cumsum(parts, 0) - parts
    tasks = torch.stack(
        [plan.row[tile], plan.q0[tile], plan.q_tile[tile], plan.k0[tile], plan.k1[tile], head,
         slot, target], dim=1,
    )  # fmt: skip
    counts = torch.bincount(plan.task_worker, minlength=plan.menu.workers)
    starts = torch.zeros(plan.menu.workers + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(counts, 0)
    as_i32 = {"tasks": tasks, "starts": starts, "first": first, "parts": parts}
    out = {k: v.to(device=device, dtype=torch.int32) for k, v in as_i32.items()}
    out["arrived"] = torch.zeros(n_targets, dtype=torch.int32, device=device)
    out["slots"] = int(by_target.numel())
    return out


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
    """Run ``plan`` in one launch (split query tiles are merged inside it).

    Queries: packed ``[Tq, Hq, D]`` in token-table order, or, with ``q_end``, dense
    ``[B, Hq, Lq, D]`` with row r's queries in the slots ending before ``q_end[r]`` (the output
    then has the same form, padding slots zero). Keys: a paged cache ``[blocks, block_size, Hkv,
    D]`` with ``block_table``, or a dense cache ``[B, Hkv, L, D]`` with row r's keys starting at
    ``kv_start[r]`` (default 0).
    """
    table = plan.table
    plan.check(table.q_len, kv_lens)
    dense_q = q_end is not None
    hq, d = q.shape[1], q.shape[-1]
    dv = v.shape[-1]
    device = q.device
    rows = table.rows
    if block_table is None:  # dense cache: row r is block r, slots are positions
        hkv = k.shape[1]
        kv_block = DENSE_BLOCK
        block_table = torch.arange(k.shape[0], dtype=torch.int32, device=device)[:, None]
        strides_k = (k.stride(0), k.stride(2), k.stride(1))
        strides_v = (v.stride(0), v.stride(2), v.stride(1))
        kv_off = list(kv_start) if kv_start is not None else [0] * rows
    else:
        hkv = k.shape[2]
        kv_block = block_size
        strides_k = (k.stride(0), k.stride(1), k.stride(2))
        strides_v = (v.stride(0), v.stride(1), v.stride(2))
        kv_off = [0] * rows
    group = hq // hkv
    if max(table.q_tile, default=1) * group > BLOCK_M:
        raise ValueError(
            f"triton_attention: query tiles of {max(table.q_tile)} × {group} heads exceed "
            f"BLOCK_M={BLOCK_M}; plan with menu_for(group={group}, ...)"
        )
    for name, size in (("head dim", d), ("value head dim", dv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"triton_attention: {name} must be a power of two >= 16, got {size}")
    if out is None:
        shape = (*q.shape[:-1], dv)
        out = q.new_empty(shape)
    out.zero_()  # padding slots and rows with no task (every key hidden) read as zeros
    if dense_q:
        first = [q_end[r] - table.q_len[r] for r in range(rows)]
        q_base = [r * q.stride(0) + first[r] * q.stride(2) for r in range(rows)]
        o_base = [r * out.stride(0) + first[r] * out.stride(2) for r in range(rows)]
        q_strides = (q.stride(2), q.stride(1))
        o_strides = (out.stride(2), out.stride(1))
    else:
        q_base = [s * q.stride(0) for s in table.q_start]
        o_base = [s * out.stride(0) for s in table.q_start]
        q_strides = (q.stride(0), q.stride(1))
        o_strides = (out.stride(0), out.stride(1))
    tt = _task_table(plan, device)
    slots = max(tt["slots"], 1)
    part_o = torch.empty((slots, BLOCK_M, dv), dtype=torch.float32, device=device)
    part_lse = torch.empty((slots, BLOCK_M), dtype=torch.float32, device=device)

    def i64(xs: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=torch.int64, device=device)

    block_table = block_table.to(device=device, dtype=torch.int32)
    if plan.tiles:
        _attention_kernel[(plan.menu.workers,)](
            q, k, v, out, part_o, part_lse,
            tt["arrived"], tt["first"], tt["parts"],
            block_table, tt["tasks"], tt["starts"],
            i64(q_base), i64(o_base), i64(table.q_len), i64(kv_lens), i64(kv_off),
            *q_strides,
            *strides_k, *strides_v,
            *o_strides,
            block_table.stride(0),
            scale, plan.window or 0,
            CAUSAL=plan.causal, HAS_WINDOW=plan.window is not None,
            G=group, D=d, DV=dv, KV_BLOCK=kv_block,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            UPCAST=q.device.type != "cuda" and q.dtype != torch.float32,
            IEEE=q.dtype == torch.float32 or q.device.type != "cuda",
        )  # fmt: skip
    return out
