"""Helpers shared by the tests: graph capture, node counts, relative errors."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx


class GraphCapture:
    """A backend that keeps the Dynamo graphs it is given and runs them unchanged."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []
        self.example_inputs: list[list] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs.append(gm)
        self.example_inputs.append(example_inputs)
        return gm.forward


def capture(
    fn: Callable, *args: object, dynamic: bool | None = True, **kwargs: object
) -> tuple[torch.fx.GraphModule, list]:
    """The single Dynamo graph of ``fn(*args, **kwargs)`` and the real inputs it is called with
    (module parameters included)."""
    backend = GraphCapture()
    with torch.no_grad():
        torch.compile(fn, backend=backend, dynamic=dynamic, fullgraph=True)(*args, **kwargs)
    assert len(backend.graphs) == 1
    return backend.graphs[0], backend.example_inputs[0]


def run(gm: torch.fx.GraphModule, inputs: list) -> torch.Tensor:
    """The graph's (single) output."""
    # Dynamo hands size placeholders to the backend as SymInts; running needs their values.
    inputs = [int(x) if isinstance(x, torch.SymInt) else x for x in inputs]
    with torch.no_grad():
        out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def count_calls(gm: torch.fx.GraphModule, target: object) -> int:
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


# Per dtype: bound on the relative error against a float64 reference (DESIGN.md).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
