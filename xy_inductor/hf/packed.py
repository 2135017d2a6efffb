"""The packed prefill: a left-padded prompt batch run as one row of its real tokens.

Only the real tokens of every prompt go through the model, one prompt after another, with
attention per prompt (``xyserve.attention_packed``, the token table of XY-Serve), so linear
layers, norms and MLPs compute nothing for padding. Each layer's keys and values are scattered
into the padded layout decode expects (``PackedCache``) and handed to the real cache's own
``update`` afterwards, so every cache kind keeps its bookkeeping; only the logits ``generate()``
asked for (``logits_to_keep``) are computed.

``accelerate`` takes this route only for a model whose probe showed it exact (``routes.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from xy_inductor.hf.attention import PACKED_KEY
from xy_inductor.hf.routes import KVShape
from xy_inductor.kernels.attention_plan import rows_from_mask

__all__ = ["PackedCache", "PackedCall", "padding_of"]


class _PackedLayer(CacheLayerMixin):
    """One layer of ``PackedCache``: copies the packed keys and values into padded buffers and
    returns them unchanged (packed attention reads each sequence's own keys)."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.padded_keys = keys
        self.padded_values = values
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.padded_keys.index_copy_(0, self.index, key_states[0].transpose(0, 1))
        self.padded_values.index_copy_(0, self.index, value_states[0].transpose(0, 1))
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class PackedCache(Cache):
    """The cache a packed prefill runs with: a real ``Cache`` (models ask it their length and
    mask sizes: a prefill's, 0 and the query length), one ``_PackedLayer`` per cache layer.

    Per layer, ``keys``/``values`` are ``[B·L + 1, H, D]``: the padded ``[B, L, H, D]`` flattened,
    then a spare slot; ``index`` says where each packed token goes (row · L + slot)."""

    def __init__(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], index: torch.Tensor
    ) -> None:
        super().__init__(
            layers=[_PackedLayer(k, v, index) for k, v in zip(keys, values, strict=True)]
        )
        self.keys = keys
        self.values = values
        self.index = index


def padding_of(mask: torch.Tensor, batch: int, length: int) -> torch.Tensor | None:
    """The 2-D padding mask ``[B, L]`` of a prefill's causal 4-D mask ``[B, 1, L, Lk]`` whose
    rows are left-padded prompts ending at key slot L - 1 (keys after it not yet written), or
    None if it is anything else."""
    if mask.shape[0] not in (1, batch) or mask.shape[2] != length or mask.shape[3] < length:
        return None
    rows = rows_from_mask(mask, batch, length, mask.shape[3])
    if rows is None or not rows.causal:
        return None
    for q_end, q_len, kv_start, kv_len in zip(
        rows.q_end, rows.q_len, rows.kv_start, rows.kv_len, strict=True
    ):
        if q_end != length or q_len != kv_len or kv_start + kv_len != length:
            return None
    lens = torch.tensor(rows.q_len, device=mask.device)
    return torch.arange(length, device=mask.device)[None, :] >= length - lens[:, None]


class PackedCall:
    """The keyword arguments of one packed prefill, and how its output is put back in the form
    the padded call would have returned."""

    def __init__(
        self,
        kwargs: dict,
        marks: list[tuple[torch.Tensor, tuple[int, ...]]],
        cache: Any,
        dest: PackedCache,
        batch: int,
        length: int,
        keep: int,
    ) -> None:
        self.kwargs = kwargs
        self.marks = marks
        """The sizes to mark dynamic if Dynamo compiles the call (``compiling``)."""
        self.cache = cache
        self.dest = dest
        self.batch = batch
        self.length = length
        self.keep = keep

    @classmethod
    def build(
        cls,
        kw: dict,
        cache_arg: str,
        positions: torch.Tensor,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        lens: torch.Tensor,
        cache: Any,
        keep: int,
        kv_shapes: tuple[KVShape, ...],
        dtype: torch.dtype,
    ) -> PackedCall:
        """``positions``: the call's position ids as ``[B, L]``; ``kv_shapes``: each cache
        layer's (heads, key size, value size), as the model's probe saw them."""
        batch, length = tokens.shape
        # Sequence after sequence, in token order. Fresh tensors: nonzero's outputs are views at
        # storage offsets Dynamo would guard on.
        rows, slots = (t.clone() for t in mask.nonzero(as_tuple=True))
        # One more sequence of one token, whose results are dropped: a packed call then always
        # has two tokens and two sequences or more, so no size of its graph is traced as 1
        # (Inductor specialises views of size-1 dims, and the next prompt would recompile).
        device = tokens.device
        one = torch.zeros(1, dtype=torch.int64, device=device)
        cu = torch.zeros(batch + 2, dtype=torch.int64, device=device)
        cu[1:-1] = lens.cumsum(0)
        cu[-1] = cu[-2] + 1
        # The last `keep` tokens of each sequence: what generate() reads the logits of.
        last = (cu[1:-1, None] - keep + torch.arange(keep, device=device)).flatten()
        # The padded K/V of the prompt, handed to the cache's own update() after the call.
        slots_total = batch * length + 1  # the padded [B, L], then a spare slot
        keys = [tokens.new_zeros((slots_total, h, dk), dtype=dtype) for h, dk, _ in kv_shapes]
        values = [tokens.new_zeros((slots_total, h, dv), dtype=dtype) for h, _, dv in kv_shapes]
        index = torch.cat([rows * length + slots, one + batch * length])
        dest = PackedCache(keys, values, index)
        packed = {
            k: v
            for k, v in kw.items()
            if k not in ("attention_mask", "position_ids", "cache_position", cache_arg)
        }
        packed.update(
            input_ids=torch.cat([tokens[rows, slots], one.to(tokens.dtype)])[None],
            position_ids=torch.cat([positions[rows, slots], one.to(positions.dtype)])[None],
            attention_mask=None,
            logits_to_keep=last,
            use_cache=True,
        )
        packed[PACKED_KEY] = cu
        packed[cache_arg] = dest
        marks = [(t, (0,)) for t in (*keys, *values, index, last, cu)]
        marks += [(packed["input_ids"], (1,)), (packed["position_ids"], (1,))]
        return cls(packed, marks, cache, dest, batch, length, keep)

    def finish(self, out: Any) -> Any:
        """The output as the padded call returns it: logits ``[B, keep, V]`` and the real cache,
        filled for every layer."""
        b, n = self.batch, self.length
        for i, (k, v) in enumerate(zip(self.dest.keys, self.dest.values, strict=True)):
            # [B·L (+1 spare), H, D] -> [B, H, L, D], the padded prefill's layout.
            self.cache.update(
                k[: b * n].view(b, n, *k.shape[1:]).transpose(1, 2),
                v[: b * n].view(b, n, *v.shape[1:]).transpose(1, 2),
                i,
            )
        out["logits"] = out["logits"].view(self.batch, self.keep, -1)
        # transformers 5 names the output's cache "cache" (4.x: "past_key_values").
        name = next((n for n in ("cache", "past_key_values") if n in out.keys()), None)  # noqa: SIM118 (`in out` maps past_key_values to cache, warning)
        if name is not None:
            out[name] = self.cache
        return out
