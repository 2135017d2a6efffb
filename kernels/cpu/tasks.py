"""An ``AttentionPlan`` as the native kernel's tables (``attention.cpp``), built once per plan.

Plans are cached per shape class and shared by every layer of a step, so the tables are kept in
the plan's ``cache`` and built once per class, not per layer or per call.

- ``tasks``: int32 ``[tasks, 8]`` in the plan's heaviest-first order: ``row, q0, q_tile, k0,
  k1, head, part, 0``. ``part`` is the partial slot of a query tile whose keys are split into
  several chunks, -1 when the task writes the output itself.
- ``merges``: int32 ``[merges, 6]``: ``row, q0, q_tile, head, first part, count``: the chunks of
  one (query tile, KV head), in key order, are the partial slots ``first … first + count - 1``.
- ``q_start``, ``q_len``: int32 per row of the token table.
- ``empty``: (first query, queries) of rows with queries but no scheduled tile (a non-causal
  row over an empty cache): the kernel never touches them, the caller writes their zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xy_inductor.kernels.attention_plan import AttentionPlan

__all__ = ["TaskTables", "task_tables"]


@dataclass(frozen=True, slots=True)
class TaskTables:
    """What the native kernel reads of a plan (see the module docstring)."""

    tasks: torch.Tensor
    merges: torch.Tensor
    q_start: torch.Tensor
    q_len: torch.Tensor
    parts: int
    """Partial slots the merges read."""
    max_q_tile: int
    """The largest query tile: a partial slot holds ``max_q_tile × G`` rows."""
    empty: tuple[tuple[int, int], ...]
    row_keys: int
    """Query tokens times keys over all tasks: the step's work per query head and head dim."""


def task_tables(plan: AttentionPlan) -> TaskTables:
    """The plan's tables, built on first use and kept in ``plan.cache``."""
    found = plan.cache.get("cpu tables")
    if found is None:
        found = plan.cache["cpu tables"] = _build(plan)
    return found


def _build(plan: AttentionPlan) -> TaskTables:
    row, q0, q_tile = plan.row.tolist(), plan.q0.tolist(), plan.q_tile.tolist()
    k0, k1, tile_id = plan.k0.tolist(), plan.k1.tolist(), plan.tile_id.tolist()
    heads = plan.kv_heads
    chunks: dict[int, list[int]] = {}  # query tile -> its tiles, in key order
    for i, t in enumerate(tile_id):
        chunks.setdefault(t, []).append(i)
    part_of: dict[tuple[int, int], int] = {}  # (tile, head) -> partial slot
    merges: list[list[int]] = []
    parts = 0
    for members in chunks.values():
        if len(members) < 2:
            continue
        first = members[0]
        for h in range(heads):
            merges.append([row[first], q0[first], q_tile[first], h, parts, len(members)])
            for i in members:
                part_of[(i, h)] = parts
                parts += 1
    tasks = [
        [row[i], q0[i], q_tile[i], k0[i], k1[i], h, part_of.get((i, h), -1), 0]
        for i, h in zip(plan.task_tile.tolist(), plan.task_head.tolist(), strict=True)
    ]
    table = plan.table
    covered = set(row)
    empty = tuple(
        (table.q_start[r], n) for r, n in enumerate(table.q_len) if n > 0 and r not in covered
    )
    row_keys = heads * sum(
        min(t, table.q_len[r] - a) * (b - c)
        for r, a, t, c, b in zip(row, q0, q_tile, k0, k1, strict=True)
    )
    i32 = torch.int32
    return TaskTables(
        tasks=torch.tensor(tasks, dtype=i32).reshape(-1, 8),
        merges=torch.tensor(merges, dtype=i32).reshape(-1, 6),
        q_start=torch.tensor(table.q_start, dtype=i32),
        q_len=torch.tensor(table.q_len, dtype=i32),
        parts=parts,
        max_q_tile=max(q_tile, default=1),
        empty=empty,
        row_keys=row_keys,
    )
