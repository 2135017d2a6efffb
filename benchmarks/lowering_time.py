"""What lowering adds to compile time on a 32-layer model.

A 32-layer Llama config (hidden 256: the passes' cost depends on the graph's node count, not on
tensor sizes, which are fake while compiling). One Dynamo graph of its forward, captured once:
the passes alone are timed on fresh copies of it; then whole compiles, side by side in one
process, with a pass-through backend and with xyserve (each after torch._dynamo.reset()).

    .venv/bin/python benchmarks/lowering_time.py [--layers 32]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.fx
from timing import Stopwatch, Timing, paired

import xy_inductor
from xy_inductor import workload as wl
from xy_inductor.config import XyConfig
from xy_inductor.lowering import lower_graph


def compile_seconds(model, backend, ids, mask) -> float:
    """The first call of a fresh compile (Dynamo's reset before it is not timed)."""
    torch._dynamo.reset()
    with Stopwatch() as sw, torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True)(input_ids=ids, attention_mask=mask)
    return sw.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    args = p.parse_args()
    model = wl.tiny_llama(hidden_size=256, intermediate_size=512, num_hidden_layers=args.layers)
    ids, mask = wl.prompt_batch([37, 20], model.config.vocab_size, seed=0)

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=True)(input_ids=ids, attention_mask=mask)
    (gm,) = graphs
    nodes = len(gm.graph.nodes)
    times = []
    for _ in range(5):
        graph = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))  # a fresh copy, not timed
        with Stopwatch() as sw:
            report = lower_graph(graph, XyConfig().lowering_options())
        times.append(sw.seconds)
    print(
        f"{args.layers} layers, {nodes} graph nodes: "
        f"{report.count('attention', lowered=True)}/{report.count('attention')} attention and "
        f"{report.count('linear', lowered=True)}/{report.count('linear')} linear sites lowered"
    )
    print(f"passes alone (lower_graph): median {Timing(times).median:.3f} s over 5 copies")

    def passthrough(gm, example_inputs):
        return gm.forward

    # Side by side, 3 rounds; each sample is compile_seconds' own measurement.
    plain, xyserve = paired(
        lambda: compile_seconds(model, passthrough, ids, mask),
        lambda: compile_seconds(model, xy_inductor.backend.xyserve_backend, ids, mask),
        rounds=3,
        warmup=0,
        sampler=lambda measured: measured(),
    )
    a, b = plain.median, xyserve.median
    print(
        f"first call incl. Dynamo tracing: pass-through {a:.2f} s, xyserve {b:.2f} s, "
        f"lowering adds {b - a:.2f} s (medians of 3)"
    )


if __name__ == "__main__":
    main()
