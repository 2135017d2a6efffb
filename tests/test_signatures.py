"""Calls bound to their signatures (``lowering/signatures.py``): one binding for every spelling
of a call, and a named reason for an argument a pattern does not understand."""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from xy_inductor.lowering.signatures import bind


def _node(graph, op, target, args, kwargs=None):
    return graph.create_node(op, target, args, kwargs or {})


def test_calls_bind_the_same_positional_or_keyword():
    g = torch.fx.Graph()
    x, m = g.placeholder("x"), g.placeholder("m")
    spellings = [
        (
            ("call_function", F.softmax, (x, -1), {}),
            ("call_function", F.softmax, (), {"input": x, "dim": -1}),
        ),
        (
            ("call_method", "permute", (x, 0, 1, 3, 2), {}),
            ("call_method", "permute", (x,), {"dims": (0, 1, 3, 2)}),
        ),
        (
            ("call_method", "permute", (x, [0, 1, 3, 2]), {}),
            ("call_method", "permute", (x, 0, 1, 3, 2), {}),
        ),
        (("call_function", torch.bmm, (x, m), {}), ("call_function", torch.bmm, (x,), {"mat2": m})),
        (
            ("call_method", "swapaxes", (x, -1, -2), {}),
            ("call_method", "swapaxes", (x,), {"axis0": -1, "axis1": -2}),
        ),
        (
            ("call_function", torch.dropout, (x, 0.1, False), {}),
            ("call_function", torch.dropout, (x,), {"p": 0.1, "train": False}),
        ),
    ]
    for a, b in spellings:
        ca, cb = bind(_node(g, *a)), bind(_node(g, *b))
        assert ca.op == cb.op and ca.args == cb.args and ca.error is None and cb.error is None


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "reason"),
    [
        (torch.add, "xm", {"alpha": 0.5}, "alpha=0.5"),
        (torch.div, "xm", {"rounding_mode": "floor"}, "rounding_mode='floor'"),
        (torch.matmul, "xm", {"out": "m"}, "out="),
        (torch.add, "xm", {"beta": 2}, "keyword beta="),
        (torch.add, "xmx", {}, "positional arguments"),
    ],
)
def test_arguments_a_pattern_does_not_understand_are_named(target, args, kwargs, reason):
    g = torch.fx.Graph()
    nodes = {"x": g.placeholder("x"), "m": g.placeholder("m")}
    kwargs = {k: nodes.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    call = bind(_node(g, "call_function", target, tuple(nodes[a] for a in args), kwargs))
    refused = call.refuse("input", "other")
    assert refused is not None and reason in refused, refused
