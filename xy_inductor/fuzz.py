"""A differential fuzzer for the lowering: random attention and linear subgraphs, each compiled
with xyserve and compared with eager.

    python -m xy_inductor.fuzz --cases 10000 --seed 0      # make fuzz N=10000 SEED=0
    python -m xy_inductor.fuzz --seed 0 --case 1234         # one case: its program and result
    python -m xy_inductor.fuzz --load tests/fuzz_cases/1-593.pt  # a saved case

Each case is a small Python function drawn from a grammar of the spellings real models and
PyTorch's own rewrites use (``CASE GRAMMAR`` below), in random orders and with random sizes
(1 and odd ones included), dtypes (float32, bfloat16, float16), dynamic or static shapes, and
keyword or positional arguments. Its source is compiled with ``exec`` under a name of its own,
so every case is a fresh Dynamo trace. The compiled function runs through the xyserve backend
(``compile_graph``, exactly what ``torch.compile(backend="xyserve")`` runs); a copy of each
graph is lowered on the side to learn what was lowered and why the rest was not.

A case is *wrong* when its compiled output differs from eager's by more than the dtype's
tolerance (norm-relative: float32 1e-5, bfloat16/float16 1e-2) and is also further from the
same program run in float64 than eager is, by more than that tolerance (half-precision eager can
itself be further than 1e-2 from the exact answer, e.g. scores rounded to float16 before a
softmax; such cases are counted apart), or has NaN or inf where eager has none, or fails where
eager runs. One difference is known and counted apart: where eager's
plain softmax gives NaN on a row whose every key is masked with -inf, the op gives 0
(``lowering/manual_attention.py``). Wrong must be 0; each wrong case ever found is kept as a
fixed-seed regression test in ``tests/test_fuzz.py``.

Cost: one Dynamo trace per case on tiny tensors, ``torch._dynamo.reset()`` after each so
that neither caches nor recompile limits carry over; about 0.1 s a static case and 0.3 s a
dynamic one on a 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import math
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Case",
    "CaseResult",
    "FuzzSummary",
    "load_case",
    "make_case",
    "run_case",
    "run_fuzz",
    "save_case",
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
_DTYPES = (torch.float32, torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class Case:
    """One generated program and its inputs."""

    seed: int
    index: int
    kind: str  # attention | sdpa | linear | block
    source: str
    dtype: torch.dtype
    dynamic: bool
    inputs: dict[str, object]  # name -> value, in the function's argument order
    params: dict[str, torch.Tensor]  # module parameters (linear and block cases)
    fuse_siblings: bool = False


@dataclasses.dataclass(frozen=True)
class CaseResult:
    case: Case
    sites: tuple[tuple[str, bool, str | None, bool], ...]  # (kind, lowered, reason, failed)
    status: str  # ok | closer | known | wrong | crashed | invalid
    detail: str = ""
    error: float = 0.0


# -- CASE GRAMMAR ------------------------------------------------------------------------------
# A case is drawn by a _Builder, which writes Python source line by line. Every choice is a
# spelling seen in a model or in PyTorch (the comment next to it says where), or a spelling the
# lowering must refuse (marked "refused"), so that the fuzzer checks both sides.


class _Builder:
    def __init__(self, rng: random.Random, dtype: torch.dtype, dynamic: bool) -> None:
        self.rng = rng
        self.dtype = dtype
        self.dynamic = dynamic
        self.lines: list[str] = []
        self.names = Counter()

    def pick(self, *options: object) -> object:
        return self.rng.choice(options)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def new(self, base: str) -> str:
        self.names[base] += 1
        return f"{base}{self.names[base]}"

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)


def _tensor(
    g: torch.Generator, shape: Sequence[int], dtype: torch.dtype, scale=1.0
) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _keep_mask(
    b: _Builder, g: torch.Generator, lq: int, lk: int, shape: tuple[int, ...], full_rows: bool
) -> torch.Tensor:
    """A bool mask (True: attend) broadcastable to [..., Lq, Lk]."""
    kind = b.pick("causal", "random", "padding")
    if kind == "causal" and (len(shape) < 2 or shape[-2] != lq):
        kind = "random"  # a mask without a query dim cannot be causal
    if kind == "causal":  # aligned bottom-right, as a KV cache is
        keep = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        keep = keep.expand(shape).clone()
    elif kind == "padding":  # left padding of some rows
        keep = torch.ones(shape, dtype=torch.bool)
        pad = int(torch.randint(0, lk, (), generator=g))
        keep[..., :pad] = False
    else:
        keep = torch.rand(shape, generator=g) > 0.4
    # With full_rows, one row has every key masked: eager's softmax gives NaN there, the op 0
    # (the known difference). That row is masked alike in every head, and every other row sees
    # a key: a row masked in some heads only is mixed with the others by a block's output
    # projection, which turns the op's zeros into finite values where eager's row is NaN (case
    # 3160 of seed 0, before). A mask over keys only, left random, masks every row or none.
    if not full_rows or keep.dim() >= 2:
        keep[..., -1] = True
    if full_rows and keep.dim() >= 2 and keep.shape[-2] > 1:
        keep[..., 0, :] = False
    return keep


def _mask_shape(
    b: _Builder, batch: int, heads: int, lq: int, lk: int, rank: int, sdpa: bool = False
) -> tuple:
    if sdpa:  # SDPA itself wants a mask of at least 2 dims
        return b.pick(
            (lq, lk),
            (1, 1, lq, lk),
            (batch, 1, lq, lk),
            (1, heads, lq, lk),
            (batch, heads, lq, lk),
            (1, lk),
        )
    if rank == 4:
        return b.pick(
            (lq, lk),
            (1, 1, lq, lk),
            (batch, 1, lq, lk),
            (1, heads, lq, lk),
            (batch, heads, lq, lk),
            (lk,),
            (1, 1, 1, lk),
        )
    if rank == 3:
        return b.pick((lq, lk), (1, lq, lk), (batch * heads, lq, lk), (lk,))
    return b.pick((lq, lk), (lk,))


def _attention_case(b: _Builder, g: torch.Generator, kind: str) -> tuple[list[str], dict, dict]:
    """An attention program: over inputs q, k, v (and m or keep); or, for ``block``, a module
    over x with q/k/v projections before it and an output projection after (sibling linears
    and attention in one graph, as a decoder layer has them). Returns (argument names, inputs,
    parameters)."""
    dtype = b.dtype
    batch = b.pick(1, 1, 2, 3)
    hq = b.pick(1, 2, 4, 8)
    group = b.pick(*[x for x in (1, 2, 4, 8) if hq % x == 0])
    hkv = hq // group
    lq = b.pick(1, 2, 3, 5, 7, 8, 13)
    lk = b.pick(lq, lq, lq + 1, lq + 4, 1) if kind == "attention" else b.pick(lq, lq + 3, 1)
    d = b.pick(1, 4, 7, 8, 16)
    dv = b.pick(d, d, d, 5)
    layout = b.pick("4d", "4d", "4d", "merged", "bart", "3d") if kind == "attention" else "4d"
    if layout != "4d":
        hkv, group = hq, 1  # bmm needs equal batch
    inputs: dict[str, object] = {}
    params: dict[str, torch.Tensor] = {}
    if kind == "block":  # one sequence length: self-attention
        lk, dv = lq, d
        hidden = hq * d
        inputs["x"] = _tensor(g, (batch, lq, hidden), dtype)
        for name, rows in (("wq", hq * d), ("wk", hkv * d), ("wv", hkv * d), ("wo", hidden)):
            params[name] = _tensor(g, (rows, hidden), dtype, hidden**-0.5)
        if b.chance(0.3):  # Qwen2 has biases on q/k/v
            for name, rows in (("bq", hq * d), ("bk", hkv * d), ("bv", hkv * d)):
                params[name] = _tensor(g, (rows,), dtype, 0.1)
    elif layout == "3d":
        inputs["q"] = _tensor(g, (batch * hq, lq, d), dtype)
        inputs["k"] = _tensor(g, (batch * hkv, lk, d), dtype)
        inputs["v"] = _tensor(g, (batch * hkv, lk, dv), dtype)
    else:
        inputs["q"] = _tensor(g, (batch, hq, lq, d), dtype)
        inputs["k"] = _tensor(g, (batch, hkv, lk, d), dtype)
        inputs["v"] = _tensor(g, (batch, hkv, lk, dv), dtype)
    full_rows = b.chance(0.15)
    rank = 4 if layout in ("4d", "bart") else 3
    mask_kind = b.pick(None, "add", "add", "bool", "bool")
    sdpa = kind == "sdpa" or (kind == "block" and b.chance(0.3))
    if mask_kind == "add":
        shape = _mask_shape(b, batch, hq, lq, lk, rank, sdpa)
        mag = b.pick(0.5, 2.0, 8.0)  # ALiBi-like biases reach a few units
        mask = torch.randn(shape, generator=g) * mag
        masked = _keep_mask(b, g, lq, lk, shape, full_rows)
        fill = b.pick(torch.finfo(dtype).min, -math.inf, torch.finfo(dtype).min)
        mask = mask.masked_fill(~masked, fill)
        # Usually in q's dtype (Hugging Face builds it so); sometimes float32 (refused for
        # half-precision q: rounding it would change the scores).
        inputs["m"] = mask.to(dtype if b.chance(0.85) else torch.float32)
    elif mask_kind == "bool":
        shape = _mask_shape(b, batch, hq, lq, lk, rank, sdpa)
        inputs["keep"] = _keep_mask(b, g, lq, lk, shape, full_rows)
    if kind == "block":
        _projections(b, params, hq, hkv, d)
    if sdpa:
        _sdpa_body(b, inputs, hq, hkv, group, lq, lk, block=kind == "block")
    else:
        ctx = dict(batch=batch, hq=hq, hkv=hkv, group=group, lq=lq, lk=lk, d=d, layout=layout)
        _manual_body(b, inputs, ctx, block=kind == "block")
    if kind == "block":
        b.emit(
            b.pick(
                "o = o.transpose(1, 2).reshape(B, L, -1)",
                "o = o.transpose(1, 2).contiguous().view(B, L, -1)",
            )
        )
        b.emit(b.pick("return F.linear(o, self.wo)", "return o @ self.wo.t()"))
    return list(inputs), inputs, params


def _projections(b: _Builder, params: dict, hq: int, hkv: int, d: int) -> None:
    """q/k/v from x as a decoder layer computes them (Llama, Qwen2 with biases)."""
    b.emit("B, L, _ = x.shape")
    for name, heads in (("q", hq), ("k", hkv), ("v", hkv)):
        bias = f", self.b{name}" if f"b{name}" in params else ""
        linear = b.pick(
            f"F.linear(x, self.w{name}{bias})",
            f"x @ self.w{name}.t()" + (f" + self.b{name}" if bias else ""),
        )
        split = b.pick(
            f"view(B, L, {heads}, {d})", f"view(B, L, -1, {d})", f"reshape(B, L, {heads}, -1)"
        )
        b.emit(f"{name} = ({linear}).{split}.transpose(1, 2)")


def _scale_literal(b: _Builder, d: int) -> str:
    return b.pick(
        repr(1 / math.sqrt(d)),
        "q.shape[-1] ** -0.5",  # Llama-style, symbolic under dynamic=True
        "0.125",
        "1.0 / math.sqrt(q.shape[-1])",
    )


def _repeat(b: _Builder, group: int, hkv: int) -> tuple[str, str]:
    """K and V repeated to the query heads, the same way for both."""
    if group == 1:
        return "k", "v"
    spelling = b.pick("repeat_kv", "interleave", "broadcast" if hkv == 1 else "repeat_kv")
    if spelling == "repeat_kv":  # transformers' repeat_kv (Llama, Qwen2, Mistral...)
        return f"repeat_kv(k, {group})", f"repeat_kv(v, {group})"
    if spelling == "interleave":
        form = b.pick("{x}.repeat_interleave({n}, dim=1)", "torch.repeat_interleave({x}, {n}, 1)")
        return form.format(x="k", n=group), form.format(x="v", n=group)
    return "k", "v"  # one KV head: matmul broadcasts it


def _manual_body(b: _Builder, inputs: dict, c: dict, block: bool = False) -> None:
    """softmax(q @ kᵀ · scale + mask) @ v, in one of many spellings."""
    layout, group = c["layout"], c["group"]
    k, v = _repeat(b, group, c["hkv"])
    if layout in ("merged", "bart"):  # batch and heads merged, views around (BART, OPT)
        b.emit("B, H, Lq, D = q.shape")
        q3 = b.pick(
            "q.reshape(B * H, Lq, D)", "q.view(-1, q.shape[2], q.shape[3])", "q.flatten(0, 1)"
        )
        b.emit(f"q = {q3}")
        b.emit(f"k = {b.pick('k.reshape(B * H, -1, D)', 'k.flatten(0, 1)')}")
        b.emit(f"v = {b.pick('v.reshape(B * H, -1, v.shape[-1])', 'v.flatten(0, 1)')}")
        k, v = "k", "v"
    # q side: a scale on q (T5 folds it into the weights; some code scales q first)
    if b.chance(0.25):
        b.emit(
            b.pick(
                f"q = q * {_scale_literal(b, c['d'])}",
                "q = q / math.sqrt(q.shape[-1])",  # DistilBERT
            )
        )
    # k side: kᵀ in any spelling, copies around it, a scale after it
    nd = 4 if layout in ("4d",) else 3
    if nd == 4:
        kt = b.pick(
            f"{k}.transpose(-1, -2)",
            f"{k}.transpose(2, 3)",
            f"{k}.transpose(3, 2)",
            f"{k}.permute(0, 1, 3, 2)",
            f"{k}.permute(dims=(0, 1, 3, 2))",
            f"{k}.mT",
            f"{k}.swapaxes(-2, -1)",
            f"torch.transpose({k}, -2, -1)",
            f"{k}.transpose(dim0=-1, dim1=-2)",
        )
    else:
        kt = b.pick(
            f"{k}.transpose(1, 2)", f"{k}.transpose(-1, -2)", f"{k}.permute(0, 2, 1)", f"{k}.mT"
        )
    if b.chance(0.2):
        kt = f"{kt}.contiguous()"
    if b.chance(0.15):
        kt = f"({kt} * {_scale_literal(b, c['d'])})"  # scale after the transpose
    if layout in ("merged", "bart"):
        product = b.pick(f"torch.bmm(q, {kt})", f"torch.matmul(q, {kt})", f"q @ {kt}")
    else:
        product = b.pick(
            f"q @ {kt}",
            f"torch.matmul(q, {kt})",
            f"q.matmul({kt})",
            f"torch.matmul(input=q, other={kt})",
        )
    b.emit(f"s = {product}")
    # the score chain, in a random order
    steps = []
    if b.chance(0.7):
        steps.append("scale")
    if "m" in inputs:
        steps.append("add")
    if "keep" in inputs:
        steps.append("fill")
    if b.chance(0.2):
        steps.append("cast")
    if b.chance(0.1):
        steps.append("copy")
    refused = None
    if b.chance(0.12):
        refused = b.pick(
            "softcap", "alpha", "rounding", "narrow", "tensor_scale", "fill_small", "inplace"
        )
        steps.append(refused)
    b.rng.shuffle(steps)
    wide = False
    for step in steps:
        if step == "scale":
            lit = _scale_literal(b, c["d"])
            b.emit(
                b.pick(
                    f"s = s * {lit}",
                    f"s = {lit} * s",
                    f"s = torch.mul(s, {lit})",
                    f"s = s / {math.sqrt(c['d'])!r}",
                    "s = torch.div(s, 2.0)",
                    "s = s.div(3.0)",
                    f"s *= {lit}",
                )
            )
        elif step == "add":
            mask = "m"
            if layout == "bart" and inputs["m"].dim() == 4:
                # BART: add the [B, 1, Lq, Lk] mask to the scores viewed per head
                b.emit("s = s.view(B, H, Lq, -1) + m")
                b.emit("s = s.view(B * H, Lq, -1)")
                continue
            if layout == "bart":
                pass
            elif inputs["m"].dim() == nd and b.chance(0.3):
                mask = b.pick("m.expand_as(s)", "m.expand(s.shape)")
            b.emit(
                b.pick(
                    f"s = s + {mask}",
                    f"s = {mask} + s",
                    f"s = torch.add(s, {mask})",
                    f"s = s.add({mask})",
                    f"s += {mask}",
                    f"s = torch.add(input=s, other={mask})",
                )
            )
        elif step == "fill":
            fills = ["float('-inf')", "torch.finfo(s.dtype).min", "-math.inf"]
            fills.append("torch.full((), -float('inf'), dtype=q.dtype, device=q.device)")  # _sfdp
            if "double()" not in "\n".join(b.lines):  # torch.tensor(finfo(float64).min) raises
                fills.append("torch.tensor(torch.finfo(s.dtype).min)")  # DistilBERT
            fill = b.pick(*fills)
            keep = "keep"
            if layout == "bart" and inputs["keep"].dim() == 4:
                b.emit(f"s = s.view(B, H, Lq, -1).masked_fill(~keep, {fill})")
                b.emit("s = s.view(B * H, Lq, -1)")
                continue
            if b.chance(0.15):  # a bool mask added, 0/1 (PyTorch's test_fused_attention.py)
                b.emit(
                    b.pick(
                        f"s = s + {keep}",
                        f"s = {keep} + s",
                        f"s += {keep}",
                        f"s = torch.add(s, {keep}.expand_as(s))",
                    )
                )
                continue
            b.emit(
                b.pick(
                    f"s = s.masked_fill(~{keep}, {fill})",
                    f"s = s.masked_fill(mask={keep}.logical_not(), value={fill})",
                    f"s = torch.where({keep}, s, {fill})",
                    f"s = torch.where(~{keep}, {fill}, s)",
                    f"s = torch.masked_fill(s, ~{keep}, {fill})",
                    # DistilBERT, PyTorch's _sfdp_pattern_15/_20: the mask expanded as the scores
                    f"s = s.masked_fill(({keep} == 0).expand_as(s), {fill})",
                    f"s = torch.where({keep}.expand_as(s), s, {fill})",
                )
            )
        elif step == "cast":
            b.emit(
                b.pick(
                    "s = s.float()",
                    "s = s.to(torch.float32)",
                    "s = s.to(dtype=torch.float32)",
                    "s = s.double()",
                )
            )
            wide = True
        elif step == "copy":
            b.emit(b.pick("s = s.clone()", "s = s.contiguous()"))
        elif step == "softcap":  # Gemma 2 (refused: tanh)
            b.emit("s = torch.tanh(s / 30.0) * 30.0")
        elif step == "alpha":  # refused: alpha
            if "m" in inputs and layout != "bart":
                b.emit("s = torch.add(s, m, alpha=0.5)")
            else:
                b.emit("s = torch.add(s, 1.0, alpha=0.5)")
        elif step == "rounding":  # refused: rounding_mode
            b.emit("s = torch.div(s, 0.5, rounding_mode='trunc')")
        elif step == "narrow":  # refused when q is float32: the op would not round like this
            b.emit("s = s.half()")
        elif step == "tensor_scale":  # refused: a tensor scale
            b.emit("s = s * torch.ones(1, dtype=s.dtype)")
        # (Their conditions depend on positions, not on the scores' values: a condition on
        # values flips where lowered linears round differently, which is not a lowering bug.)
        elif step == "fill_small":  # refused: -1e4 is no "large negative" in float32
            b.emit("s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -1e4)")
        elif step == "inplace":  # refused: an in-place fill whose result is not used
            b.emit("s.masked_fill_(torch.ones_like(s, dtype=torch.bool).triu(1), float('-inf'))")
    # softmax, possibly in float32
    dim = b.pick("-1", str(nd - 1))
    if refused is None and b.chance(0.05):
        dim = "-2"  # refused: not the last dim
    softmax = b.pick(
        f"torch.softmax(s, {dim})",
        f"F.softmax(s, dim={dim})",
        f"F.softmax(input=s, dim={dim})",
        f"s.softmax({dim})",
        f"s.softmax(dim={dim})",
        f"F.softmax(s, dim={dim}, dtype=torch.float32)",
        f"torch.softmax(s.float(), {dim})",
        f"torch.ops.aten._safe_softmax(s, {dim})",  # PyTorch's SDPA decomposition
    )
    if "float32" in softmax or "float()" in softmax:
        wide = True
    if "m" in inputs and inputs["m"].dtype != b.dtype:
        wide = True  # a float32 mask promoted the scores
    b.emit(f"p = {softmax}")
    if wide or "half()" in "\n".join(b.lines):
        b.emit(
            b.pick(
                "p = p.to(q.dtype)", "p = p.type_as(q)", "p = p.to(v.dtype)", "p = p.type(v.dtype)"
            )
        )
    if b.chance(0.25):  # nn.Dropout in eval; p=0 in training is the identity too
        b.emit(
            b.pick(
                "p = F.dropout(p, 0.1, False)",
                "p = F.dropout(p, p=0.1, training=False)",
                "p = torch.dropout(p, 0.2, False)",
                "p = F.dropout(p, p=0.0)",
            )
        )
    if b.chance(0.15):
        b.emit(b.pick("p = p.clone()", "p = p.contiguous()"))
    v_arg = v
    if b.chance(0.15):
        v_arg = f"{v}.contiguous()"
    if block:
        b.emit(f"o = {b.pick(f'p @ {v_arg}', f'torch.matmul(p, {v_arg})')}")
        return
    if layout in ("merged", "bart"):
        b.emit(f"o = {b.pick(f'torch.bmm(p, {v_arg})', f'p @ {v_arg}')}")
        b.emit(
            b.pick(
                "o = o.view(B, H, Lq, -1)",
                "o = o.reshape(B, H, Lq, -1)",
                "o = o.view(B, H, Lq, -1).transpose(1, 2).reshape(B, Lq, -1)",
                "pass",
            )
        )
    else:
        b.emit(f"o = {b.pick(f'p @ {v_arg}', f'torch.matmul(p, {v_arg})', f'p.matmul({v_arg})')}")
        if nd == 4:
            b.emit(
                b.pick(
                    "o = o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)",
                    "o = o.view(o.shape[0], -1, o.shape[-1])",  # needs eager's layout
                    "o = o.transpose(1, 2).contiguous()",
                    "pass",
                )
            )
    returned = b.pick("o", "o", "o", "o", "o", "o", "o", "(o, p)", "(o, s)")  # (o, p): refused
    b.emit(f"return {returned}")


def _sdpa_body(
    b: _Builder, inputs: dict, hq: int, hkv: int, group: int, lq: int, lk: int, block: bool
) -> None:
    """F.scaled_dot_product_attention in its argument forms."""
    k, v = "k", "v"
    gqa = "False"
    if hkv != hq:
        how = b.pick("repeat", "flag", "symbolic")
        if how == "repeat":  # Hugging Face's sdpa path with a mask
            k, v = _repeat(b, group, 2)
        elif how == "flag":
            gqa = "True"
        else:  # a SymBool under dynamic=True
            gqa = "q.shape[1] != k.shape[1]"
    kwargs = []
    mask = "m" if "m" in inputs else ("keep" if "keep" in inputs else None)
    causal = None
    if mask is None and b.chance(0.5) and lq <= lk:
        causal = b.pick("True", "causal")
        if causal == "causal":
            b.emit("causal = q.shape[2] > 1 or True")  # a Python bool variable
    if b.chance(0.5):
        kwargs.append(f"scale={b.pick('0.3', 'q.shape[-1] ** -0.5', '1.0')}")
    if gqa != "False" or b.chance(0.2):
        kwargs.append(f"enable_gqa={gqa}")
    if b.chance(0.5) and mask is not None:  # positional, as Hugging Face passes the mask
        call = f"F.scaled_dot_product_attention(q, {k}, {v}, {mask}, 0.0, False"
    else:
        call = f"F.scaled_dot_product_attention(q, {k}, {v}"
        if mask is not None:
            kwargs.insert(0, f"attn_mask={mask}")
        if causal is not None:
            kwargs.insert(0, f"is_causal={causal}")
        if b.chance(0.2):
            kwargs.append("dropout_p=0.0")
    call += "".join(f", {a}" for a in kwargs) + ")"
    b.emit(f"o = {call}")
    if not block:
        b.emit(
            b.pick(
                "return o",
                "return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)",
                "return o.view(o.shape[0], -1, o.shape[-1])",
            )
        )


def _linear_case(b: _Builder, g: torch.Generator) -> tuple[list[str], dict, dict]:
    """A module's forward over x with parameters w [N, K], b [N], w_kn [K, N]."""
    m = b.pick(1, 2, 3, 7, 17)
    kdim, n = b.pick(1, 3, 8, 16, 33), b.pick(1, 3, 8, 16, 33)
    lead = b.pick((m,), (2, m), (1, m))
    dtype = b.dtype
    inputs = {"x": _tensor(g, (*lead, kdim), dtype)}
    params = {
        "w": _tensor(g, (n, kdim), dtype, kdim**-0.5),
        "b": _tensor(g, (n,), dtype),
        "w2": _tensor(g, (n, kdim), dtype, kdim**-0.5),
        "w_kn": _tensor(g, (kdim, n), dtype, kdim**-0.5),
    }
    forms = [
        "F.linear(x, self.w, self.b)",  # nn.Linear
        "F.linear(x, self.w)",
        "F.linear(input=x, weight=self.w, bias=self.b)",
        "x @ self.w.t() + self.b",
        "self.b + x @ self.w.T",
        "torch.matmul(x, self.w.t())",
        "x.matmul(self.w.transpose(0, 1))",
        "torch.add(x @ self.w.t(), self.b)",
        "torch.add(x @ self.w.t(), self.b, alpha=0.5)",  # refused as a bias: alpha
        "x @ self.w_kn",  # a [K, N] weight
        "torch.matmul(x, self.w.permute(1, 0))",
        "x @ self.w.mT",
    ]
    if len(lead) == 1:  # GPT-2's Conv1D on a 2-D view
        forms += [
            "torch.addmm(self.b, x, self.w_kn)",
            "torch.addmm(self.b, x, self.w_kn, beta=1.0, alpha=1.0)",
            "torch.addmm(self.b, x, self.w_kn, alpha=2.0)",
        ]  # refused: alpha
    y = b.pick(*forms)
    b.emit(f"y = {y}")
    if b.chance(0.3):  # a sibling on the same input (q/k/v, gate/up)
        b.emit(f"z = {b.pick('F.linear(x, self.w2)', 'x @ self.w2.t()')}")
        b.emit("y = torch.cat([y, z], -1)")
    b.emit(b.pick("return y", "return F.silu(y)", "return y * 2.0"))
    return ["x"], inputs, params


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run seeded ``seed`` (deterministic: the same pair, the same case)."""
    rng = random.Random(f"xyserve-fuzz:{seed}:{index}")
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    dtype = rng.choice(_DTYPES)
    dynamic = rng.random() < 0.25
    kind = rng.choice(("attention", "attention", "attention", "sdpa", "linear", "block"))
    b = _Builder(rng, dtype, dynamic)
    if kind == "linear":
        names, inputs, params = _linear_case(b, g)
    else:
        names, inputs, params = _attention_case(b, g, kind)
    header = f"def forward({'self, ' if params else ''}{', '.join(names)}):"
    source = "\n".join([header, *b.lines]) + "\n"
    return Case(
        seed,
        index,
        kind,
        source,
        dtype,
        dynamic,
        inputs,
        params,
        fuse_siblings=kind in ("linear", "block") and rng.random() < 0.3,
    )


def save_case(case: Case, path: str) -> None:
    """Write ``case`` (program and tensors) to ``path``: a regression test that no later change
    of the grammar can turn into another program."""
    torch.save(dataclasses.asdict(case), path)


def load_case(path: str) -> Case:
    """A case written by ``save_case``."""
    return Case(**torch.load(path, weights_only=True))


# -- running a case ----------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' repeat_kv, as the generated programs call it."""
    b, h, length, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, length, d).reshape(b, h * n, length, d)


