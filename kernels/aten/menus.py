"""What the ATen provider offers the planners, and when a dense call is worth planning.

One copy, read by the provider's checkers (``__init__``) and by its C++ fast path
(``native.py``, which hands ``PLANNED_MIN_SCORES`` to the library it loads).
"""

from __future__ import annotations

from xy_inductor.kernels.attention_plan import AttentionMenu
from xy_inductor.kernels.gemm_plan import GemmMenu

__all__ = ["ATTENTION_MENU", "GEMM_MENU", "PLANNED_MIN_SCORES"]

# The CPU executors run a plan's tasks in order on the calling thread, so one worker: the
# planner's worker assignment is not used by them.
ATTENTION_MENU = AttentionMenu(q_tiles=(1, 16, 64, 128), kv_chunk=512, workers=1)
"""Query tiles per row length and keys per chunk of the CPU executors."""

# ATen picks its own blocking for every M: one bucket, nothing padded.
GEMM_MENU = GemmMenu(
    provider="aten", tiles=(), workers=1, flops_per_worker=1.0, bytes_per_worker=1.0
)
"""ATen's GEMM menu: no tiles of its own."""

# Below this many scores (B × Lq × Lk) one dense SDPA call costs less than recognising rows and
# planning them (a tiny model's decode step); above it, skipping padding pays.
PLANNED_MIN_SCORES = 1 << 18
"""The smallest B × Lq × Lk of a dense CPU call that is run as planned rows."""
