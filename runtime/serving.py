"""One serving step of ``attention_varlen``: the token table read once, run by every layer.

A serving engine (vLLM's attention metadata builder, ``xy_inductor.vllm``) has each step's
lengths on the host already. It builds one ``VarlenStep`` per step from them; every attention
layer of the step then calls ``step.run(q, k_cache, v_cache, ...)``. That is FlashInfer's
``plan()``/``run()`` split applied to the provider registry:

- the step checks the token table once (lengths, block table) and never reads a length from
  the device again;
- the first layer's run asks the providers, in priority order, as ``xyserve.attention_varlen``
  does: the accepting checker plans the token table for its tile menu (token table → task
  table, cached per shape class) and returns its decision;
- every later layer of the step whose tensors have the same signature (dtype, device, shapes,
  strides, window) runs that decision directly: no device→host copy, no checker, no planning.

A provider's decision for ``attention_varlen`` depends on the call's lengths and on its
tensors' dtype, device, shapes, strides and alignment, never on their values, which is why a
decision can be shared by layers with the same signature. A run that does not match the step
(another token count, a block table too narrow for a row, a block id that is not a block of
the cache) raises, naming the argument.

``SlotWrites`` is the other half of a step: where its new keys and values go in a layer's
paged cache, worked out once per step; a negative slot is padding and is not written.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence

import torch

from xy_inductor.kernels.calls import VarlenAttention
from xy_inductor.kernels.contract import Accept, OpKernel, Provider
from xy_inductor.kernels.tree_masks import (
    parse_tree_mask,
    tree_mask_from_parents,
    tree_mask_from_paths,
)
from xy_inductor.runtime import counters, providers

__all__ = [
    "SlotWrites",
    "VarlenStep",
    "check_block_ids",
    "row_kinds",
    "tree_mask_from_parents",
    "tree_mask_from_paths",
]

_OP = "attention_varlen"


def _tensor_key(t: torch.Tensor) -> tuple:
    # Paid by every layer of a step: no device here (a torch.device per tensor costs as much as
    # the rest); the key holds q's, and a kernel handed a tensor on another device raises.
    return (t.dtype, t.shape, t.stride(), t.data_ptr() % 16)


def check_block_ids(
    block_table: torch.Tensor,
    kv_lens: Sequence[int],
    block_size: int,
    num_blocks: int,
    where: str,
) -> None:
    """Raise unless every block holding a row's keys, ``block_table[r, :ceil(kv_lens[r] /
    block_size)]``, names a block of the cache (``[0, num_blocks)``).

    Those are the blocks a provider may read: a windowed row or one without queries may still
    touch them (Triton walks whole key chunks, the plan executor gathers key 0 for masked slots,
    FIA does not document what it reads), so all of them are checked; entries past them (vLLM
    pads its table) are never read and never checked. Without this a negative id wraps around
    on the CPU (another block's keys, silently) and reads outside the cache on a GPU. The caller
    has checked that ``block_table`` is wide enough for every row. One vectorised test, one
    device-to-host read of its answer."""
    need = [-(-m // block_size) for m in kv_lens]
    width = max(need, default=0)
    if width == 0:
        return
    device = block_table.device
    # int64: an int32 table compared with a count of blocks past 2**31 would wrap.
    ids = block_table[:, :width].long()
    used = torch.arange(width, device=device) < torch.tensor(need, device=device)[:, None]
    bad = used & ((ids < 0) | (ids >= num_blocks))
    if not bool(bad.any()):
        return
    r, j = bad.nonzero()[0].tolist()
    raise ValueError(
        f"{where}: block_table[{r}, {j}] = {int(ids[r, j])} is not a block of the cache; "
        f"expected ids in [0, {num_blocks}) for the {need[r]} blocks holding row {r}'s "
        f"{kv_lens[r]} keys"
    )


def row_kinds(
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    verify_max_q: int | None = None,
    tree: tuple | None = None,
) -> Counter:
    """How many rows of a step are of each kind, from their lengths: ``prefill`` (every key is
    a query: nothing cached), ``decode`` (one query after cached keys), ``verify`` (2 to
    ``verify_max_q`` queries after cached keys: in an engine running speculative decoding with
    k drafts, ``verify_max_q = k + 1``, the rows vLLM itself treats as decodes), ``chunk``
    (other queries after cached keys: a later prefill chunk or a prefix-cache hit), ``tree``
    (a row with a tree mask, ``tree_masks.parse_tree_mask``). Rows without queries are not
    counted."""
    kinds: Counter = Counter()
    for r, (q, kv) in enumerate(zip(q_lens, kv_lens, strict=True)):
        if q == 0:
            continue
        if tree is not None and tree[r] is not None:
            kinds["tree"] += 1
        elif q >= kv:
            kinds["prefill"] += 1
        elif q == 1:
            kinds["decode"] += 1
        elif verify_max_q is not None and q <= verify_max_q:
            kinds["verify"] += 1
        else:
            kinds["chunk"] += 1
    return kinds


class VarlenStep:
    """The token table of one serving step, for every attention layer of the step.

    ``q_lens[r]`` queries of row r are the last tokens of its ``kv_lens[r]`` keys; the packed
    query tensor holds the rows in order. ``block_table[r, j]`` names the cache block of row
    r's keys ``j * block_size …`` (``[rows, max_blocks]`` integer tensor on the cache's
    device). ``causal``: a query sees the keys up to its own position (decoder attention).
    """

    __slots__ = (
        "_decisions",
        "block_table",
        "causal",
        "kv_lens",
        "max_kv_len",
        "q_lens",
        "row_kinds",
        "tokens",
        "tree",
    )

    def __init__(
        self,
        q_lens: Sequence[int],
        kv_lens: Sequence[int],
        block_table: torch.Tensor,
        *,
        causal: bool = True,
        verify_max_q: int | None = None,
        tree_mask: torch.Tensor | Sequence[int] | None = None,
    ) -> None:
        where = "VarlenStep"
        self.q_lens = tuple(int(n) for n in q_lens)
        self.kv_lens = tuple(int(n) for n in kv_lens)
        if len(self.q_lens) != len(self.kv_lens):
            raise ValueError(
                f"{where}: q_lens has {len(self.q_lens)} rows but kv_lens has {len(self.kv_lens)}"
            )
        if block_table.dim() != 2 or block_table.dtype.is_floating_point:
            raise ValueError(
                f"{where}: block_table must be a 2-D integer tensor, got {block_table.dim()}-D "
                f"{block_table.dtype}"
            )
        if block_table.shape[0] != len(self.q_lens):
            raise ValueError(
                f"{where}: block_table has {block_table.shape[0]} rows for "
                f"{len(self.q_lens)} sequences"
            )
        for r, (n, m) in enumerate(zip(self.q_lens, self.kv_lens, strict=True)):
            if n < 0 or m < 0 or (causal and n > m):
                raise ValueError(
                    f"{where}: row {r} has {n} queries and kv_len {m}; expected 0 <= queries"
                    + (" <= kv_len (they are the row's last tokens)" if causal else " and kv_len")
                )
        # Tree verify rows: checked once per step, the same for every layer.
        self.tree = (
            None
            if tree_mask is None
            else parse_tree_mask(tree_mask, self.q_lens, where, causal=causal)
        )
        self.block_table = block_table
        self.causal = bool(causal)
        self.tokens = sum(self.q_lens)
        self.max_kv_len = max(self.kv_lens, default=0)
        # Signature of a layer's tensors -> (the provider list, the chosen provider's name, its
        # kernel, its checker's decision).
        self._decisions: dict[tuple, tuple[tuple[Provider, ...], str, OpKernel, Accept]] = {}
        self.row_kinds = row_kinds(self.q_lens, self.kv_lens, verify_max_q, self.tree)
        counters.record_varlen_step(self.row_kinds)

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens_q: Sequence[int] | torch.Tensor,
        kv_lens: Sequence[int] | torch.Tensor,
        block_table: torch.Tensor,
        *,
        causal: bool = True,
        verify_max_q: int | None = None,
        tree_mask: torch.Tensor | Sequence[int] | None = None,
    ) -> VarlenStep:
        """The step from packed query offsets (``rows + 1`` entries rising from 0) and KV
        lengths, as host tensors or lists (a device tensor here costs one copy per step)."""
        cu = cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, torch.Tensor) else list(cu_seqlens_q)
        kv = kv_lens.tolist() if isinstance(kv_lens, torch.Tensor) else list(kv_lens)
        if not cu or cu[0] != 0 or any(b < a for a, b in itertools.pairwise(cu)):
            raise ValueError(f"VarlenStep: cu_seqlens_q must rise from 0, got {cu}")
        return cls(
            [b - a for a, b in itertools.pairwise(cu)],
            kv,
            block_table,
            causal=causal,
            verify_max_q=verify_max_q,
            tree_mask=tree_mask,
        )

    @property
    def rows(self) -> int:
        return len(self.q_lens)

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        *,
        window: int | None = None,
        scale: float | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``xyserve.attention_varlen`` of this step's rows for one layer: q ``[tokens, Hq,
        D]``, caches ``[blocks, block_size, Hkv, D]`` (any strides), ``window`` as in the op.
        Returns ``[tokens, Hq, Dv]``: ``out`` when given (a buffer of that shape and q's dtype,
        written in place, as vLLM hands its layers their output)."""
        key = (
            q.device,
            _tensor_key(q),
            _tensor_key(k_cache),
            _tensor_key(v_cache),
            None if out is None else _tensor_key(out),
            window,
        )
        active = providers.active_providers()
        call = VarlenAttention(
            q, k_cache, v_cache, self.q_lens, self.kv_lens, self.block_table, self.causal,
            window, scale, out, self.tree,
        )  # fmt: skip
        entry = self._decisions.get(key)
        # The entry holds the provider list it was chosen from and is reused only for that very
        # object: an id() in the key could match a new list at a freed list's address.
        if entry is None or entry[0] is not active:
            self._check(q, k_cache, v_cache, window)
            if out is not None:
                self._check_out(q, v_cache, out)
            entry = self._decisions[key] = (active, *providers.choose(_OP, call))
            counters.record_varlen_step_check()
        _, name, kernel, accept = entry
        counters.record_call(_OP, name, accept.path)
        got = kernel.run(call, accept)
        if out is None or got is out:
            return got
        return out.copy_(got)

    @staticmethod
    def _check_out(q: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
        want = (q.shape[0], q.shape[1], v_cache.shape[-1])
        if tuple(out.shape) != want or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(
                f"VarlenStep.run: out must be {list(want)} {q.dtype} on {q.device}, got "
                f"{list(out.shape)} {out.dtype} on {out.device}"
            )

    def _check(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
    ) -> None:
        """The checks of ``xyserve.attention_varlen``, once per layer signature."""
        where = "VarlenStep.run"
        if q.dim() != 3:
            raise ValueError(f"{where}: q must be packed [tokens, Hq, D], got {q.dim()}-D")
        if q.shape[0] != self.tokens:
            raise ValueError(
                f"{where}: q has {q.shape[0]} tokens but the step's rows hold {self.tokens}"
            )
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dim() != 4:
                raise ValueError(
                    f"{where}: {name} must be paged [blocks, block_size, Hkv, D], got {t.dim()}-D"
                )
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(
                    f"{where}: q and {name} differ: {q.dtype} on {q.device} vs {t.dtype} on "
                    f"{t.device}"
                )
        if k_cache.shape[:3] != v_cache.shape[:3]:
            raise ValueError(
                f"{where}: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} "
                "must share [blocks, block_size, Hkv]"
            )
        if q.shape[1] % k_cache.shape[2]:
            raise ValueError(
                f"{where}: q heads ({q.shape[1]}) must be a multiple of kv heads "
                f"({k_cache.shape[2]})"
            )
        if q.shape[2] != k_cache.shape[3]:
            raise ValueError(
                f"{where}: q head dim {q.shape[2]} differs from k_cache head dim {k_cache.shape[3]}"
            )
        if self.block_table.device != q.device:
            raise ValueError(
                f"{where}: block_table is on {self.block_table.device}, q on {q.device}"
            )
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"{where}: window must be a positive int or None, got {window!r}")
        if window is not None and not self.causal:
            for r, (n, m) in enumerate(zip(self.q_lens, self.kv_lens, strict=True)):
                if n > m:
                    raise ValueError(
                        f"{where}: row {r} has {n} queries and kv_len {m}; with a window the "
                        "queries are the row's last tokens"
                    )
        capacity = self.block_table.shape[1] * k_cache.shape[1]
        if self.max_kv_len > capacity:
            raise ValueError(
                f"{where}: a row has kv_len {self.max_kv_len} but the block table holds "
                f"{capacity} keys per row ({self.block_table.shape[1]} blocks of "
                f"{k_cache.shape[1]})"
            )
        # Once per layer signature, so once per step in practice (on a GPU, one read of the
        # answer per step, never per layer). That covers every layer that reuses the decision:
        # the cache's block count is part of the signature, and the engine fills the block table
        # before the step and builds a new step for the next one's table.
        check_block_ids(self.block_table, self.kv_lens, k_cache.shape[1], k_cache.shape[0], where)


