"""Every call a pattern reads, bound to its op's signature first.

Dynamo keeps calls as written: ``F.softmax(s, -1)``, ``F.softmax(input=s, dim=-1)`` and
``s.softmax(-1)`` are three different nodes, and ``torch.add(a, b, alpha=0.5)`` carries its
``alpha`` in ``node.kwargs``, where a pattern that only reads ``node.args`` never looks. So a
pattern never reads ``node.args`` itself: ``bind(node)`` names each argument (positional or
keyword, defaults filled) under one canonical name per op, and ``Call.refuse`` says which
argument the pattern does not understand (``alpha=0.5``, ``rounding_mode='floor'``, ``out=``),
so that the site is left alone with that reason instead of lowered without it.

Casts (``.to``, ``.type``, ``.type_as``, ``.float()``...) have too many overloads to bind
usefully; their meaning is read from the traced value instead (``cast_dtype``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["Call", "Signature", "bind", "describe", "op_name"]


@dataclass(frozen=True)
class Signature:
    """How one spelling of an op takes its arguments, in canonical names."""

    positional: tuple[str, ...]
    """Parameters that may be given by position, in order (a method's ``self`` is ``input``)."""
    keyword: tuple[str, ...] = ()
    """Keyword-only parameters."""
    defaults: dict[str, object] = field(default_factory=dict)
    """Values of the parameters not given; a parameter without one is required."""
    varargs: str | None = None
    """Name that collects extra positionals as a tuple (``x.permute(0, 2, 1, 3)``)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Python keyword -> canonical name, where a spelling names a parameter differently."""
    inert: frozenset[str] = frozenset()
    """Parameters that never change the value computed (``_stacklevel``, ``memory_format``)."""


def _sig(*positional: str, kw: tuple[str, ...] = (), **defaults: object) -> Signature:
    return Signature(tuple(positional), kw, defaults)


_OUT = {"out": None}

# Products, for site detection (lowering reads only matmul and bmm).
_MATMUL = _sig("input", "other", kw=("out",), **_OUT)
_BMM = Signature(("input", "other"), ("out",), dict(_OUT), aliases={"mat2": "other"})
_SOFTMAX = _sig("input", "dim", "dtype", dtype=None)
_F_SOFTMAX = Signature(
    ("input", "dim", "_stacklevel", "dtype"),
    defaults={"dim": None, "_stacklevel": 3, "dtype": None},
    inert=frozenset({"_stacklevel"}),
)
_SAFE_SOFTMAX = Signature(
    ("input", "dim", "dtype"), defaults={"dtype": None}, aliases={"self": "input"}
)
_TRANSPOSE = _sig("input", "dim0", "dim1")
_SWAPAXES = Signature(("input", "dim0", "dim1"), aliases={"axis0": "dim0", "axis1": "dim1"})
_BINARY = _sig("input", "other", kw=("out",), **_OUT)
_ADD = _sig("input", "other", kw=("alpha", "out"), alpha=1, out=None)
_DIV = _sig("input", "other", kw=("rounding_mode", "out"), rounding_mode=None, out=None)
_MASKED_FILL = _sig("input", "mask", "value")
_COPY_CLONE = Signature(
    ("input",), ("memory_format",), {"memory_format": None}, inert=frozenset({"memory_format"})
)
_COPY_CONTIGUOUS = Signature(
    ("input", "memory_format"), defaults={"memory_format": None}, inert=frozenset({"memory_format"})
)
_REPEAT_INTERLEAVE = _sig(
    "input", "repeats", "dim", kw=("output_size",), dim=None, output_size=None
)
_ADDMM = _sig("input", "mat1", "mat2", kw=("beta", "alpha", "out"), beta=1, alpha=1, out=None)

# call_function targets -> (canonical op, signature)
_FUNCTIONS: dict[object, tuple[str, Signature]] = {
    torch.matmul: ("matmul", _MATMUL),
    operator.matmul: ("matmul", _sig("input", "other")),
    torch.bmm: ("bmm", _BMM),
    torch.einsum: ("einsum", Signature(("equation",), varargs="operands")),
    torch.baddbmm: (
        "baddbmm",
        _sig("input", "batch1", "batch2", kw=("beta", "alpha", "out"), beta=1, alpha=1, out=None),
    ),
    F.softmax: ("softmax", _F_SOFTMAX),
    torch.softmax: ("softmax", _SOFTMAX),
    torch.ops.aten._safe_softmax: ("safe_softmax", _SAFE_SOFTMAX),
    torch.ops.aten._safe_softmax.default: ("safe_softmax", _SAFE_SOFTMAX),
    torch.transpose: ("transpose", _TRANSPOSE),
    torch.swapaxes: ("transpose", _SWAPAXES),
    torch.swapdims: ("transpose", _TRANSPOSE),
    torch.permute: ("permute", _sig("input", "dims")),
    operator.mul: ("mul", _sig("input", "other")),
    operator.imul: ("mul", _sig("input", "other")),
    torch.mul: ("mul", _BINARY),
    operator.truediv: ("div", _sig("input", "other")),
    operator.itruediv: ("div", _sig("input", "other")),
    torch.div: ("div", _DIV),
    torch.true_divide: ("div", _BINARY),
    operator.add: ("add", _sig("input", "other")),
    operator.iadd: ("add", _sig("input", "other")),
    torch.add: ("add", _ADD),
    torch.where: ("where", _sig("condition", "input", "other", kw=("out",), **_OUT)),
    torch.masked_fill: ("masked_fill", _MASKED_FILL),
    F.dropout: (
        "dropout",
        _sig("input", "p", "training", "inplace", p=0.5, training=True, inplace=False),
    ),
    torch.dropout: (
        "dropout",
        Signature(("input", "p", "training"), aliases={"train": "training"}),
    ),
    torch.clone: ("copy", _COPY_CLONE),
    torch.broadcast_to: ("expand", _sig("input", "size")),
    torch.reshape: ("reshape", _sig("input", "shape")),
    torch.unsqueeze: ("unsqueeze", _sig("input", "dim")),
    operator.getitem: ("getitem", _sig("input", "index")),
    torch.repeat_interleave: ("repeat_interleave", _REPEAT_INTERLEAVE),
    torch.addmm: ("addmm", _ADDMM),
    torch.t: ("t", _sig("input")),
    torch.full: (
        "full",
        _sig(
            "size",
            "fill_value",
            kw=("dtype", "layout", "device", "pin_memory", "requires_grad", "out"),
            dtype=None,
            layout=None,
            device=None,
            pin_memory=False,
            requires_grad=False,
            out=None,
        ),
    ),
    # A fill value as DistilBERT writes it: torch.tensor(torch.finfo(scores.dtype).min).
    torch.tensor: (
        "tensor",
        _sig(
            "data",
            kw=("dtype", "device", "requires_grad", "pin_memory"),
            dtype=None,
            device=None,
            requires_grad=False,
            pin_memory=False,
        ),
    ),
    torch._C._nn.linear: ("linear", _sig("input", "weight", "bias", bias=None)),
    torch._C._nn.scaled_dot_product_attention: (
        "sdpa",
        _sig(
            "query",
            "key",
            "value",
            "attn_mask",
            "dropout_p",
            "is_causal",
            "scale",
            kw=("enable_gqa",),
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=None,
            enable_gqa=False,
        ),
    ),
}

# .to(...) and .type(...): what they produce is read from the traced value, so every argument
# is inert here; a pattern checks the dtype and device of the result instead.
_CAST_KEYWORDS = ("dtype", "device", "non_blocking", "copy", "memory_format")
_CAST = Signature(
    ("input",),
    _CAST_KEYWORDS,
    dict.fromkeys(_CAST_KEYWORDS),
    varargs="rest",
    inert=frozenset(_CAST_KEYWORDS),
)

# call_method names -> (canonical op, signature); ``input`` is the tensor the method is on.
_METHODS: dict[str, tuple[str, Signature]] = {
    "matmul": ("matmul", _sig("input", "other")),
    "bmm": ("bmm", _BMM),
    "softmax": ("softmax", _SOFTMAX),
    "transpose": ("transpose", _TRANSPOSE),
    "swapaxes": ("transpose", _SWAPAXES),
    "swapdims": ("transpose", _TRANSPOSE),
    "permute": ("permute", Signature(("input",), varargs="dims")),
    "mul": ("mul", _sig("input", "other")),
    "mul_": ("mul", _sig("input", "other")),
    "div": ("div", _sig("input", "other", kw=("rounding_mode",), rounding_mode=None)),
    "div_": ("div", _sig("input", "other", kw=("rounding_mode",), rounding_mode=None)),
    "true_divide": ("div", _sig("input", "other")),
    "add": ("add", _sig("input", "other", kw=("alpha",), alpha=1)),
    "add_": ("add", _sig("input", "other", kw=("alpha",), alpha=1)),
    "where": ("where", _sig("input", "condition", "other")),
    "masked_fill": ("masked_fill", _MASKED_FILL),
    "masked_fill_": ("masked_fill", _MASKED_FILL),
    "clone": ("copy", _COPY_CLONE),
    "contiguous": ("copy", _COPY_CONTIGUOUS),
    "expand": ("expand", Signature(("input",), varargs="size")),
    "expand_as": ("expand_as", _sig("input", "other")),
    "reshape": ("reshape", Signature(("input",), varargs="shape")),
    "view": ("reshape", Signature(("input",), varargs="shape")),
    "view_as": ("view_as", _sig("input", "other")),
    "reshape_as": ("view_as", _sig("input", "other")),
    "unsqueeze": ("unsqueeze", _sig("input", "dim")),
    "repeat_interleave": ("repeat_interleave", _REPEAT_INTERLEAVE),
    "addmm": ("addmm", _sig("input", "mat1", "mat2", kw=("beta", "alpha"), beta=1, alpha=1)),
    "t": ("t", _sig("input")),
    # Casts: the dtype they produce is read from the traced value (cast_dtype).
    "to": ("cast", _CAST),
    "type": ("cast", _CAST),
    "type_as": ("cast", _sig("input", "other")),
    "float": ("cast", _COPY_CLONE),
    "half": ("cast", _COPY_CLONE),
    "bfloat16": ("cast", _COPY_CLONE),
    "double": ("cast", _COPY_CLONE),
}

# Parameters that give a shape and may come as one sequence or as several ints (``x.view(2, 3)``
# or ``x.view((2, 3))``): a single sequence is unpacked.
_SHAPE_VARARGS = frozenset({"dims", "size", "shape"})


def _spelling(node: object) -> tuple[str, Signature] | None:
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function":
        try:
            return _FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def op_name(node: object) -> str | None:
    """The canonical op ``node`` calls (``matmul`` for ``a @ b``, ``torch.matmul`` and
    ``a.matmul``), or None for a node that is not a known spelling of one."""
    spelling = _spelling(node)
    return spelling[0] if spelling is not None else None


def describe(node: torch.fx.Node) -> str:
    """How the call is written, for reasons: ``torch.add``, ``Tensor.masked_fill``."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return f"torch.ops.{target}"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module.startswith("torch.nn.functional"):
        return f"F.{name}"
    return f"torch.{name}"


@dataclass(frozen=True)
class Call:
    """A node's call with its arguments named (see the module docstring)."""

    node: torch.fx.Node
    op: str
    args: dict[str, object]
    """Every parameter by canonical name, defaults filled."""
    error: str | None = None
    """Why the arguments could not be bound (a keyword this op does not have...)."""
    signature: Signature = field(default_factory=lambda: Signature(()))

    def __getitem__(self, name: str) -> object:
        return self.args[name]

    def get(self, name: str, default: object = None) -> object:
        return self.args.get(name, default)

    def refuse(self, *understood: str) -> str | None:
        """None when every argument outside ``understood`` has its default value (or cannot
        change the result); else the reason a pattern must leave the call alone, naming the
        argument."""
        if self.error is not None:
            return self.error
        for name, value in self.args.items():
            if name in understood or name in self.signature.inert:
                continue
            if name not in self.signature.defaults:
                continue  # required: the pattern reads it, or it is a tensor operand
            default = self.signature.defaults[name]
            if not _is_default(value, default):
                return (
                    f"{describe(self.node)}(..., {name}={value!r}) at '{self.node.name}': "
                    f"the pattern does not understand {name}"
                )
        return None


def _is_default(value: object, default: object) -> bool:
    if default is None:
        return value is None
    if isinstance(value, (torch.fx.Node, torch.Tensor)):
        return False  # only known at run time: cannot be shown to be the default
    try:
        return bool(value == default)
    except Exception:  # values that do not compare (e.g. a SymBool without a hint)
        return False


def bind(node: object) -> Call | None:
    """The call ``node`` makes, its arguments named; None if ``node`` is not a known
    spelling of an op (see ``op_name``)."""
    spelling = _spelling(node)
    if spelling is None:
        return None
    op, sig = spelling
    args: dict[str, object] = {}
    error = None
    positional = list(node.args)
    for name, value in zip(sig.positional, positional, strict=False):
        args[name] = value
    extra = positional[len(sig.positional) :]
    if sig.varargs is not None:
        if (
            len(extra) == 1
            and sig.varargs in _SHAPE_VARARGS
            and isinstance(extra[0], (list, tuple))
        ):
            extra = list(extra[0])
        if extra or sig.varargs not in node.kwargs:
            args[sig.varargs] = tuple(extra)
    elif extra:
        error = f"{describe(node)} has {len(positional)} positional arguments, more than expected"
    known = set(sig.positional) | set(sig.keyword) | {sig.varargs}
    for key, value in node.kwargs.items():
        name = sig.aliases.get(key, key)
        if name not in known:
            error = error or f"{describe(node)} with keyword {key}= ('{node.name}'): not understood"
            continue
        if name in args and name != sig.varargs:
            error = error or f"{describe(node)} got {key} twice"
            continue
        if name == sig.varargs and isinstance(value, (list, tuple)):
            value = tuple(value)
        args[name] = value
    for name in (*sig.positional, *sig.keyword):
        if name not in args:
            if name in sig.defaults:
                args[name] = sig.defaults[name]
            else:
                error = error or f"{describe(node)} is missing its argument {name}"
    return Call(node, op, args, error, sig)
