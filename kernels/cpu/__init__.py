"""The CPU provider: xyserve's meta-attention as a native kernel (``attention.cpp``).

It serves ``attention_varlen`` on CPU tensors: one call per step runs the plan's task table
(token table -> query tiles x key chunks x KV heads) over torch's threads, reading the paged
cache in place through the block table, query heads of one KV head packed into a task's rows,
long KV split into chunks merged by log-sum-exp, fp32 accumulation and one rounding at the end
(path ``paged``). Hugging Face's forms run on the same kernel: ``attention_packed`` (packed
prefill), the packed K/V seen as one block holding every token and each row's keys starting at
its first token (path ``packed``); dense ``attention`` whose mask is rows of padding, each batch
entry's K/V one block and its row's keys starting where its padding ends (path ``dense``). It
sits in front of ATen, which serves whatever it declines.

It serves no ``gemm`` and declines every dense call under ``DENSE_MIN_SCORES`` scores, so the
ATen C++ fast path (which serves exactly those calls as one SDPA call) keeps its rules.

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
from xy_inductor.kernels.calls import DenseAttention, PackedAttention, VarlenAttention
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.kernels.cpu import build
from xy_inductor.kernels.cpu.tasks import TaskTables, task_tables

__all__ = [
    "DENSE_MIN_SCORES",
    "HEAD_MULTIPLE",
    "PROVIDER",
    "DenseTasks",
    "PackedTasks",
    "PagedTasks",
    "menu_for",
]

HEAD_MULTIPLE = 16
"""Head sizes the kernel takes are multiples of this (one AVX-512 vector of floats)."""

# Rows of one task are its query tokens times the GQA group; tiles up to this many rows keep a
# task's fp32 accumulator and scores in L2 while its keys stream.
_TASK_ROWS = 64
_Q_TILES = (1, 2, 4, 8, 16, 32, 64)

# Below this many multiply-adds a step runs on the calling thread: starting the thread pool
# costs more than small decode steps take.
PARALLEL_MIN_WORK = 1 << 20

# A dense call with fewer scores (B × Lq × Lk: a tiny model's decode step) is one SDPA call in
# ATen's C++ fast path; that path serves every call under ATen's own threshold (the same value,
# 1 << 18) without asking the providers, so this one must not be lower (tests/test_cpu_attention).
DENSE_MIN_SCORES = 1 << 18

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# "Every row's keys start at slot 0 of its block table" (paged calls); never written.
_NO_START = torch.empty(0, dtype=torch.int32)
_NO_TREE = torch.empty(0, dtype=torch.int64)  # no tree verify rows


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
    parallel: bool
    """Whether the step is worth running over torch's threads."""
    rows: tuple
    """The kernel's per-row and task arguments, in its order (made once, passed per layer)."""
    tree: torch.Tensor
    """The plan's tree verify rows, int64 per query token (``AttentionPlan.tree_tensor``), or
    empty: no row is a tree."""

    @property
    def kv_len(self) -> torch.Tensor:
        """The call's KV lengths, int32 (in ``rows``): a decision is made per step and shared by
        its layers."""
        return self.rows[2]


def _unavailable() -> str | None:
    return build.why_unavailable()


@dataclass(frozen=True, slots=True)
class PackedTasks:
    """The decision of an ``attention_packed`` call (path ``packed``)."""

    plan: AttentionPlan
    block_table: torch.Tensor
    """``[rows, 1]`` zeros: every row's keys are in the one block holding all tokens."""
    parallel: bool
    rows: tuple
    """The kernel's per-row and task arguments, in its order."""


