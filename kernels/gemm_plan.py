"""SmoothGEMM planning: a fixed tile menu per provider, and which tile serves which M.

In an LLM's linear layers only M (the number of tokens) changes from call to call; N and K are
model constants. So a provider offers a small menu of GEMM tiles, compiled ahead of time, and
every M is served by one of them with M padded *virtually*: the last row tile is masked on load
and store, never copied into a padded tensor (XY-Serve, arXiv 2412.18106, "SmoothGEMM").

For one (N, K) the choice depends on M only through ``ceil(M / block_m)`` of each tile, so the
range 1…``max_tokens`` falls into a few buckets of M with one tile each. ``plan_gemm`` computes
them once per (provider, N, K, dtype, max_tokens) and caches the plan; at run time serving an M
is a binary search over the bucket bounds (``GemmPlan.tile_for``), never a compile or a guard.

The cost model (``tile_cost``) is deliberately simple and explicit:

- rows wasted by padding: a tile computes ``block_m`` rows whatever M is;
- wave quantisation: ``ceil(tiles / workers)`` waves, each as long as one tile;
- per-tile efficiency: a tile's time is the larger of its compute (``2·bm·bn·K`` flops at the
  tile's fraction of one worker's peak) and its traffic (``(bm + bn)·K`` elements read).

Each provider offers its menu (``Provider.gemm_menu``, written in the provider's module); the
per-worker rates and efficiencies in it are priors from the devices' data sheets, not
measurements; ``benchmarks/gemm.py`` is where they get checked.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Bucket",
    "GemmMenu",
    "GemmPlan",
    "GemmTile",
    "plan_for",
    "plan_gemm",
    "rows_of",
    "tile_cost",
]


DEFAULT_MAX_TOKENS = 8192
"""The default of the ``max_tokens`` option (``XyConfig.max_tokens``), written once: the largest
M the tile plans cover; the ops use it when called without one."""


@dataclass(frozen=True)
class GemmTile:
    """One menu entry: a GEMM kernel with fixed block sizes, compiled before serving."""

    block_m: int
    """Rows of x (tokens) per tile; M is padded virtually up to a multiple of it."""
    block_n: int
    """Output features per tile."""
    block_k: int
    """Reduction step: K is walked in slices of this many."""
    num_warps: int = 4
    """Triton launch option."""
    num_stages: int = 3
    """Triton software-pipelining depth (shared-memory buffers per operand)."""
    efficiency: float = 1.0
    """Fraction of a worker's peak flop rate this tile shape reaches (cost-model prior)."""

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}k{self.block_k}"

    def smem_bytes(self, elem_bytes: int) -> int:
        """Shared memory the pipelined operand buffers take."""
        return (self.block_m + self.block_n) * self.block_k * elem_bytes * self.num_stages


@dataclass(frozen=True)
class GemmMenu:
    """A provider's tiles and the machine numbers the cost model needs."""

    provider: str
    """The provider that runs these tiles (``triton``); matches ``Provider.name``."""
    tiles: tuple[GemmTile, ...]
    """The menu; empty for a library that picks its own blocking (ATen)."""
    workers: int
    """Tiles that run at once (streaming multiprocessors; CPU cores)."""
    flops_per_worker: float
    """Peak multiply-add rate of one worker, flop/s, for 16-bit operands."""
    bytes_per_worker: float
    """Operand traffic one worker sustains, bytes/s (L2 included)."""
    smem_limit: int = 0
    """Shared memory per worker in bytes; tiles whose buffers do not fit are skipped (0: any)."""


def tile_cost(menu: GemmMenu, tile: GemmTile, m: int, n: int, k: int, elem_bytes: int) -> float:
    """Estimated seconds for ``tile`` to compute an ``[m, k] @ [k, n]`` product."""
    tiles = math.ceil(m / tile.block_m) * math.ceil(n / tile.block_n)
    waves = math.ceil(tiles / menu.workers)
    compute = 2 * tile.block_m * tile.block_n * k / (menu.flops_per_worker * tile.efficiency)
    traffic = (tile.block_m + tile.block_n) * k * elem_bytes / menu.bytes_per_worker
    return waves * max(compute, traffic)


@dataclass(frozen=True)
class Bucket:
    """Every M in ``lo..hi`` (inclusive) is served by ``tile``."""

    lo: int
    hi: int
    tile: GemmTile | None
    """None: the provider's library kernel (no menu)."""


