"""Run-time side of xyserve: the custom ops, the call objects providers are handed, the
planners (GEMM tiles, meta-attention token and task tables, rows of dense masks), the provider
registry and the counters.

Installed as ``xy_inductor.runtime``. Importing it registers ``torch.ops.xyserve.*``. It
imports ``kernels/`` (the providers), never the front end or the lowering passes.
"""

from xy_inductor.runtime import ops, providers, serving, stats

__all__ = ["ops", "providers", "serving", "stats"]
