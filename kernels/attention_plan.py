"""Meta-attention planning: token table -> query tiles -> task table (plan on the host, run many).

Every attention call, whatever stages it mixes (prefill, decode, chunked prefill, prefix-cached
prefill, speculative verify), is described by a *token table*: one row per sequence with the
offset of its queries in the packed query tensor, its query count and its KV length. Query ``i``
of a row sits at KV position ``kv_len - q_len + i`` (the row's queries are its last tokens), so a
decode row is ``q_len = 1``, a chunked or prefix-cached prefill has ``kv_len > q_len``, and a plain
prefill has ``kv_len == q_len`` (XY-Serve, arXiv 2412.18106, section "meta-attention").

Each row is cut into query tiles of a size picked per row from the provider's menu (small for
decode and short verify rows, large for prefill), and its keys into chunks of ``kv_chunk``. A
(query tile, key chunk) pair is one *tile* of the one QK -> softmax -> SV primitive. A tile that
the mask hides entirely is never scheduled: keys after the last query (causal), keys older than
the window (sliding window), keys past the row's length (padding). Chunks of one query tile are
merged with a log-sum-exp update, so long KV splits across workers.

The *task table* repeats the tiles over KV heads, sorts them by estimated load (query rows ×
visible keys) and deals them to the provider's workers in symmetric round-robin (1, 2, …, W, W,
…, 2, 1), which evens out the loads.

Plans are cached per *shape class*: a decode row's plan does not depend on its exact KV length
but only on its number of chunks, so consecutive decode steps reuse one plan and pass their
lengths at run time (``AttentionPlan.check`` refuses lengths the plan does not fit). What a
provider derives from a plan (its task table on a device) is kept in the plan's ``cache``, so it
too is built once per shape class and shared by every layer of a step.

Dense ``[B, H, Lq, Lk]`` calls become token tables through ``rows_from_mask``: a mask that is
rows of padding (each query sees a contiguous key range, causally or fully) gives the rows.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from xy_inductor.kernels.tree_masks import as_int64

__all__ = [
    "AttentionMenu",
    "AttentionPlan",
    "DenseRows",
    "TokenTable",
    "choose_q_tile",
    "plan_attention",
    "plans_built",
    "rows_from_mask",
    "symmetric_round_robin",
]


@dataclass(frozen=True)
class AttentionMenu:
    """What a provider's attention kernel offers the planner."""

    q_tiles: tuple[int, ...]
    """Query tile sizes, ascending; a row gets the smallest that holds it, else the largest."""
    kv_chunk: int
    """Keys per tile; longer KV is split into chunks and merged (log-sum-exp)."""
    workers: int
    """Tasks that run at once (CPU threads, GPU SMs)."""


def choose_q_tile(q_len: int, q_tiles: Sequence[int]) -> int:
    """The smallest tile that holds ``q_len`` queries, else the largest tile."""
    for tile in q_tiles:
        if q_len <= tile:
            return tile
    return q_tiles[-1]


@dataclass(frozen=True)
class TokenTable:
    """One row per sequence (or stage) of an attention call."""

    q_start: tuple[int, ...]
    """Offset of the row's first query in the packed query tensor."""
    q_len: tuple[int, ...]
    kv_len: tuple[int, ...]
    q_tile: tuple[int, ...]
    """Query tile size chosen for the row."""

    @classmethod
    def build(
        cls,
        q_lens: Sequence[int],
        kv_lens: Sequence[int],
        q_tiles: Sequence[int],
        *,
        positional: bool = True,
    ) -> TokenTable:
        """``positional``: queries sit at key positions (causal or windowed attention), so a
        row cannot have more queries than keys."""
        if len(q_lens) != len(kv_lens):
            raise ValueError(f"q_lens has {len(q_lens)} rows but kv_lens has {len(kv_lens)}")
        for i, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
            if q < 0 or kv < 0 or (positional and kv < q):
                raise ValueError(
                    f"row {i}: expected 0 <= q_len <= kv_len (queries are the row's last "
                    f"tokens), got q_len={q}, kv_len={kv}"
                )
        starts = [0]
        for q in q_lens[:-1]:
            starts.append(starts[-1] + q)
        return cls(
            tuple(starts),
            tuple(q_lens),
            tuple(kv_lens),
            tuple(choose_q_tile(q, q_tiles) for q in q_lens),
        )

    @property
    def rows(self) -> int:
        return len(self.q_len)