def _callable(case: Case) -> Callable:
    namespace = {"torch": torch, "F": F, "math": math, "repeat_kv": repeat_kv}
    filename = f"<xyserve-fuzz {case.seed}:{case.index}>"
    exec(compile(case.source, filename, "exec"), namespace)  # our own grammar's source
    fn = namespace["forward"]
    if not case.params:
        return fn
    module_cls = type("FuzzModule", (nn.Module,), {"forward": fn})
    module = module_cls()
    for name, value in case.params.items():
        module.register_parameter(name, nn.Parameter(value.clone(), requires_grad=False))
    return module.eval()


def _flat(out: object) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _compare(
    case: Case, got: list[torch.Tensor], want: list[torch.Tensor]
) -> tuple[str, str, float]:
    if len(got) != len(want):
        return "wrong", f"{len(got)} outputs, eager {len(want)}", math.inf
    worst, known = 0.0, False
    for a, e in zip(got, want, strict=True):
        if a.shape != e.shape or a.dtype != e.dtype:
            return (
                "wrong",
                f"output {tuple(a.shape)} {a.dtype}, eager {tuple(e.shape)} {e.dtype}",
                math.inf,
            )
        a64, e64 = a.double(), e.double()
        a_bad, e_bad = ~torch.isfinite(a64), ~torch.isfinite(e64)
        if (a_bad & ~e_bad).any():
            return "wrong", "NaN/inf where eager is finite", math.inf
        nan_only_eager = e_bad & ~a_bad
        if nan_only_eager.any():
            # The known difference: eager's plain softmax over a row masked everywhere with
            # -inf is NaN, the op gives 0 there.
            if not (torch.isnan(e64[nan_only_eager]).all() and (a64[nan_only_eager] == 0).all()):
                return "wrong", "finite where eager is inf, or not 0 where eager is NaN", math.inf
            known = True
        both = ~a_bad & ~e_bad
        if ((a_bad & e_bad) & (a64.nan_to_num(1.0) != e64.nan_to_num(1.0))).any():
            return "wrong", "a different inf than eager's", math.inf
        diff = (a64[both] - e64[both]).norm()
        ref = e64[both].norm().clamp_min(1e-30)
        err = float(diff / ref) if both.any() else 0.0
        worst = max(worst, err)
    if worst > TOLERANCE[case.dtype]:
        return "wrong", f"relative error {worst:.2e} > {TOLERANCE[case.dtype]:.0e}", worst
    return ("known" if known else "ok"), "", worst


