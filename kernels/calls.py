"""One object per xyserve op call: what the registry hands each provider's checker and kernel.

A call object holds the op's arguments, already checked by the op, and offers the analyses and
plans the runtime owns, so that a provider (which never imports the runtime) can ask for them:

- ``DenseAttention.rows()``: the rows of padding a dense mask describes, recognised at most
  once per call (every provider's checker asks the same object, so the mask is read once);
- ``DenseAttention.plan()`` / ``VarlenAttention.plan()``: the meta-attention plan for a
  provider's tile menu, cached per shape class by the planner, so every layer of a step and
  every decode step of one class gets the same plan object (and what providers derived from it);
- ``GemmCall.tile()``: the SmoothGEMM tile a provider's plan picks for this M.

Nothing here is cached on a tensor's identity: a tensor's contents can change without its
version counter moving (``.data`` writes, NumPy views, kernels, CUDA-graph replays).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from xy_inductor.kernels.attention_plan import (
    AttentionMenu,
    AttentionPlan,
    DenseRows,
    plan_attention,
    rows_from_mask,
)
from xy_inductor.kernels.gemm_plan import GemmMenu, GemmTile, plan_for, rows_of

__all__ = [
    "DenseAttention",
    "GemmCall",
    "GemmWeight",
    "PackedAttention",
    "VarlenAttention",
    "attention_output",
]


MaskScan = Callable[[torch.Tensor], torch.Tensor | None]
"""A provider's one-pass reading of a dense mask into per-query stats, or None when it cannot
read that mask (``attention_plan.rows_from_mask``)."""


def attention_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An empty ``[B, Hq, Lq, Dv]`` output laid out as ``[B, Lq, Hq, Dv]`` in memory.

    This is the layout flash kernels write, and it makes the usual ``out.transpose(1, 2)
    .reshape(B, Lq, Hq * Dv)`` that follows attention a view instead of a copy.
    """
    b, h, length, _ = q.shape
    return q.new_empty((b, length, h, v.shape[3])).transpose(1, 2)


class GemmCall:
    """``xyserve.gemm``: ``x [..., K] @ weight [N, K]ᵀ (+ bias [N])``."""

    __slots__ = ("bias", "max_tokens", "weight", "x")

    def __init__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
    ) -> None:
        self.x = x
        self.weight = weight
        self.bias = bias
        self.max_tokens = max_tokens

    @property
    def m(self) -> int:
        """Rows of the product: the product of x's leading sizes."""
        return rows_of(self.x)

    def tile(self, menu: GemmMenu) -> GemmTile | None:
        """The tile the plan over ``menu`` (a provider's tiles) serves this M with; None when M
        is 0 or above ``max_tokens`` (the plan does not cover it)."""
        m = self.m
        if not 1 <= m <= self.max_tokens:
            return None
        w = self.weight
        return plan_for(menu, w.shape[0], w.shape[1], self.x.dtype, self.max_tokens).tile_for(m)


class GemmWeight:
    """What the backend knows about one GEMM at compile time, for ``Provider.prepare``: its
    weight, whether it has a bias, the range of M its graph can call it with, and whether the
    user allowed the weight's storage format to change (``ascend_nz_weights``)."""

    __slots__ = ("has_bias", "max_tokens", "nz_weights", "rows", "weight")

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        has_bias: bool,
        max_tokens: int,
        rows: tuple[int, int],
        nz_weights: bool = False,
    ) -> None:
        self.weight = weight
        self.has_bias = has_bias
        self.max_tokens = max_tokens
        self.rows = rows
        self.nz_weights = nz_weights

    def tiles(self, menu: GemmMenu) -> tuple[GemmTile, ...]:
        """The tiles of the plan over ``menu`` (a provider's tiles) that serve some M in
        ``rows``."""
        w = self.weight
        plan = plan_for(menu, w.shape[0], w.shape[1], w.dtype, self.max_tokens)
        lo, hi = max(self.rows[0], 1), min(self.rows[1], self.max_tokens)
        return tuple(
            dict.fromkeys(
                b.tile for b in plan.buckets if b.tile is not None and b.hi >= lo and b.lo <= hi
            )
        )


class _AttentionCall:
    """What every attention call shares: ``q`` (head dim last) and ``scale`` (None: SDPA's)."""

    __slots__ = ()
    q: torch.Tensor
    scale: float | None

    @property
    def softmax_scale(self) -> float:
        """``scale``, or SDPA's default ``D ** -0.5``."""
        return self.scale if self.scale is not None else self.q.shape[-1] ** -0.5