def symmetric_round_robin(count: int, workers: int) -> list[int]:
    """Worker of each of ``count`` tasks sorted by decreasing load: 0, 1, …, W-1, W-1, …, 0, …"""
    out = []
    for i in range(count):
        lap, pos = divmod(i, workers)
        out.append(pos if lap % 2 == 0 else workers - 1 - pos)
    return out


@dataclass(frozen=True)
class AttentionPlan:
    """The tiles of one attention call and their task table; built by ``plan_attention``.

    Tile arrays (one entry per scheduled (query tile, key chunk)), int64 on the CPU:
    ``row``, ``q0`` (first query of the tile, within its row), ``q_tile`` (its size), ``k0``/``k1``
    (key chunk ``[k0, k1)``), ``tile_id`` (the query tile it belongs to; chunks of one query tile
    share it and are merged). Tasks repeat the tiles over KV heads: ``task_tile``,
    ``task_head``, ``task_worker``, sorted by decreasing load.
    """

    table: TokenTable
    causal: bool
    window: int | None
    menu: AttentionMenu
    kv_heads: int
    row: torch.Tensor
    q0: torch.Tensor
    q_tile: torch.Tensor
    k0: torch.Tensor
    k1: torch.Tensor
    tile_id: torch.Tensor
    query_tiles: int
    """How many query tiles (merge targets) there are."""
    split: bool
    """Whether any query tile has more than one key chunk (so results are merged)."""
    task_tile: torch.Tensor
    task_head: torch.Tensor
    task_worker: torch.Tensor
    worker_load: tuple[int, ...]
    """Estimated load (query rows × keys) dealt to each worker."""
    skipped: int
    """Tiles the mask hides entirely, never scheduled."""
    kv_class: tuple
    """The shape class of the planned KV lengths: a run must fall in the same one."""
    tree: tuple | None = None
    """Per row, the ancestor bits of its queries (``tree_masks.parse_tree_mask``), None for a
    row (or a call) that is plain causal: tree verify rows."""
    cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)
    """What providers derive from this plan (a task table on a device, the per-row arrays of
    the last run), keyed by provider and device. Plans are cached per shape class, so this is
    built once and shared by every layer of a step and every step of the class; a provider
    that keeps run-specific data here keys it by the values it was built from."""

    @property
    def tiles(self) -> int:
        return int(self.row.numel())

    def tree_tensor(self) -> torch.Tensor | None:
        """The tree rows as the kernels read them: int64 ``[tokens]``, each query's ancestor
        bits (``-1`` for plain rows), on the host; None for a plan without tree rows."""
        if self.tree is None:
            return None
        found = self.cache.get("tree tensor")
        if found is None:
            flat: list[int] = []
            for n, bits in zip(self.table.q_len, self.tree, strict=True):
                flat += [-1] * n if bits is None else as_int64(bits)
            found = self.cache["tree tensor"] = torch.tensor(flat, dtype=torch.int64)
        return found

    def check(self, q_lens: Sequence[int], kv_lens: Sequence[int]) -> None:
        """Raise if a run with these lengths does not fit this plan (FlashInfer's rule: a run
        must match its plan). A plan's tree rows are its own: executors read ``tree`` and
        ``tree_tensor()`` from the plan, never from the call."""
        if tuple(q_lens) != self.table.q_len:
            raise ValueError(
                f"attention run does not match its plan: q_lens {tuple(q_lens)} planned as "
                f"{self.table.q_len}"
            )
        if _kv_class(q_lens, kv_lens, self.menu, self.causal, self.window) != self.kv_class:
            raise ValueError(
                f"attention run does not match its plan: kv_lens {tuple(kv_lens)} fall in "
                f"another shape class than the planned {self.table.kv_len}"
            )