def run_case(case: Case) -> CaseResult:
    """Compile ``case`` with xyserve, run it and eager, compare."""
    from xy_inductor.backend import compile_graph, fallback_reason
    from xy_inductor.config import XyConfig
    from xy_inductor.lowering import lower_graph

    config = XyConfig(fuse_siblings=case.fuse_siblings)
    reports = []

    def xyserve_fuzz(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        # What was lowered and why not, from a copy; the graph itself goes through the backend.
        side = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        lowering = config.lowering_options()
        reports.append(lower_graph(side, lowering, skip_reason=fallback_reason(example_inputs)))
        return compile_graph(gm, example_inputs, config)

    args = [t.clone() if isinstance(t, torch.Tensor) else t for t in case.inputs.values()]
    torch._dynamo.reset()
    try:
        fn = _callable(case)
        with torch.no_grad():
            expected = _flat(fn(*args))
    except Exception as e:  # a program the grammar should not have drawn
        return CaseResult(case, (), "invalid", f"eager: {type(e).__name__}: {e}")
    try:
        compiled = torch.compile(fn, backend=xyserve_fuzz, dynamic=case.dynamic)
        with torch.no_grad():
            got = _flat(compiled(*args))
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return CaseResult(case, _sites(reports), "crashed", f"{type(e).__name__}: {text}")
    finally:
        torch._dynamo.reset()
    status, detail, err = _compare(case, got, expected)
    if status == "wrong" and math.isfinite(err):
        # Eager in half precision may itself be far from the exact answer: compare with the
        # same program in float64 before calling the compiled result wrong.
        wide = copy.deepcopy(fn).double() if isinstance(fn, nn.Module) else fn
        with torch.no_grad():
            exact = _flat(wide(*[_widen(t) for t in case.inputs.values()]))
        exact = [
            t.to(e.dtype) if t.is_floating_point() else t
            for t, e in zip(exact, expected, strict=True)
        ]
        status64, _, err64 = _compare(case, got, exact)
        _, _, eager64 = _compare(case, expected, exact)
        # As close to the exact answer as eager is, give or take the tolerance.
        if status64 in ("ok", "known") or err64 <= eager64 + TOLERANCE[case.dtype]:
            return CaseResult(
                case,
                _sites(reports),
                "closer",
                f"{detail}; from float64: {err64:.1e}, eager's {eager64:.1e}",
                err,
            )
    return CaseResult(case, _sites(reports), status, detail, err)


def _widen(t: object) -> object:
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _sites(reports: list) -> tuple[tuple[str, bool, str | None, bool], ...]:
    return tuple((s.kind, s.lowered, s.reason, s.failed) for r in reports for s in r.sites)


# -- a run ---------------------------------------------------------------------------------------


def reason_class(reason: str) -> str:
    """A reason with its node names and sizes taken out, so that like reasons count together."""
    reason = re.sub(r"'[^']*'", "'…'", reason)
    reason = re.sub(r"\([^()]*\d[^()]*\)", "(…)", reason)
    reason = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "N", reason)
    return reason


