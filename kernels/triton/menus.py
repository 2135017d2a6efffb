"""What the Triton provider offers the planners: its GEMM tiles and its attention kernel's
query tiles. Importable without Triton (the provider's checkers use it before they know Triton
is there)."""

from __future__ import annotations

from xy_inductor.kernels.attention_plan import AttentionMenu
from xy_inductor.kernels.gemm_plan import GemmMenu, GemmTile

__all__ = ["BLOCK_M", "BLOCK_N", "DENSE_BLOCK", "GEMM_MENU", "attention_menu"]

# Hopper-class GPU (H100/H200: 132 SMs, ~990 dense bf16 TFLOP/s, L2-assisted operand reads).
# Small tiles serve decode (memory-bound, padding waste dominates); large tiles serve prefill.
_CUDA_TILES = (
    GemmTile(16, 64, 128, num_warps=4, num_stages=4, efficiency=0.25),
    GemmTile(32, 64, 128, num_warps=4, num_stages=4, efficiency=0.35),
    GemmTile(64, 64, 64, num_warps=4, num_stages=4, efficiency=0.5),
    GemmTile(64, 128, 64, num_warps=4, num_stages=4, efficiency=0.65),
    GemmTile(128, 128, 64, num_warps=8, num_stages=3, efficiency=0.75),
    GemmTile(128, 256, 64, num_warps=8, num_stages=3, efficiency=0.8),
)

GEMM_MENU = GemmMenu(
    provider="triton",
    tiles=_CUDA_TILES,
    workers=132,
    flops_per_worker=990e12 / 132,
    bytes_per_worker=3 * 4.8e12 / 132,
    smem_limit=227 * 1024,
)
"""The Triton GEMM kernel's tiles and the machine the cost model assumes."""

BLOCK_M = 64  # (query, head) rows per task
BLOCK_N = 32  # keys per inner step
# A dense [B, Hkv, L, D] cache is passed as one block per row of this many slots (a constant,
# so a new L never compiles a new variant).
DENSE_BLOCK = 1 << 30


def attention_menu(group: int, workers: int, kv_chunk: int = 512) -> AttentionMenu:
    """The planner's menu for the attention kernel: query tiles that fill BLOCK_M with
    ``group`` query heads per KV head, ``workers`` programs at once."""
    largest = max(1, BLOCK_M // group)
    tiles = tuple(sorted({t for t in (1, 4, 16, largest) if t <= largest}))
    return AttentionMenu(q_tiles=tiles, kv_chunk=kv_chunk, workers=workers)