def _kv_class(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    menu: AttentionMenu,
    causal: bool,
    window: int | None,
) -> tuple:
    # A row with one query and no window sees every key: only its number of chunks shapes the
    # plan. Other rows' tile skipping depends on the exact length.
    return tuple(
        ("chunks", math.ceil(kv / menu.kv_chunk)) if q == 1 and window is None else ("len", kv)
        for q, kv in zip(q_lens, kv_lens, strict=True)
    )


def _row_tiles(
    q_len: int,
    kv_len: int,
    tile: int,
    chunk: int,
    causal: bool,
    window: int | None,
    tree: tuple[int, ...] | None = None,
) -> tuple[list[tuple[int, int, int, int]], int]:
    """(q0, tile, k0, k1) of every visible tile of one row, and how many were skipped.
    ``tree``: the ancestor bits of the row's queries (a tree verify row), or None."""
    out = []
    skipped = 0
    offset = kv_len - q_len  # KV position of the row's first query
    # Chunks are aligned to the row's queries (a boundary at every offset + j * chunk), so with
    # chunk == tile the causal diagonal falls inside single tiles; the first chunk may be short.
    # A one-query row (decode) has no diagonal to align: its chunks start at key 0, so a row
    # planned at its class's longest length gets whole chunks, not a stub of one key.
    start = offset % chunk if q_len > 1 else 0
    bounds = sorted({0, kv_len, *range(start, kv_len, chunk)})
    for q0 in range(0, q_len, tile):
        first = offset + q0
        last = offset + min(q0 + tile, q_len) - 1
        # The row's own tokens (keys from ``offset``) that some query of the tile sees.
        seen = -1 if tree is None else functools.reduce(int.__or__, tree[q0 : q0 + tile])
        for k0, k1 in itertools.pairwise(bounds):
            hidden = (causal and k0 > last) or (window is not None and k1 - 1 <= first - window)
            if not hidden and tree is not None and k0 >= offset:
                hidden = (seen >> (k0 - offset)) & ((1 << (k1 - k0)) - 1) == 0
            if hidden:
                skipped += 1
            else:
                out.append((q0, tile, k0, k1))
    return out, skipped


@functools.lru_cache(maxsize=512)
def _plan(
    q_lens: tuple[int, ...],
    kv_class: tuple,
    kv_lens: tuple[int, ...],
    causal: bool,
    window: int | None,
    kv_heads: int,
    menu: AttentionMenu,
    tree: tuple | None,
) -> AttentionPlan:
    return _build_plan(q_lens, kv_lens, causal, window, kv_heads, menu, tree)


def _build_plan(
    q_lens: tuple[int, ...],
    kv_lens: tuple[int, ...],
    causal: bool,
    window: int | None,
    kv_heads: int,
    menu: AttentionMenu,
    tree: tuple | None = None,
) -> AttentionPlan:
    table = TokenTable.build(q_lens, kv_lens, menu.q_tiles, positional=causal or window is not None)
    rows, q0s, tiles, k0s, k1s, ids = [], [], [], [], [], []
    skipped = 0
    query_tiles = 0
    split = False
    for r in range(table.rows):
        found, hidden = _row_tiles(
            q_lens[r],
            kv_lens[r],
            table.q_tile[r],
            menu.kv_chunk,
            causal,
            window,
            None if tree is None else tree[r],
        )
        skipped += hidden
        per_q0: dict[int, int] = {}
        for q0, tile, k0, k1 in found:
            if q0 not in per_q0:
                per_q0[q0] = query_tiles
                query_tiles += 1
            else:
                split = True
            rows.append(r)
            q0s.append(q0)
            tiles.append(tile)
            k0s.append(k0)
            k1s.append(k1)
            ids.append(per_q0[q0])
    # Task table: tiles × KV heads, heaviest first, dealt symmetrically.
    loads = [
        min(t, q_lens[r] - q0) * (k1 - k0)
        for r, q0, t, k0, k1 in zip(rows, q0s, tiles, k0s, k1s, strict=True)
    ]
    order = sorted(
        ((loads[i], i, h) for i in range(len(rows)) for h in range(kv_heads)),
        key=lambda x: -x[0],
    )
    workers = symmetric_round_robin(len(order), menu.workers)
    worker_load = [0] * menu.workers
    for (load, _, _), w in zip(order, workers, strict=True):
        worker_load[w] += load
    i64 = functools.partial(torch.tensor, dtype=torch.int64)
    return AttentionPlan(
        table=table,
        causal=causal,
        window=window,
        menu=menu,
        kv_heads=kv_heads,
        row=i64(rows),
        q0=i64(q0s),
        q_tile=i64(tiles),
        k0=i64(k0s),
        k1=i64(k1s),
        tile_id=i64(ids),
        query_tiles=query_tiles,
        split=split,
        task_tile=i64([i for _, i, _ in order]),
        task_head=i64([h for _, _, h in order]),
        task_worker=i64(workers),
        worker_load=tuple(worker_load),
        skipped=skipped,
        kv_class=_kv_class(q_lens, kv_lens, menu, causal, window),
        tree=tree,
    )