@dataclass(frozen=True)
class GemmPlan:
    """Which tile serves which M, for one provider, (N, K) and dtype."""

    provider: str
    n: int
    k: int
    dtype: torch.dtype
    max_tokens: int
    """Largest M the buckets cover; a larger M goes to the fallback (ATen)."""
    buckets: tuple[Bucket, ...]
    """Contiguous, in order, from 1 to ``max_tokens``."""

    def tile_for(self, m: int) -> GemmTile | None:
        """The tile that serves ``m`` rows (1 <= m <= max_tokens)."""
        if not 1 <= m <= self.max_tokens:
            raise ValueError(f"plan for M in 1..{self.max_tokens}: got M={m}")
        return self.buckets[bisect.bisect_right(self._starts, m) - 1].tile

    def covers(self, m: int) -> bool:
        return 1 <= m <= self.max_tokens

    @functools.cached_property
    def _starts(self) -> list[int]:
        return [b.lo for b in self.buckets]

    def tiles(self) -> tuple[GemmTile, ...]:
        """The menu entries this plan uses (what must be compiled before serving)."""
        return tuple(dict.fromkeys(b.tile for b in self.buckets if b.tile is not None))

    def __str__(self) -> str:
        head = (
            f"gemm plan [{self.provider}] N={self.n} K={self.k} {str(self.dtype).split('.')[-1]}"
            f", M 1..{self.max_tokens} (above: ATen fallback)"
        )
        lines = [head, f"  {'M':>13}  tile            most rows padded"]
        for b in self.buckets:
            if b.tile is None:
                lines.append(f"  {b.lo:>6}..{b.hi:<6}  library kernel  0")
                continue
            bm = b.tile.block_m
            waste = bm - 1 if b.hi - b.lo + 1 >= bm else max(-m % bm for m in range(b.lo, b.hi + 1))
            lines.append(f"  {b.lo:>6}..{b.hi:<6}  {b.tile.name:<14}  {waste}")
        return "\n".join(lines)


def _fits(menu: GemmMenu, tile: GemmTile, elem_bytes: int) -> bool:
    return not menu.smem_limit or tile.smem_bytes(elem_bytes) <= menu.smem_limit


@functools.lru_cache(maxsize=256)
def _plan(menu: GemmMenu, n: int, k: int, dtype: torch.dtype, max_tokens: int) -> GemmPlan:
    elem = torch.empty((), dtype=dtype).element_size()
    tiles = [t for t in menu.tiles if _fits(menu, t, elem)]
    if not tiles:
        return GemmPlan(menu.provider, n, k, dtype, max_tokens, (Bucket(1, max_tokens, None),))
    # Every tile's cost is constant between consecutive multiples of its block_m, so the best
    # tile can only change at M = j * block_m + 1: evaluating there covers every M exactly.
    starts = sorted(
        {1} | {j * t.block_m + 1 for t in tiles for j in range(1, max_tokens // t.block_m + 1)}
    )
    starts = [s for s in starts if s <= max_tokens]
    buckets: list[Bucket] = []
    for i, lo in enumerate(starts):
        hi = starts[i + 1] - 1 if i + 1 < len(starts) else max_tokens
        best = min(tiles, key=lambda t, m=hi: (tile_cost(menu, t, m, n, k, elem), -t.block_m))
        if buckets and buckets[-1].tile == best:
            buckets[-1] = Bucket(buckets[-1].lo, hi, best)
        else:
            buckets.append(Bucket(lo, hi, best))
    return GemmPlan(menu.provider, n, k, dtype, max_tokens, tuple(buckets))


def plan_gemm(n: int, k: int, *, menu: GemmMenu, dtype: torch.dtype, max_tokens: int) -> GemmPlan:
    """The tile plan for ``x [M, k] @ weight [n, k]ᵀ`` over M = 1…``max_tokens`` with the tiles
    of ``menu``.

    Cached: the same arguments return the same plan object; ``print`` shows which tile serves
    which M.
    """
    for name, value in (("n", n), ("k", k), ("max_tokens", max_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"plan_gemm: {name} must be a positive int, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"plan_gemm: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not isinstance(menu, GemmMenu):
        raise ValueError(f"plan_gemm: menu must be a GemmMenu, got {type(menu).__name__}")
    return _plan(menu, n, k, dtype, max_tokens)


_served: dict[tuple, GemmPlan] = {}


def plan_for(menu: GemmMenu, n: int, k: int, dtype: torch.dtype, max_tokens: int) -> GemmPlan:
    """``plan_gemm`` for the serving path: after the first call per (menu, N, K, dtype,
    max_tokens) one dict lookup, cheaper than the validated, keyword-argument entry point."""
    key = (menu, n, k, dtype, max_tokens)
    plan = _served.get(key)
    if plan is None:
        plan = _served[key] = plan_gemm(n, k, menu=menu, dtype=dtype, max_tokens=max_tokens)
    return plan


def rows_of(x: torch.Tensor) -> int:
    """M of a GEMM input ``[..., K]``: the product of its leading sizes."""
    m = 1
    for s in x.shape[:-1]:
        m *= s
    return m
