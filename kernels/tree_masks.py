"""Tree verify rows: which of its own tokens each query of a row sees.

Speculative decoding with a *tree* of drafts (Medusa, EAGLE, SpecInfer) verifies every branch in
one forward pass: the row's queries are the last verified token (the root) followed by the draft
tokens, written into the cache as the row's last keys, and a draft token must see the cached
prefix and its own ancestors only, never a sibling branch. ``xyserve.attention_varlen`` takes
that as a per-token **ancestor bitmask** (int64, FlashInfer's custom masks and vLLM's former
``TREE_ATTN`` bias carry the same information): for query ``i`` of a row, bit ``j`` set means
it sees the row's ``j``-th query token. The rule, with causal attention:

- a query sees every cached key before its row's queries (and the window still applies);
- among the row's own tokens it sees token ``j <= i`` exactly when bit ``j`` is set; bit ``i``
  (itself) must be set, bits above ``i`` must not (ancestors come before descendants);
- ``-1`` (every bit) is the plain causal row: prefill chunks, decodes and chain verify rows
  of the same step say ``-1``, and a row of more than 64 queries must be ``-1`` throughout.

A mask is the *refinement* of causal attention: it only hides keys, so a plan made for the
causal rows covers every visible key, and the planner additionally skips a key chunk that no
query of a tile sees (``attention_plan``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "MAX_TREE",
    "as_int64",
    "parse_tree_mask",
    "tree_mask_from_parents",
    "tree_mask_from_paths",
    "tree_visible",
]

MAX_TREE = 64
"""The most tokens a tree row can have: one bit per token of an int64."""

_ALL = (1 << 64) - 1


def _causal_bits(i: int) -> int:
    return (1 << (i + 1)) - 1


def parse_tree_mask(
    tree_mask: torch.Tensor | Sequence[int],
    q_lens: Sequence[int],
    where: str,
    *,
    causal: bool = True,
) -> tuple[tuple[int, ...] | None, ...] | None:
    """Check ``tree_mask`` (int64 ``[tokens]``, host or device: one read) against the rows'
    query counts and the call's causality (tree rows refine causal attention). Returns, per
    row, the ancestor bits of each query (unsigned, only bits ``<= i``) or None for a plain
    causal row; None when no row is a tree. Raises ``ValueError`` naming the token and the rule
    it breaks."""
    if not causal:
        raise ValueError(f"{where}: tree_mask needs causal=True")
    if isinstance(tree_mask, torch.Tensor):
        if tree_mask.dim() != 1 or tree_mask.dtype != torch.int64:
            raise ValueError(
                f"{where}: tree_mask must be a 1-D int64 tensor (an ancestor bitmask per query "
                f"token), got {tree_mask.dim()}-D {tree_mask.dtype}"
            )
        values = tree_mask.tolist()
    else:
        values = [int(m) for m in tree_mask]
    tokens = sum(q_lens)
    if len(values) != tokens:
        raise ValueError(
            f"{where}: tree_mask has {len(values)} entries; expected one per query token ({tokens})"
        )
    rows: list[tuple[int, ...] | None] = []
    start = 0
    for r, n in enumerate(q_lens):
        masks = values[start : start + n]
        if all(m == -1 for m in masks):
            rows.append(None)
        elif n > MAX_TREE:
            raise ValueError(
                f"{where}: row {r} has {n} queries, more than a tree row's {MAX_TREE}; its "
                "tree_mask entries must all be -1 (plain causal)"
            )
        else:
            bits = []
            for i, m in enumerate(masks):
                u = _causal_bits(i) if m == -1 else m & _ALL
                if not (u >> i) & 1 or u >> (i + 1):
                    raise ValueError(
                        f"{where}: tree_mask[{start + i}] (row {r}, query {i}) is {m:#x}; a "
                        f"query must see itself (bit {i}) and no later token of its row (bits "
                        f"above {i}), or be -1"
                    )
                bits.append(u)
            causal = all(u == _causal_bits(i) for i, u in enumerate(bits))
            rows.append(None if causal else tuple(bits))
        start += n
    return None if all(r is None for r in rows) else tuple(rows)


def as_int64(bits: Sequence[int]) -> list[int]:
    """Unsigned 64-bit masks as the int64 values a tensor holds (bit 63 is the sign)."""
    return [b - (b >> 63 << 64) for b in bits]


def tree_visible(bits: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Whether each query sees each key by its tree mask: ``bits`` (int64 ancestor bits per
    query, ``-1`` for a plain query) broadcast against ``rel`` (key position minus the position
    of the row's first query; keys before the row's queries are its cached context, always
    seen). Causality and the window are the caller's."""
    return (rel < 0) | ((bits >> rel.clamp(0, 63)) & 1 == 1)


def tree_mask_from_parents(parents: Sequence[int]) -> list[int]:
    """The ancestor masks of a tree row given each token's parent (``-1`` for a root, else an
    earlier token of the row): token ``i`` sees itself and its ancestors."""
    masks: list[int] = []
    for i, p in enumerate(parents):
        if p == -1:
            masks.append(1 << i)
        elif 0 <= p < i:
            masks.append(masks[p] | (1 << i))
        else:
            raise ValueError(
                f"tree_mask_from_parents: token {i} has parent {p}; expected -1 or an earlier "
                f"token (0 … {i - 1})"
            )
    return as_int64(masks)


def tree_mask_from_paths(paths: Sequence[Sequence[int]]) -> list[int]:
    """The masks of a verify row laid out as vLLM's ``speculative_token_tree`` lays out its
    drafts: token 0 is the root (the last verified token), then one token per path in the
    given order, a path being the child indices from the root (``(0,)``, ``(1,)``,
    ``(0, 0)``…). A path's parent (the path without its last index) must come before it."""
    index = {(): 0}
    parents = [-1]
    for n, path in enumerate(paths, start=1):
        path = tuple(path)
        if not path or path in index:
            raise ValueError(f"tree_mask_from_paths: path {path} is empty or repeated")
        parent = index.get(path[:-1])
        if parent is None:
            raise ValueError(f"tree_mask_from_paths: path {path} comes before its parent")
        index[path] = n
        parents.append(parent)
    return tree_mask_from_parents(parents)
