"""Sibling GEMMs on one input -> one torch.ops.xyserve.gemm_fused, split after.

The q/k/v projections of an attention block (Llama, Qwen2, Mistral, Gemma, BERT) and the
gate/up projections of a gated MLP read the same tensor. After ``linear_to_gemm`` they are
``gemm(x, w_i, b_i)`` nodes with the same ``x``; this pass replaces each such group with one
``gemm_fused(x, [w_i], [b_i])`` and a split of its output.

Fusion pays only if the weights are one buffer, so that one GEMM reads them without a copy.
``lay_out_weights`` makes them so, once, when the backend compiles: it moves each group's
parameters into one buffer and points the parameters at their rows (values and Parameter objects
stay). Nothing is cached, so nothing can be stale: in-place updates land in the buffer, and a
parameter given new storage later is noticed at run time and run on its own (counted).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx

from xy_inductor.lowering.options import LoweringOptions
from xy_inductor.lowering.pass_base import LoweringPass, fake_value
from xy_inductor.lowering.patterns import is_weight, make_node
from xy_inductor.runtime.ops import stacked_rows

__all__ = ["FuseSiblingGemms", "lay_out_weights", "sibling_parameters"]


def _gemm_op() -> object:
    return torch.ops.xyserve.gemm.default


class FuseSiblingGemms(LoweringPass):
    """A site is a group of sibling ``gemm`` nodes, anchored at its first; each node of the
    group is taken over by its part of the fused GEMM's output."""

    name = "fuse_siblings"
    kind = "linear"
    target = None
    reads = ("max_tokens",)
    counted = False  # it regroups sites that linear_to_gemm listed already

    def __init__(self, settings: LoweringOptions | None = None) -> None:
        super().__init__(settings)
        self._groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        """Each group of two or more sibling gemms by its first node, read by ``start``."""

    def lowered_op(self) -> object:
        return torch.ops.xyserve.gemm_fused.default

    def start(self, gm: torch.fx.GraphModule) -> None:
        groups: dict[tuple, list[torch.fx.Node]] = {}
        for node in gm.graph.nodes:
            key = _group_key(node)
            if key is not None:
                groups.setdefault(key, []).append(node)
        self._groups = {nodes[0]: nodes for nodes in groups.values() if len(nodes) >= 2}

    def is_site(self, node: torch.fx.Node) -> bool:
        return node in self._groups

    def is_lowered(self, node: torch.fx.Node) -> bool:
        return False  # a group is a site only while its gemms are apart

    def why_not(self, node: torch.fx.Node) -> str | None:
        return None  # _group_key admitted every node of the group

    def replacement(self, node: torch.fx.Node) -> dict[torch.fx.Node, torch.fx.Node]:
        nodes = self._groups[node]
        graph = node.graph
        x = node.args[0]
        weights = [n.args[1] for n in nodes]
        biases = [n.args[2] for n in nodes] if node.args[2] is not None else []
        sizes = [fake_value(w).shape[0] for w in weights]
        max_tokens = node.kwargs.get("max_tokens", self.settings.max_tokens)
        fused = make_node(
            graph,
            "call_function",
            self.lowered_op(),
            (x, weights, biases),
            {"max_tokens": max_tokens},
        )
        fused.meta.update({k: v for k, v in node.meta.items() if k != "example_value"})
        parts = make_node(graph, "call_function", torch.split, (fused, sizes, -1))
        return {
            n: make_node(graph, "call_function", operator.getitem, (parts, i))
            for i, n in enumerate(nodes)
        }


def _group_key(node: torch.fx.Node) -> tuple | None:
    """Gemms that can fuse share this key: input, K, dtype, device, bias or not."""
    if node.op != "call_function" or node.target is not _gemm_op():
        return None
    x, w, b = node.args
    value = fake_value(w)
    if not is_weight(w) or not isinstance(value, torch.Tensor) or not value.is_contiguous():
        return None
    if b is not None and not is_weight(b):
        return None
    max_tokens = node.kwargs.get("max_tokens")
    return (x, value.shape[1], value.dtype, value.device, b is None, max_tokens)


def sibling_parameters(
    gm: torch.fx.GraphModule, example_inputs: Sequence[object]
) -> list[list[torch.nn.Parameter]]:
    """The parameters behind each fused group of weights (and of biases) in ``gm``: the real
    ``nn.Parameter`` inputs the backend was given. Groups with anything else are skipped."""
    placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.xyserve.gemm_fused.default:
            continue
        for group in (node.args[1], node.args[2]):
            params = [example_inputs[placeholders[n]] for n in group if n in placeholders]
            complete = bool(params) and len(params) == len(group)
            if complete and all(isinstance(p, torch.nn.Parameter) for p in params):
                groups.append(params)
    return groups


def lay_out_weights(groups: list[list[torch.nn.Parameter]]) -> int:
    """Give each group of parameters one buffer (see the module docstring); returns how many
    groups it moved."""
    moved = 0
    for params in groups:
        if stacked_rows(params) is not None:
            continue
        with torch.no_grad():
            buffer = torch.cat([p.detach() for p in params])
            offset = 0
            for p in params:
                p.data = buffer[offset : offset + p.shape[0]]
                offset += p.shape[0]
        moved += 1
    return moved
