"""Symbolic shape guards, checked once when the backend compiles a graph.

Each xyserve GEMM's M (the product of its input's leading sizes) and each attention call's
query and key lengths are written as sympy expressions of the graph's size symbols (``s0*s1``
for a flattened batch × sequence). Their ranges come from Dynamo's value ranges, which include
``mark_dynamic(min=, max=)`` bounds. A GEMM whose M range lies inside 1…``max_tokens`` is served
by the tile plan for every call; one whose M can exceed it is reported (``explain``), and such
calls go to the ATen fallback at run time. The run-time guard is the plan's bucket lookup, never
a Dynamo guard: nothing here adds a guard or causes a recompile.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce

import sympy
import torch
import torch.fx
from torch.utils._sympy.numbers import int_oo

__all__ = ["ShapeCheck", "check_shapes", "size_range"]


@dataclass(frozen=True)
class ShapeCheck:
    """The range of one dynamic size of one xyserve call."""

    node: str
    """The graph node (an ``xyserve`` call)."""
    op: str
    """``gemm``, ``gemm_fused`` or ``attention``."""
    size: str
    """``M`` for a GEMM; ``Lq``/``Lk`` for attention."""
    expr: str
    """The size as an expression of the graph's size symbols (a number when static)."""
    lo: int
    hi: int | None
    """Upper bound; None when unbounded."""
    covered: bool | None
    """GEMM: whether 1…max_tokens covers the whole range. Attention: None (no menu yet)."""

    def __str__(self) -> str:
        hi = "inf" if self.hi is None else str(self.hi)
        status = {True: "covered", False: "NOT covered: larger M runs on ATen", None: ""}
        return (
            f"{self.node}: {self.op} {self.size} = {self.expr} in [{self.lo}, {hi}] "
            f"{status[self.covered]}".rstrip()
        )


def size_range(size: object) -> tuple[str, int, int | None]:
    """(expression, lower bound, upper bound or None) of an int or SymInt size."""
    if isinstance(size, int):
        return str(size), size, size
    if not isinstance(size, torch.SymInt):
        raise ValueError(f"size_range: expected an int or SymInt, got {type(size).__name__}")
    node = size.node
    expr = node.expr
    if expr.is_number:
        return str(int(expr)), int(expr), int(expr)
    bounds = node.shape_env.bound_sympy(expr)
    lo, hi = _bound(bounds.lower), _bound(bounds.upper)
    return str(expr), max(lo or 0, 0), hi


def _bound(value: object) -> int | None:
    # torch's int_oo says is_finite=True (it stands for "any int"); test it explicitly.
    if value in (int_oo, -int_oo, sympy.oo, -sympy.oo):
        return None
    return int(value)


def _value(arg: object) -> object:
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("val", arg.meta.get("example_value"))
    return arg


_GEMMS = ("gemm", "gemm_fused")


def _op_name(node: torch.fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    for name in (*_GEMMS, "attention"):
        op = getattr(torch.ops.xyserve, name)
        if node.target is op.default or node.target is op:
            return name
    return None


def check_shapes(gm: torch.fx.GraphModule, max_tokens: int) -> list[ShapeCheck]:
    """A ``ShapeCheck`` for every dynamic-size question of every xyserve call in ``gm``."""
    checks = []
    for node in gm.graph.nodes:
        op = _op_name(node)
        if op is None:
            continue
        if op in _GEMMS:
            x = _value(node.args[0])
            if not isinstance(x, torch.Tensor):
                continue
            m = reduce(operator.mul, x.shape[:-1], 1)
            expr, lo, hi = size_range(m)
            covered = hi is not None and hi <= max_tokens
            checks.append(ShapeCheck(node.name, op, "M", expr, lo, hi, covered))
        else:
            q, k = _value(node.args[0]), _value(node.args[1])
            if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
                continue
            for size, value in (("Lq", q.shape[2]), ("Lk", k.shape[2])):
                expr, lo, hi = size_range(value)
                checks.append(ShapeCheck(node.name, op, size, expr, lo, hi, None))
    return checks
