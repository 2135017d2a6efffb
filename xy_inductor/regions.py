"""Regional Inductor compilation: a lowered graph cut at its repeated blocks (the decoder layers
of a transformer), each distinct region compiled by Inductor once and reused for every block
with the same code.

Inductor compiles a model's graph as one program, so a 32-layer model costs 32 layers of
compile time although the layers are identical. Hugging Face accelerate's ``compile_regions``
compiles one block and reuses it; here the same idea runs inside the backend, on the graph
Dynamo captured: the nodes of each ``….layers.<i>`` module (read from ``nn_module_stack``)
become one submodule (``torch.fx.passes.split_module``), the nodes before and after the blocks
two more, and a submodule whose code and input metadata match one already compiled reuses its
compiled function. The top-level graph then calls the regions in order.

Each block's inputs have sizes of their own symbols (a cache tensor per layer), so "the same
metadata" is judged with the symbols renamed in order of appearance. Dynamo's guards hold for
the region that was compiled, not for those that reuse it; so a reusing region checks, on
every call, that its size symbols have the values the compiled one's had in the same call (the
blocks run in order), which makes its inputs' sizes and strides equal too, and runs its own
traced code when they do not (never a wrong answer, counted in ``stats()``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import sympy
import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from xy_inductor.runtime import counters

__all__ = ["compile_regions", "region_of"]

log = logging.getLogger("xy_inductor")

# A module path ending in a list index: Dynamo writes "….layers[3]", "….layers.3" or
# "…_modules['3']".
_INDEXED = re.compile(r"(\.|\[|_modules\[')\d+('\]|\])?$")


def region_of(node: torch.fx.Node) -> str | None:
    """The outermost repeated block (``….layers.3``) a node belongs to, or None."""
    for path, _cls in (node.meta.get("nn_module_stack") or {}).values():
        text = path if isinstance(path, str) else str(path)
        if _INDEXED.search(text):
            return text
    return None


def _partitions(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, int] | None:
    """Partition of every compute node: 0 before the first block, i for block i (nodes between
    two blocks stay with the one before), and one past the last block after it. None when the
    graph has fewer than two blocks or a block's nodes follow the next block's."""
    parts: dict[torch.fx.Node, int] = {}
    blocks: dict[str, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        block = region_of(node)
        if block is not None:
            index = blocks.setdefault(block, len(blocks) + 1)
            if index < current:
                return None
            current = index
        parts[node] = current
    if len(blocks) < 2:
        return None
    last = len(blocks)
    # What follows the last block's own nodes is the epilogue.
    for node in reversed(gm.graph.nodes):
        if node not in parts:
            continue
        if region_of(node) is not None:
            break
        parts[node] = last + 1
    return parts


class _Region(torch.nn.Module):
    """A region in the top-level graph: Inductor's code for it, or, for a region reusing
    another's code, that code behind a check that its size symbols have the values the other's
    had in this same call (the blocks run in order).

    ``symbols`` locates each size symbol of the region's inputs, in canonical order: ``(i, d)``
    is dim ``d`` of input ``i``, ``(i, None)`` input ``i`` itself (a SymInt). Two regions with
    the same signature have inputs whose sizes and strides are the same expressions of their
    symbols, and the inputs hold to them: the graph's inputs by Dynamo's guards, values made
    inside the graph because Inductor keeps the traced strides of what a region returns
    (``keep_output_stride``). So equal symbol values mean equal sizes and strides, and
    comparing a handful of sizes is the whole check.
    """

    def __init__(
        self,
        fn: Callable,
        symbols: tuple[tuple[int, int | None], ...],
        donor: _Region | None = None,
        traced: torch.fx.GraphModule | None = None,
    ) -> None:
        super().__init__()
        # Read on every call: plain attributes, not nn.Module's (whose lookup costs
        # microseconds). The donor is a submodule of the top-level graph already; the traced
        # code, read only on a mismatch, stays this module's submodule.
        vars(self).update(fn=fn, symbols=symbols, donor=donor)
        self.traced = traced
        self.last: list[tuple] = [()]
        """The compiled region's symbol values in the current call (a list, so that setting
        them skips ``nn.Module.__setattr__``)."""

    def _values(self, args: tuple) -> tuple:
        return tuple(args[i] if d is None else args[i].size(d) for i, d in self.symbols)

    def forward(self, *args: object) -> object:
        if self.donor is None:
            if self.symbols:
                self.last[0] = self._values(args)
            return self.fn(*args)
        if self._values(args) != self.donor.last[0]:
            counters.record_region_mismatch()
            return self.traced(*args)
        return self.fn(*args)

    # Called once per region per step: nn.Module's __call__ (hooks, which nobody sets on a
    # region) costs a few microseconds each time.
    __call__ = forward


def _canonical(values: Sequence[object], symbols: dict) -> str:
    """``values`` (sizes, strides, SymInts) as text with each symbol named by its order of
    first appearance, so two blocks whose sizes are their own symbols compare equal."""
    out = []
    for v in values:
        expr = v.node.expr if isinstance(v, torch.SymInt) else v
        if isinstance(expr, sympy.Expr) and not expr.is_number:
            for sym in sorted(expr.free_symbols, key=str):
                symbols.setdefault(sym, sympy.Symbol(f"x{len(symbols)}"))
            expr = expr.xreplace(symbols)
        out.append(str(expr))
    return ",".join(out)


def _input_order(args: Sequence[object]) -> list[int]:
    """A canonical order of a region's inputs: tensors and constants as they come, then the
    size symbols it takes, in the order their symbols first appear in the tensors' sizes.
    ``split_module`` lists a region's symbols in set order, which differs between blocks."""
    first: dict = {}
    for a in args:
        if isinstance(a, torch.Tensor):
            for size in a.shape:
                if isinstance(size, torch.SymInt):
                    for sym in sorted(size.node.expr.free_symbols, key=str):
                        first.setdefault(sym, len(first))

    def key(i: int) -> tuple:
        a = args[i]
        if isinstance(a, torch.SymInt) and a.node.expr in first:
            return (1, first[a.node.expr])
        return (0 if not isinstance(a, torch.SymInt) else 2, i)

    return sorted(range(len(args)), key=key)


