"""What every lowering pass shares: site records, site names, the match loop, ``uuid()``.

A pass looks at the nodes it knows how to recognise (its *sites*), rewrites each one it can
into an xyserve op, and records why it left the others alone. Nothing it does not rewrite is
touched, so an unsupported site always runs exactly as traced.

Each site is contained: an exception while matching or rewriting it (a bug of ours, or a graph
we did not foresee) leaves that site exactly as traced, recorded with the exception's text and
logged, and the pass goes on with the next site. A rewrite first builds its replacement in
front of the site, checks that it computes a value of the same shape and dtype, and only then
swaps it in; if anything fails before the swap, the nodes it added are erased again, so a graph
is never left half rewritten.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import ModuleType
from typing import ClassVar

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from xy_inductor.lowering.options import LoweringOptions

__all__ = ["LoweringPass", "Site", "fake_value", "infer_meta", "site_name"]

log = logging.getLogger("xy_inductor")

# What a pass's uuid() follows: the modules of this package (the lowering's own code).
_PACKAGE = __name__.rpartition(".")[0] + "."


@dataclass(frozen=True)
class Site:
    """One attention or linear site of a graph, and what the lowering did with it."""

    kind: str
    """``attention`` or ``linear``."""
    name: str
    """Where it comes from: the module path when there is one, else file:line."""
    lowered: bool
    """Whether it now runs as an xyserve op."""
    reason: str | None
    """Why it was left as it was (None when lowered)."""
    pass_name: str
    """The pass that recognised the site."""
    failed: bool = False
    """Matching or rewriting it raised: it runs as traced, ``reason`` holds the exception."""


_SUBSCRIPT = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")


def _clean_module_path(path: str) -> str:
    # Dynamo writes module paths as sources: L['self'].model.layers[0]._modules['q_proj'], or
    # L['args'][0].model... when a bound method was compiled.
    path = re.sub(r"^L\['[^']*'\](\[\d+\])?\.?", "", path)
    path = re.sub(r"(^|\.)_modules(?=\[)", "", path)
    path = _SUBSCRIPT.sub(r".\1", path)
    return path.strip(".") or "<root>"


def site_name(node: torch.fx.Node) -> str:
    """``model.layers.0.self_attn.q_proj`` for a module's call, else ``file.py:123`` of the call."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, _cls = list(stack.values())[-1]
        return _clean_module_path(path if isinstance(path, str) else str(path))
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
    if frames:
        file, line = frames[-1]
        return f"{file.rsplit('/', 1)[-1]}:{line}"
    return node.name


def fake_value(arg: object) -> object:
    """The traced (fake) value behind a graph argument; constants are returned as they are."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


def infer_meta(op: str, target: object, args: tuple, kwargs: dict) -> object:
    """The traced value a new ``call_function``/``call_method`` node would have, computed from
    its arguments' fake values (None if they have none)."""
    # map_arg reaches nodes inside lists too (gemm_fused takes a list of weights).
    fake_args = torch.fx.node.map_arg(args, fake_value)
    fake_kwargs = torch.fx.node.map_arg(kwargs, fake_value)
    values = torch.utils._pytree.tree_leaves((fake_args, fake_kwargs))
    # The tensors' own mode: Dynamo gives the backend a different one in its tracing context.
    modes = [a.fake_mode for a in values if isinstance(a, FakeTensor)]
    if not modes:
        # Scalar arithmetic (a scale times a symbolic float) needs no mode; anything else
        # without a fake tensor to go by is left without a value.
        if op == "call_function" and all(
            isinstance(a, (int, float, torch.SymInt, torch.SymFloat)) for a in values
        ):
            return target(*fake_args, **fake_kwargs)
        return None
    with modes[0]:
        if op == "call_method":
            return getattr(fake_args[0], target)(*fake_args[1:], **fake_kwargs)
        return target(*fake_args, **fake_kwargs)


