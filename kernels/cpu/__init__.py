"""The CPU provider: xyserve's meta-attention as a native kernel (``attention.cpp``).

It serves ``attention_varlen`` on CPU tensors: one call per step runs the plan's task table
(token table -> query tiles x key chunks x KV heads) over torch's threads, reading the paged
cache in place through the block table, query heads of one KV head packed into a task's rows,
long KV split into chunks merged by log-sum-exp, fp32 accumulation and one rounding at the end
(path ``paged``). It sits in front of ATen, which serves whatever it declines.

Declines (counted in ``stats().declined``): the library is not built for this machine (no
AVX2/AVX-512, no compiler, ``XYSERVE_CPU_ATTN=0``, a failed build: the reason says which), a
dtype other than float32/bfloat16/float16, head sizes not a multiple of ``HEAD_MULTIPLE``,
head dims that are not contiguous, a block table that is not int32/int64.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from xy_inductor.kernels.attention_plan import AttentionMenu, AttentionPlan
from xy_inductor.kernels.calls import VarlenAttention
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.kernels.cpu import build
from xy_inductor.kernels.cpu.tasks import TaskTables, task_tables

__all__ = ["HEAD_MULTIPLE", "PROVIDER", "PagedTasks", "menu_for"]

HEAD_MULTIPLE = 16
"""Head sizes the kernel takes are multiples of this (one AVX-512 vector of floats)."""

# Rows of one task are its query tokens times the GQA group; tiles up to this many rows keep a
# task's fp32 accumulator and scores in L2 while its keys stream.
_TASK_ROWS = 64
_Q_TILES = (1, 2, 4, 8, 16, 32, 64)

# Below this many multiply-adds a step runs on the calling thread: starting the thread pool
# costs more than small decode steps take.
PARALLEL_MIN_WORK = 1 << 20

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def menu_for(group: int) -> AttentionMenu:
    """The tile menu for ``group`` query heads per KV head: query tiles of at most
    ``_TASK_ROWS`` rows. ``workers`` is 1: threads pull tasks from the plan's heaviest-first
    order at run time, so the plan's static deal to workers is not used."""
    tiles = tuple(t for t in _Q_TILES if t * group <= _TASK_ROWS) or (1,)
    return AttentionMenu(q_tiles=tiles, kv_chunk=512, workers=1)


@dataclass(frozen=True, slots=True)
class PagedTasks:
    """The decision of an ``attention_varlen`` call (path ``paged``)."""

    plan: AttentionPlan
    tables: TaskTables
    kv_len: torch.Tensor
    """The call's KV lengths, int32: a decision is made per step and shared by its layers."""
    parallel: bool
    """Whether the step is worth running over torch's threads."""
    rows: tuple
    """The kernel's per-row and task arguments, in its order (made once, passed per layer)."""


def _unavailable() -> str | None:
    return build.why_unavailable()


def check_attention_varlen(call: VarlenAttention) -> Accept | str:
    q, k, v = call.q, call.k_cache, call.v_cache
    if not q.is_cpu:
        return "not a CPU tensor"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the kernel runs float32, bfloat16, float16)"
    d, dv = k.shape[3], v.shape[3]
    if d % HEAD_MULTIPLE or dv % HEAD_MULTIPLE:
        return f"head sizes {d}/{dv} are not multiples of {HEAD_MULTIPLE}"
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        return "head dims are not contiguous"
    if call.block_table.dtype not in (torch.int32, torch.int64):
        return f"block_table dtype {call.block_table.dtype} (expected int32 or int64)"
    try:
        build.library()
    except build.BuildError as e:
        return str(e)
    group = q.shape[1] // k.shape[2]
    plan = call.plan(menu_for(group))
    tables = task_tables(plan)
    work = tables.row_keys * group * (d + dv)
    kv_len = torch.tensor(call.kv_lens, dtype=torch.int32)
    rows = (
        tables.q_start,
        tables.q_len,
        kv_len,
        tables.tasks,
        tables.merges,
        tables.max_q_tile * group,
        tables.parts,
    )
    return Accept("paged", PagedTasks(plan, tables, kv_len, work >= PARALLEL_MIN_WORK, rows))


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    decision: PagedTasks = accept.decision
    tables = decision.tables
    q, k, v = call.q, call.k_cache, call.v_cache
    out = call.out
    if out is None or out.stride(2) != 1:
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[3]))
    for s0, n in tables.empty:
        out[s0 : s0 + n] = 0
    build.library().paged_attention(
        q,
        k,
        v,
        call.block_table,
        *decision.rows,
        call.softmax_scale,
        call.causal,
        call.window or 0,
        out,
        decision.parallel,
    )
    return out


PROVIDER = Provider(
    name="cpu",
    unavailable=_unavailable,
    kernels={"attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen)},
)