@dataclasses.dataclass
class FuzzSummary:
    seed: int
    cases: int = 0
    sites: Counter = dataclasses.field(default_factory=Counter)  # kind -> n
    lowered: Counter = dataclasses.field(default_factory=Counter)  # kind -> n
    left_alone: Counter = dataclasses.field(default_factory=Counter)  # reason class -> n
    failed_sites: int = 0
    status: Counter = dataclasses.field(default_factory=Counter)
    by_kind: Counter = dataclasses.field(default_factory=Counter)
    bad: list[CaseResult] = dataclasses.field(default_factory=list)  # wrong, crashed, invalid
    seconds: float = 0.0

    def add(self, result: CaseResult) -> None:
        self.cases += 1
        self.status[result.status] += 1
        self.by_kind[result.case.kind] += 1
        for kind, lowered, reason, failed in result.sites:
            self.sites[kind] += 1
            if lowered:
                self.lowered[kind] += 1
            else:
                self.left_alone[reason_class(reason or "")] += 1
            self.failed_sites += failed
        if result.status in ("wrong", "crashed", "invalid"):
            self.bad.append(result)

    @property
    def wrong(self) -> int:
        return self.status["wrong"] + self.status["crashed"]

    def __str__(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
        sites = ", ".join(
            f"{k} {self.lowered[k]}/{n} lowered" for k, n in sorted(self.sites.items())
        )
        lines = [
            f"xyserve fuzz: seed {self.seed}, {self.cases} cases ({kinds}) in {self.seconds:.0f} s",
            f"  sites: {sites}; {self.failed_sites} failed while lowering (contained)",
            f"  cases: {self.status['ok']} ok, {self.status['closer']} ok against float64 only "
            "(half-precision eager itself that far from it), "
            f"{self.status['known']} known difference (eager NaN on rows masked everywhere with "
            f"-inf, op 0), {self.status['invalid']} invalid programs",
            f"  WRONG: {self.status['wrong']} wrong answers, {self.status['crashed']} crashed "
            "compiles",
            f"  left alone, by reason ({sum(self.left_alone.values())} sites):",
        ]
        for reason, n in self.left_alone.most_common():
            lines.append(f"    {n:>6}  {reason}")
        for result in self.bad[:20]:
            c = result.case
            lines.append(
                f"  {result.status.upper()} case --seed {c.seed} --case {c.index}: {result.detail}"
            )
        return "\n".join(lines)


def run_fuzz(cases: int, seed: int = 0, *, start: int = 0, progress: bool = False) -> FuzzSummary:
    """Run cases ``start`` … ``start + cases - 1`` of the run seeded ``seed``."""
    summary = FuzzSummary(seed)
    began = time.perf_counter()
    logger = logging.getLogger("xy_inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)  # contained failures are counted, not printed per case
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index in range(start, start + cases):
                summary.add(run_case(make_case(seed, index)))
                if progress and (index - start + 1) % 500 == 0:
                    print(
                        f"  {index - start + 1} cases, {summary.wrong} wrong, "
                        f"{time.perf_counter() - began:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        logger.setLevel(level)
    summary.seconds = time.perf_counter() - began
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xy_inductor.fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cases", type=int, default=1000, help="how many cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    parser.add_argument("--case", type=int, default=None, help="run only this case index")
    parser.add_argument("--load", metavar="FILE", default=None, help="run only this saved case")
    parser.add_argument(
        "--save-failures",
        metavar="DIR",
        default=None,
        help="write each wrong or crashed case to DIR/<seed>-<case>.pt (for tests/fuzz_cases)",
    )
    args = parser.parse_args(argv)
    if args.case is not None or args.load is not None:
        case = load_case(args.load) if args.load else make_case(args.seed, args.case)
        result = run_case(case)
        print(
            f"case --seed {case.seed} --case {case.index}: {case.kind}, {case.dtype}, "
            f"dynamic={case.dynamic}, fuse_siblings={case.fuse_siblings}"
        )
        print(case.source)
        for name, value in case.inputs.items():
            print(f"  {name}: {tuple(value.shape)} {value.dtype}")
        for site in result.sites:
            print(f"  site: {site}")
        print(f"  -> {result.status} {result.detail} (error {result.error:.2e})")
        return 0 if result.status in ("ok", "known", "closer") else 1
    summary = run_fuzz(args.cases, args.seed, start=args.start, progress=True)
    print(summary)
    if args.save_failures:
        os.makedirs(args.save_failures, exist_ok=True)
        for result in summary.bad:
            if result.status in ("wrong", "crashed"):
                c = result.case
                save_case(c, os.path.join(args.save_failures, f"{c.seed}-{c.index}.pt"))
    return 0 if summary.wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