def _declines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors (``k``/``v`` with the head dim last), or None."""
    if not q.is_cpu:
        return "not a CPU tensor"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (the kernel runs float32, bfloat16, float16)"
    d, dv = k.shape[-1], v.shape[-1]
    if d % HEAD_MULTIPLE or dv % HEAD_MULTIPLE:
        return f"head sizes {d}/{dv} are not multiples of {HEAD_MULTIPLE}"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head dims are not contiguous"
    return build.why_not_loaded()


def _row_args(
    tables: TaskTables,
    q_start: torch.Tensor,
    kv_len: torch.Tensor,
    k_start: torch.Tensor,
    group: int,
) -> tuple:
    """The kernel's per-row and task arguments, in its order."""
    return (
        q_start,
        tables.q_len,
        kv_len,
        k_start,
        tables.tasks,
        tables.merges,
        tables.max_q_tile * group,
        tables.parts,
    )


def _parallel(tables: TaskTables, group: int, head_sizes: int) -> bool:
    """Whether a call is worth running over torch's threads (``head_sizes``: D + Dv)."""
    return tables.row_keys * group * head_sizes >= PARALLEL_MIN_WORK


def _launch(
    call: VarlenAttention | PackedAttention | DenseAttention,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    rows: tuple,
    causal: bool,
    window: int,
    out: torch.Tensor,
    parallel: bool,
    tree: torch.Tensor = _NO_TREE,
) -> None:
    """One call of the native kernel (``attention.cpp``'s ``paged_attention``) into ``out``."""
    build.library().paged_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        *rows,
        call.softmax_scale,
        causal,
        window,
        tree,
        out,
        parallel,
    )


def check_attention_varlen(call: VarlenAttention) -> Accept | str:
    q, k, v = call.q, call.k_cache, call.v_cache
    reason = _declines(q, k, v)
    if reason is not None:
        return reason
    if call.block_table.dtype not in (torch.int32, torch.int64):
        return f"block_table dtype {call.block_table.dtype} (expected int32 or int64)"
    group = q.shape[1] // k.shape[2]
    plan = call.plan(menu_for(group))
    tables = task_tables(plan)
    kv_len = torch.tensor(call.kv_lens, dtype=torch.int32)
    rows = _row_args(tables, tables.q_start, kv_len, _NO_START, group)
    parallel = _parallel(tables, group, k.shape[3] + v.shape[3])
    tree = plan.tree_tensor()
    return Accept(
        "paged", PagedTasks(plan, tables, parallel, rows, _NO_TREE if tree is None else tree)
    )


def run_attention_varlen(call: VarlenAttention, accept: Accept) -> torch.Tensor:
    decision: PagedTasks = accept.decision
    tables = decision.tables
    q, k, v = call.q, call.k_cache, call.v_cache
    out = call.out
    if out is None or out.stride(2) != 1:
        out = q.new_empty((q.shape[0], q.shape[1], v.shape[3]))
    for s0, n in tables.empty:
        out[s0 : s0 + n] = 0
    _launch(
        call, q, k, v, call.block_table, decision.rows, call.causal, call.window or 0, out,
        decision.parallel, decision.tree,
    )  # fmt: skip
    return out


def check_attention_packed(call: PackedAttention) -> Accept | str:
    q, k, v = call.q, call.k, call.v
    reason = _declines(q, k, v)
    if reason is not None:
        return reason
    group = q.shape[1] // k.shape[1]
    plan = call.plan(menu_for(group))
    if plan.table.q_start != call.starts:
        return "the sequences are not packed back to back"
    tables = task_tables(plan)
    rows = _row_args(tables, tables.q_start, tables.q_len, tables.q_start, group)
    table = torch.zeros(len(call.lens), 1, dtype=torch.int32)
    parallel = _parallel(tables, group, k.shape[2] + v.shape[2])
    return Accept("packed", PackedTasks(plan, table, parallel, rows))


def run_attention_packed(call: PackedAttention, accept: Accept) -> torch.Tensor:
    decision: PackedTasks = accept.decision
    q, k, v = call.q, call.k, call.v
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[2]))
    # k[None]: [1 block, tokens, Hkv, D], a row's keys starting at its first token
    _launch(
        call, q, k[None], v[None], decision.block_table, decision.rows, call.causal,
        call.window or 0, out, decision.parallel,
    )  # fmt: skip
    return out


