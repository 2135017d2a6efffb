"""Run-time side of xyserve: the custom ops, the provider registry and the counters.

Installed as ``xy_inductor.runtime``. Importing it registers ``torch.ops.xyserve.*``.
"""

from xy_inductor.runtime import ops, providers, stats

__all__ = ["ops", "providers", "stats"]