class LoweringPass(ABC):
    """Base of the passes in ``PASSES``: subclasses say what a site is, when it can be
    lowered, and how to rewrite it."""

    name: ClassVar[str]
    """Short name, shown by ``explain``."""
    kind: ClassVar[str]
    """The kind of site it recognises: ``attention`` or ``linear``."""
    reads: ClassVar[tuple[str, ...]] = ()
    """The fields of ``LoweringOptions`` the pass reads (``self.settings.<name>``): each is part
    of ``uuid()``, so a saved graph made with another value is not taken for this pass's."""
    counted: ClassVar[bool] = True
    """Whether its sites are listed (``explain``, ``stats()``). False for a pass that regroups
    sites another pass listed already, which would count them twice."""

    def __init__(self, settings: LoweringOptions | None = None) -> None:
        if settings is None:
            settings = LoweringOptions()
        if not isinstance(settings, LoweringOptions):
            raise TypeError(
                f"{type(self).__name__} takes LoweringOptions (the front end builds them with "
                f"XyConfig.lowering_options()), got {type(settings).__name__}"
            )
        self.settings = settings
        """The options the pass was built with; it reads only those named in ``reads``."""
        self.matched = 0
        """Sites rewritten by the last run."""

    target: ClassVar[object]
    """The call this pass rewrites (e.g. ``torch._C._nn.linear``)."""

    @abstractmethod
    def lowered_op(self) -> object:
        """The xyserve op it rewrites into (looked up late: the ops register at import)."""

    def is_site(self, node: torch.fx.Node) -> bool:
        """Whether the node is a site of this pass's kind, lowered already or not. Passes that
        match patterns rather than one call override it."""
        return node.op == "call_function" and (node.target is self.target or self.is_lowered(node))

    def is_lowered(self, node: torch.fx.Node) -> bool:
        """Whether the site already is the xyserve op (so a second run leaves it alone)."""
        return node.op == "call_function" and node.target is self.lowered_op()

    @abstractmethod
    def why_not(self, node: torch.fx.Node) -> str | None:
        """None when the site can be lowered, else the reason it cannot."""

    @abstractmethod
    def replacement(
        self, node: torch.fx.Node
    ) -> tuple[object, tuple, dict] | torch.fx.Node | dict[torch.fx.Node, torch.fx.Node]:
        """What replaces the site: a call (target, args, kwargs), or a node the method made
        itself; for a site whose values several nodes compute (a group of sibling GEMMs), each
        of those nodes with the node that takes it over, ``anchor(node)`` the first of them in
        the graph. Runs with the graph's insertion point just before ``anchor(node)``, so helper
        nodes it makes (``patterns.make_node``) go there."""

    def start(self, gm: torch.fx.GraphModule) -> None:
        """Called before a run looks at the first node: a pass that matches groups of nodes
        rather than single ones reads the whole graph here."""
        return None

    def anchor(self, node: torch.fx.Node) -> torch.fx.Node:
        """The node whose value the replacement takes over (the site itself, unless the site
        is counted at one node and computed up to another, as hand-written attention is)."""
        return node

    def absorbed(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        """Nodes the rewrite may leave unused (e.g. a repeat of KV heads), outermost first;
        each is erased if nothing uses it any more."""
        return []

    def __call__(self, gm: torch.fx.GraphModule, skip_reason: str | None = None) -> list[Site]:
        """Lower the sites of ``gm`` in place; with ``skip_reason``, only list them."""
        self.matched = 0
        sites = []
        erased: set[torch.fx.Node] = set()
        self.start(gm)
        for node in list(gm.graph.nodes):
            if node in erased:
                continue  # absorbed by an earlier site's rewrite
            try:
                if not self.is_site(node):
                    continue
                lowered = self.is_lowered(node)
            except Exception as e:  # contained: this node stays as traced (module docstring)
                sites.append(self._failed(node, "matching", e))
                continue
            name = _safe_site_name(node)
            if lowered:
                sites.append(Site(self.kind, name, True, None, self.name))
                continue
            stage = "matching"
            try:
                reason = skip_reason or self.why_not(node)
                if reason is None:
                    stage = "rewriting"
                    erased |= self._rewrite(gm.graph, node)
                    self.matched += 1
            except Exception as e:
                sites.append(self._failed(node, stage, e))
                continue
            sites.append(Site(self.kind, name, reason is None, reason, self.name))
        if self.matched:
            gm.graph.lint()
            gm.recompile()
        return sites if self.counted else []

    def _failed(self, node: torch.fx.Node, stage: str, error: Exception) -> Site:
        name = _safe_site_name(node)
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        reason = (
            f"xyserve error while {stage} this site, left as traced: {type(error).__name__}: {text}"
        ).rstrip(": ")
        log.warning("xyserve %s: %s at %s (%s): %s", self.name, self.kind, name, node.name, reason)
        log.debug("xyserve %s: traceback of the failure above", self.name, exc_info=error)
        return Site(self.kind, name, False, reason, self.name, failed=True)

    def _rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node) -> set[torch.fx.Node]:
        """Replace the site; returns the nodes erased. All-or-nothing (module docstring)."""
        anchor = self.anchor(node)
        absorbed = self.absorbed(node)
        before = anchor.prev  # everything inserted from here on lies between it and anchor
        try:
            with graph.inserting_before(anchor):
                made = self.replacement(node)
                if isinstance(made, dict):
                    replaced = made
                elif isinstance(made, torch.fx.Node):
                    replaced = {anchor: made}
                else:
                    target, args, kwargs = made
                    new = graph.call_function(target, args, kwargs)
                    value = infer_meta("call_function", target, args, kwargs)
                    if value is not None:
                        new.meta["example_value"] = value
                    replaced = {anchor: new}
            for old, new in replaced.items():
                _check_same_value(old, new)
                value = new.meta.get("example_value")
                new.meta = dict(old.meta)  # source location and module path, for explain
                if value is not None:
                    new.meta["example_value"] = value
        except BaseException:
            while anchor.prev is not before:  # newest first: each is used only by newer ones
                graph.erase_node(anchor.prev)
            raise
        for old, new in replaced.items():
            old.replace_all_uses_with(new)
            graph.erase_node(old)
        erased = set(replaced)
        pending = list(dict.fromkeys(d for d in absorbed if d not in erased))
        while True:  # users before what they use, whatever order absorbed() gave
            dead = [d for d in pending if not d.users]
            if not dead:
                return erased
            for d in dead:
                graph.erase_node(d)
                erased.add(d)
            pending = [d for d in pending if d not in erased]

    def options(self) -> dict[str, object]:
        """Settings that change what the pass does (by default the options named in
        ``reads``); part of ``uuid()``."""
        return {name: getattr(self.settings, name) for name in self.reads}

    def uuid(self) -> str:
        """Changes when the pass's code or its options change, for compile caches that key on
        the passes that ran. Its code: the modules of its classes (the base included) and every
        lowering module they use, found by following what each imports (``_lowering_modules``),
        so a helper split off a pass is covered without being listed."""
        classes = [c for c in type(self).__mro__ if issubclass(c, LoweringPass)]
        modules = _lowering_modules([inspect.getmodule(c) for c in classes])
        parts = dict.fromkeys(inspect.getsource(m) for m in modules)
        parts[type(self).__qualname__] = None
        parts[repr(sorted(self.options().items()))] = None
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _lowering_modules(start: list[ModuleType | None]) -> list[ModuleType]:
    """``start`` and, transitively, every module of this package whose functions, classes or
    module objects they hold (what each imported), in a fixed order."""
    found: dict[str, ModuleType] = {}
    todo = [m for m in start if m is not None]
    while todo:
        module = todo.pop()
        if module.__name__ in found:
            continue
        found[module.__name__] = module
        for value in vars(module).values():
            if isinstance(value, ModuleType):
                name = value.__name__
            elif isinstance(value, type) or inspect.isfunction(value):
                name = value.__module__
            else:
                continue  # constants, loggers, ops: the code that made them is covered
            if isinstance(name, str) and name.startswith(_PACKAGE) and name in sys.modules:
                todo.append(sys.modules[name])
    # The start modules first (a pass's own, then its bases'), the rest by name.
    first = [m.__name__ for m in start if m is not None]
    names = list(dict.fromkeys([*first, *sorted(found)]))
    return [found[n] for n in names]


def _safe_site_name(node: torch.fx.Node) -> str:
    try:
        return site_name(node)
    except Exception:  # a name is not worth failing a site for
        return node.name


def _check_same_value(old: torch.fx.Node, new: torch.fx.Node) -> None:
    """Raise unless ``new`` provably has ``old``'s shape and dtype (when both are traced): a
    replacement that changes either is a bug, and must not reach the graph."""
    a, b = fake_value(old), fake_value(new)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return
    if a.dtype != b.dtype:
        raise AssertionError(f"the replacement is {b.dtype}, the site {a.dtype}")
    same = a.dim() == b.dim() and all(
        statically_known_true(x == y) for x, y in zip(a.shape, b.shape, strict=True)
    )
    if not same:
        raise AssertionError(
            f"the replacement has shape {tuple(b.shape)}, the site {tuple(a.shape)}"
        )