class SlotWrites:
    """Where one step's new keys and values go in a paged cache ``[blocks, block_size, Hkv,
    D]``: ``slot_mapping[i]`` is token i's slot, ``block * block_size + offset``. A negative slot
    is padding, which vLLM's ``reshape_and_cache`` skips: it is not written (as an index it
    would write into the last block, another sequence's keys). Built once per step for all its
    layers."""

    __slots__ = ("block", "offset", "tokens")

    def __init__(self, slot_mapping: torch.Tensor, block_size: int) -> None:
        if slot_mapping.dim() != 1 or slot_mapping.dtype.is_floating_point:
            raise ValueError(
                f"SlotWrites: slot_mapping must be a 1-D integer tensor, got "
                f"{slot_mapping.dim()}-D {slot_mapping.dtype}"
            )
        slots = slot_mapping.long()
        real = slots >= 0
        # One device-to-host read per step (the step is built on the host; layers never read).
        padded = slots.numel() > 0 and not bool(real.all())
        # The tokens written when some are padding; None: all of them.
        self.tokens: torch.Tensor | None = real.nonzero().squeeze(1) if padded else None
        if self.tokens is not None:
            slots = slots[self.tokens]
        self.block = slots // block_size
        self.offset = slots % block_size

    def write(
        self, k_cache: torch.Tensor, v_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Write the step's ``key``/``value`` ``[tokens, Hkv, D]`` into one layer's caches."""
        if self.tokens is not None:
            key, value = key[self.tokens], value[self.tokens]
        k_cache[self.block, self.offset] = key
        v_cache[self.block, self.offset] = value
