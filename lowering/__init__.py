"""Lowering passes on the Dynamo graph, before AOT autograd; installed as ``xy_inductor.lowering``.

One pass per file (the hand-written attention pass in two: its pattern and its rewrite), run in
the order of ``PASSES``; each counts what it rewrote and says why it left a site alone. The
passes read ``LoweringOptions``, never the front end's config: nothing here imports the front
end (``xy_inductor.config``, the backend, ``hf``), only the runtime below (the ops and
defaults).
"""

from xy_inductor.lowering.fuse_siblings import (
    FuseSiblingGemms,
    lay_out_weights,
    sibling_parameters,
)
from xy_inductor.lowering.linear_to_gemm import LinearToGemm
from xy_inductor.lowering.manual_attention import ManualAttention
from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.pass_base import LoweringPass, Site
from xy_inductor.lowering.pipeline import PASSES, GraphReport, lower_graph, pipeline_uuid
from xy_inductor.lowering.sdpa_to_attention import SdpaToAttention
from xy_inductor.lowering.trace_flags import install as _install_trace_flags

# Registration only: lets Dynamo keep SDPA calls with symbolic bool flags in graphs traced for
# xyserve (trace_flags.py), instead of breaking the graph around them.
_install_trace_flags()

__all__ = [
    "PASSES",
    "FuseSiblingGemms",
    "GraphReport",
    "LinearToGemm",
    "LoweringOptions",
    "LoweringPass",
    "ManualAttention",
    "SdpaToAttention",
    "Site",
    "lay_out_weights",
    "lower_graph",
    "pipeline_uuid",
    "sibling_parameters",
]