def plans_built() -> int:
    """Plans built in this process so far (calls that missed the per-class cache); the runtime
    reports it in ``stats().attention_plans``."""
    return _plan.cache_info().misses


def plan_attention(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    *,
    causal: bool,
    window: int | None = None,
    kv_heads: int = 1,
    menu: AttentionMenu,
    tree: tuple | None = None,
) -> AttentionPlan:
    """Plan an attention call over rows with these query and KV lengths, for the tile menu of
    the provider that will run it.

    ``window``: a query at position p sees keys p - window < j <= p (Mistral's sliding window);
    None for no window. ``tree``: per row, the ancestor bits of its queries or None
    (``tree_masks.parse_tree_mask``; causal only); None when no row is a tree. Cached per shape
    class: consecutive decode steps get the same plan.
    """
    q_lens, kv_lens = tuple(int(q) for q in q_lens), tuple(int(k) for k in kv_lens)
    if window is not None and window < 1:
        raise ValueError(f"plan_attention: window must be a positive int or None, got {window}")
    if kv_heads < 1:
        raise ValueError(f"plan_attention: kv_heads must be >= 1, got {kv_heads}")
    if tree is not None and (not causal or len(tree) != len(q_lens)):
        raise ValueError("plan_attention: tree rows need causal attention and one entry per row")
    if tree is not None and all(t is None for t in tree):
        tree = None
    kv_class = _kv_class(q_lens, kv_lens, menu, causal, window)
    # Rows planned by chunk count are planned at their longest length in the class, so a later
    # step's longer (same-class) KV is covered; the kernel masks keys past each real length.
    planned = tuple(
        c[1] * menu.kv_chunk if c[0] == "chunks" else kv
        for kv, c in zip(kv_lens, kv_class, strict=True)
    )
    return _plan(q_lens, kv_class, planned, causal, window, kv_heads, menu, tree)


@dataclass(frozen=True)
class DenseRows:
    """The rows of a dense ``[B, H, Lq, Lk]`` attention call, recognised from its mask."""

    q_end: tuple[int, ...]
    """Row r's queries are the query slots ``q_end[r] - q_len[r] : q_end[r]``."""
    q_len: tuple[int, ...]
    kv_start: tuple[int, ...]
    """Row r's keys are the key slots ``kv_start[r] : kv_start[r] + kv_len[r]``."""
    kv_len: tuple[int, ...]
    causal: bool