def _reorder_inputs(submod: torch.fx.GraphModule, order: list[int]) -> None:
    """Make ``submod``'s placeholders come in ``order`` (its caller passes them so)."""
    placeholders = [n for n in submod.graph.nodes if n.op == "placeholder"]
    anchor = next(n for n in submod.graph.nodes if n.op != "placeholder")
    for i in order:
        anchor.prepend(placeholders[i])
    submod.recompile()


def _signature(submod: torch.fx.GraphModule, args: Sequence[object]) -> tuple:
    """What makes two regions the same program: their code with every name made positional,
    and the metadata of their inputs with symbols renamed; and where each symbol first appears
    as a size of its own (what a reusing region checks at run time, ``_Region``)."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i, node in enumerate(submod.graph.nodes):
        env[node] = graph.node_copy(node, lambda n: env[n])
        env[node].name = f"n{i}"
        env[node].type = None  # an input's annotation says where it came from, not what it is
        if node.op == "placeholder":
            env[node].target = f"n{i}"
    code = torch.fx.GraphModule(submod, graph).code
    symbols: dict = {}
    metas = []
    for a in args:
        if isinstance(a, torch.Tensor):
            shape = _canonical((*a.shape, *a.stride()), symbols)
            metas.append((str(a.dtype), str(a.dim()), shape, str(a.device)))
        elif isinstance(a, torch.SymInt):
            metas.append(("SymInt", _canonical((a,), symbols)))
        else:
            metas.append((type(a).__name__, repr(a)))
    return (code, tuple(metas)), _locate(args, list(symbols))


def _locate(args: Sequence[object], symbols: list) -> tuple[tuple[int, int | None], ...]:
    """Where each of ``symbols`` is a size of an input (or an input) by itself, in their order.
    A symbol that appears only inside larger expressions cannot be read back from one size; it
    raises, and the region is compiled on its own rather than reusing another's code."""
    found: dict = {}
    for i, a in enumerate(args):
        if isinstance(a, torch.SymInt):
            found.setdefault(a.node.expr, (i, None))
        elif isinstance(a, torch.Tensor):
            for d, size in enumerate(a.shape):
                if isinstance(size, torch.SymInt):
                    found.setdefault(size.node.expr, (i, d))
    missing = [s for s in symbols if s not in found]
    if missing:
        raise _NotLocatable(f"size symbols {missing} are no input size of their own")
    return tuple(found[s] for s in symbols)


class _NotLocatable(Exception):
    pass


def compile_regions(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[object],
    compile_fn: Callable[[torch.fx.GraphModule, list], Callable],
) -> tuple[torch.fx.GraphModule, int, int] | None:
    """Compile ``gm`` region by region with ``compile_fn`` (Inductor's ``compile_fx``).

    Returns the top-level module calling the compiled regions, how many regions it has and how
    many were compiled; None when ``gm`` has no repeated blocks. The regions are traced with
    the example inputs made fake in the backend's fake mode (Dynamo's tracing context), which
    gives them their symbolic sizes back."""

    parts = _partitions(gm)
    if parts is None:
        return None
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None:
        return None
    fake_args = [
        fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in example_inputs
    ]
    split = split_module(gm, None, lambda node: parts[node], keep_original_order=True)
    compiled: dict[tuple, _Region] = {}
    regions = 0

    class _Compiler(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            if n.op == "call_module":
                args, _ = self.fetch_args_kwargs_from_env(n)
                order = _input_order(args)
                if order != list(range(len(args))):
                    _reorder_inputs(self.fetch_attr(n.target), order)
                    n.args = tuple(n.args[i] for i in order)
            return super().run_node(n)

        def call_module(self, target: str, args: tuple, kwargs: dict) -> object:
            nonlocal regions
            submod = self.fetch_attr(target)
            regions += 1
            try:
                key, symbols = _signature(submod, args)
            except _NotLocatable:
                key, symbols = (target,), ()  # a key of its own: compiled, never reused
            out = submod(*args, **kwargs)  # before compiling: Inductor rewrites the module
            donor = compiled.get(key)
            if donor is None:
                # A region's inputs follow from the graph's, which Dynamo's guards hold, and
                # reusing regions check theirs (_Region): the caller turns Inductor's size
                # asserts off (backend._inductor).
                fn = compile_fn(submod, list(args))
                region = compiled[key] = _Region(fn, symbols)
            else:
                region = _Region(donor.fn, symbols, donor, submod)
            split.set_submodule(target, region)
            return out

    with fake_mode:
        _Compiler(split).run(*fake_args)
    split.recompile()
    log.info("xyserve: %d regions, %d compiled by Inductor", regions, len(compiled))
    return split, regions, len(compiled)