@dataclass(frozen=True, slots=True)
class DenseTasks:
    """The decision of a dense ``attention`` call whose mask is rows of padding (path
    ``dense``)."""

    plan: AttentionPlan
    block_table: torch.Tensor
    """``[B, 1]``: row b's keys are in block b (its batch entry)."""
    padding: tuple[tuple[int, int], ...]
    """(first, count) of the query slots of ``[B · Lq]`` outside every row: written as zeros."""
    parallel: bool
    rows: tuple
    """The kernel's per-row and task arguments, in its order."""


def _mask_stats(mask: torch.Tensor) -> torch.Tensor | None:
    """A dense mask's per-query stats in one pass (``mask_rows.h``; ``rows_from_mask``), or
    None for a mask the scan does not read (ATen's passes then do)."""
    if not mask.is_cpu or mask.dtype not in (torch.bool, *_DTYPES):
        return None
    return build.library().mask_row_stats(mask)


def check_attention(call: DenseAttention) -> Accept | str:
    q, k, v = call.q, call.k, call.v
    if call.scores < DENSE_MIN_SCORES:
        return f"fewer than {DENSE_MIN_SCORES} scores (one SDPA call costs less)"
    if build.why_not_loaded() is None:
        # Read here even if this provider declines below: the providers after it reuse rows.
        call.rows(_mask_stats)
    reason = _declines(q, k, v)
    if reason is not None:
        return reason
    found = call.rows()
    if found is None:
        return "the mask is not rows of padding"
    b, hq, lq, _ = q.shape
    group = hq // k.shape[1]
    plan = call.plan(found, menu_for(group))
    tables = task_tables(plan)
    padding, starts = [], []
    for r, (end, n) in enumerate(zip(found.q_end, found.q_len, strict=True)):
        first = r * lq
        starts.append(first + end - n)
        padding += [(first, end - n), (first + end, lq - end)]
    i32 = torch.int32
    rows = _row_args(
        tables,
        torch.tensor(starts, dtype=i32),
        torch.tensor(found.kv_len, dtype=i32),
        torch.tensor(found.kv_start, dtype=i32),
        group,
    )
    return Accept(
        "dense",
        DenseTasks(
            plan,
            torch.arange(b, dtype=i32)[:, None],
            tuple((first, n) for first, n in padding if n > 0),
            _parallel(tables, group, k.shape[3] + v.shape[3]),
            rows,
        ),
    )


def run_attention(call: DenseAttention, accept: Accept) -> torch.Tensor:
    decision: DenseTasks = accept.decision
    q, k, v = call.q, call.k, call.v
    b, hq, lq, d = q.shape
    tokens = q.transpose(1, 2)  # [B, Lq, Hq, D]
    if b > 1 and tokens.stride(0) != lq * tokens.stride(1):
        tokens = tokens.contiguous()  # the kernel indexes queries by one token index
    out = call.new_output()  # [B, Hq, Lq, Dv], laid out as [B, Lq, Hq, Dv]
    flat = out.transpose(1, 2).view(b * lq, hq, v.shape[3])
    for first, n in decision.padding:
        flat[first : first + n] = 0
    # k.transpose(1, 2): [B blocks, Lk, Hkv, D], a row's keys starting where its padding ends
    _launch(
        call, tokens.reshape(b * lq, hq, d), k.transpose(1, 2), v.transpose(1, 2),
        decision.block_table, decision.rows, decision.plan.causal, 0, flat, decision.parallel,
    )  # fmt: skip
    return out


PROVIDER = Provider(
    name="cpu",
    unavailable=_unavailable,
    kernels={
        "attention_varlen": OpKernel(check_attention_varlen, run_attention_varlen),
        "attention_packed": OpKernel(check_attention_packed, run_attention_packed),
        "attention": OpKernel(check_attention, run_attention),
    },
    defers_small_attention=True,  # DENSE_MIN_SCORES
)
