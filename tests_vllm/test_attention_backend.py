"""The attention backend's metadata builder and layer, without an engine."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from xy_inductor.vllm.attention import XyserveAttentionImpl, XyserveMetadataBuilder


def _builder(block_size: int) -> XyserveMetadataBuilder:
    """The builder as ``build`` uses it (its constructor needs a whole engine config)."""
    builder = object.__new__(XyserveMetadataBuilder)
    builder.block_size = block_size
    builder.upper_bound_exact = True
    builder.verify_max_q = None
    return builder


def test_padding_slots_are_not_written_on_any_device():
    # Slot -1 is padding (vLLM's reshape_and_cache skips it), inside the rows' tokens too (a
    # token another rank stores). The CPU build refused it; elsewhere it was used as an index
    # and wrote into the last slot of the last block, another sequence's keys.
    cm = SimpleNamespace(
        causal=True,
        num_reqs=2,
        query_start_loc_cpu=torch.tensor([0, 3, 4], dtype=torch.int32),
        seq_lens=torch.tensor([3, 5], dtype=torch.int32),
        seq_lens_cpu_upper_bound=None,
        block_table_tensor=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        slot_mapping=torch.tensor([0, -1, 2, 2 * 16 + 4, -1, -1]),  # two tokens of padding
    )
    metadata = _builder(16).build(0, cm)
    gen = torch.Generator().manual_seed(0)
    memory = torch.randn(5, 16, 2, 16, generator=gen)  # LBNHC: a block is [16, Hkv, D + Dv]
    before = memory.clone()
    query = torch.randn(6, 4, 8, generator=gen)
    key = torch.randn(6, 2, 8, generator=gen)
    value = torch.randn(6, 2, 8, generator=gen)
    output = torch.zeros(6, 4, 8)
    impl = XyserveAttentionImpl(num_heads=4, head_size=8, scale=8**-0.5, num_kv_heads=2)
    impl.forward(None, query, key, value, memory.transpose(1, 2), metadata, output)
    want = before.clone()
    for token, (block, slot) in {0: (0, 0), 2: (0, 2), 3: (2, 4)}.items():
        want[block, slot] = torch.cat([key[token], value[token]], dim=-1)
    assert torch.equal(memory, want)  # the last block (4) and slot (0, 1) untouched
    assert output[:4].isfinite().all()