class DenseAttention(_AttentionCall):
    """``xyserve.attention``: q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]``, an optional mask
    broadcasting to ``[B, Hq, Lq, Lk]`` (bool or additive), SDPA's top-left ``is_causal``."""

    __slots__ = ("_rows", "attn_mask", "is_causal", "k", "q", "scale", "v")

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        scale: float | None,
    ) -> None:
        self.q = q
        self.k = k
        self.v = v
        self.attn_mask = attn_mask
        self.is_causal = is_causal
        self.scale = scale
        self._rows: DenseRows | bool | None = False  # False: not analysed yet

    @property
    def scores(self) -> int:
        """B × Lq × Lk: the score elements of one head."""
        b, _, lq, _ = self.q.shape
        return b * lq * self.k.shape[2]

    def rows(self, scan: MaskScan | None = None) -> DenseRows | None:
        """The call as rows of a token table (each sequence's queries and contiguous keys,
        causal or full), or None when its mask is anything else. Analysed once per call: the
        first checker to ask reads the mask, with its own ``scan`` if it has one."""
        if self._rows is False:
            self._rows = self._find_rows(scan)
        return self._rows

    def _find_rows(self, scan: MaskScan | None) -> DenseRows | None:
        b, _, lq, _ = self.q.shape
        lk = self.k.shape[2]
        if self.attn_mask is not None:
            return rows_from_mask(self.attn_mask, b, lq, lk, scan)
        if self.is_causal and lq != lk:
            return None  # SDPA aligns is_causal top-left; a row's queries end at its last key
        return DenseRows((lq,) * b, (lq,) * b, (0,) * b, (lk,) * b, causal=self.is_causal)

    def plan(self, rows: DenseRows, menu: AttentionMenu) -> AttentionPlan:
        """The plan of ``rows`` for a provider's menu (cached per shape class)."""
        return plan_attention(
            rows.q_len,
            rows.kv_len,
            causal=rows.causal,
            kv_heads=self.k.shape[1],
            menu=menu,
        )

    def new_output(self) -> torch.Tensor:
        """The op's output, unwritten, in its promised ``[B, Lq, Hq, Dv]`` memory layout."""
        return attention_output(self.q, self.v)


class VarlenAttention(_AttentionCall):
    """``xyserve.attention_varlen``: packed queries ``[tokens, Hq, D]`` of many sequences over
    a paged cache ``[blocks, block_size, Hkv, D]``; the lengths already read on the host."""

    __slots__ = (
        "block_table",
        "causal",
        "k_cache",
        "kv_lens",
        "out",
        "q",
        "q_lens",
        "scale",
        "tree",
        "v_cache",
        "window",
    )

    def __init__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        q_lens: Sequence[int],
        kv_lens: Sequence[int],
        block_table: torch.Tensor,
        causal: bool,
        window: int | None,
        scale: float | None,
        out: torch.Tensor | None = None,
        tree: tuple | None = None,
    ) -> None:
        self.q = q
        self.k_cache = k_cache
        self.v_cache = v_cache
        self.q_lens = tuple(q_lens)
        self.kv_lens = tuple(kv_lens)
        self.block_table = block_table
        self.causal = causal
        self.window = window
        self.scale = scale
        # Where the caller wants the result ([tokens, Hq, Dv], checked by the caller): a kernel
        # that can write there does; the caller copies any other result into it.
        self.out = out
        # Tree verify rows, checked (``tree_masks.parse_tree_mask``): per row the ancestor
        # bits of its queries, or None; None when no row is a tree.
        self.tree = tree

    @property
    def block_size(self) -> int:
        return self.k_cache.shape[1]

    def plan(self, menu: AttentionMenu) -> AttentionPlan:
        """The plan of this call's rows for a provider's menu (cached per shape class)."""
        return plan_attention(
            self.q_lens,
            self.kv_lens,
            causal=self.causal,
            window=self.window,
            kv_heads=self.k_cache.shape[2],
            menu=menu,
            tree=self.tree,
        )


class PackedAttention(_AttentionCall):
    """``xyserve.attention_packed``: q ``[tokens, Hq, D]``, k/v ``[tokens, Hkv, D]`` of packed
    sequences, each attending to its own tokens; lengths and starts already read on the host."""

    __slots__ = ("causal", "k", "lens", "q", "scale", "starts", "v", "window")

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lens: Sequence[int],
        starts: Sequence[int],
        causal: bool,
        window: int | None,
        scale: float | None,
    ) -> None:
        self.q = q
        self.k = k
        self.v = v
        self.lens = tuple(lens)
        self.starts = tuple(starts)
        self.causal = causal
        self.window = window
        self.scale = scale

    def plan(self, menu: AttentionMenu) -> AttentionPlan:
        """The plan of these rows (queries and keys the same tokens) for a provider's menu."""
        return plan_attention(
            self.lens,
            self.lens,
            causal=self.causal,
            window=self.window,
            kv_heads=self.k.shape[1],
            menu=menu,
        )