def rows_from_mask(
    mask: torch.Tensor,
    batch: int,
    lq: int,
    lk: int,
    scan: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> DenseRows | None:
    """The rows a dense mask describes, if it is exactly "each row's queries see a contiguous
    range of keys, causally (the queries are the range's last tokens) or fully", as left- or
    right-padded batches and static caches make; None for any other mask (sliding windows,
    bidirectional blocks, per-head biases), which then runs as one dense call.

    ``mask`` is ``[B or 1, 1, Lq, Lk]``: bool (True = attend) or additive with only 0 and -inf.
    ``scan``: a provider's one-pass reading of the mask into per-query stats (the CPU
    provider's ``mask_row_stats``: int32 ``[Bm, Lq, 3]``, the first and last key each query sees
    and how many, a count of -1 where an additive value is neither 0 nor -inf), or None when it
    cannot read this mask; without one, a few ATen passes over the mask. Never cached on the
    tensor: its contents can change without its version counter moving (``.data`` writes,
    NumPy views, custom kernels, CUDA-graph replays).
    """
    if mask.dim() != 4 or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (lq, lk):
        return None
    if mask.shape[0] not in (1, batch):
        return None
    stats = scan(mask) if scan is not None else None
    if stats is not None:
        return _rows_from_stats(stats, batch, lq)
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    else:
        allowed = mask[:, 0] == 0
        if not bool((allowed | (mask[:, 0] == float("-inf"))).all()):
            return None
    allowed = allowed.expand(batch, lq, lk)
    q_any = allowed.any(dim=-1)  # [B, Lq]
    q_len = q_any.sum(dim=-1)
    # The last query slot that sees anything, + 1 (0 for a row that sees nothing).
    q_end = torch.where(q_len > 0, lq - q_any.flip(-1).int().argmax(dim=-1), 0)
    last = allowed[torch.arange(batch), (q_end - 1).clamp_min(0)]  # [B, Lk]: keys of the last query
    kv_len = torch.where(q_len > 0, last.sum(dim=-1), 0)
    kv_start = torch.where(kv_len > 0, last.int().argmax(dim=-1), 0)
    qi = torch.arange(lq)[None, :] - (q_end - q_len)[:, None]  # index of the query in its row
    kj = torch.arange(lk)[None, :] - kv_start[:, None]  # index of the key in its row
    inside = ((qi >= 0) & (qi < q_len[:, None]))[:, :, None] & ((kj >= 0) & (kj < kv_len[:, None]))[
        :, None, :
    ]
    rows = tuple(tuple(int(x) for x in t.tolist()) for t in (q_end, q_len, kv_start, kv_len))
    causal = inside & (kj[:, None, :] <= (kv_len - q_len)[:, None, None] + qi[:, :, None])
    if bool((q_len <= kv_len).all()) and torch.equal(causal, allowed):
        return DenseRows(*rows, causal=True)
    if torch.equal(inside, allowed):
        return DenseRows(*rows, causal=False)
    return None


def _rows_from_stats(stats: torch.Tensor, batch: int, lq: int) -> DenseRows | None:
    """``rows_from_mask``'s decision from per-query stats (first key, last key, count)."""
    if bool((stats[..., 2] < 0).any()):
        return None  # an additive value other than 0 and -inf
    first, last, count = stats.long().expand(batch, lq, 3).unbind(-1)  # [B, Lq] each
    has = count > 0
    q_len = has.sum(-1)
    # The last query slot that sees anything, + 1 (0 for a row that sees nothing).
    q_end = torch.where(q_len > 0, lq - has.flip(-1).int().argmax(-1), 0)
    qi = torch.arange(lq)[None, :] - (q_end - q_len)[:, None]  # index of the query in its row
    in_row = (qi >= 0) & (qi < q_len[:, None])
    if not torch.equal(has, in_row):
        return None  # the queries that see keys are not one run
    at_last = (q_end - 1).clamp_min(0)[:, None]
    kv_len = torch.where(q_len > 0, count.gather(1, at_last)[:, 0], 0)
    kv_start = torch.where(kv_len > 0, first.gather(1, at_last)[:, 0], 0)
    # Every query of a row sees one run of keys (no holes), starting at the row's first key.
    if not bool(((last - first + 1 == count) & (first == kv_start[:, None]) | ~has).all()):
        return None
    rows = tuple(tuple(int(x) for x in t.tolist()) for t in (q_end, q_len, kv_start, kv_len))
    causal_count = (kv_len - q_len)[:, None] + qi + 1
    if bool((q_len <= kv_len).all()) and bool(((count == causal_count) | ~in_row).all()):
        return DenseRows(*rows, causal=True)
    if bool(((count == kv_len[:, None]) | ~in_row).all()):
        return DenseRows(*rows, causal=False)
    return None
