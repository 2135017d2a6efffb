"""Run-time side of xyserve: the custom ops and their validators, the provider registry that
chooses a kernel per call, the serving step plans, and the counters.

Installed as ``xy_inductor.runtime``. Importing it registers ``torch.ops.xyserve.*``. It
imports ``kernels/`` (the providers and the types they consume), never the front end or the
lowering passes.
"""

from xy_inductor.runtime import arguments, counters, ops, providers, serving, stats

__all__ = ["arguments", "counters", "ops", "providers", "serving", "stats"]
