"""The case grammar: a case drawn from a seed and an index, as an attention program (over q, k, v
and a mask), a decoder block (projections, attention, output projection) or a linear layer.

Every choice is a spelling seen in a model or in PyTorch (the comment next to it says where), or
a spelling the lowering must refuse (marked "refused"), so that the fuzzer checks both sides.
The attention bodies themselves are in ``spellings.py``.
"""

from __future__ import annotations

import math
import random

import torch

from .case import DTYPES, Builder, Case, random_tensor
from .spellings import manual_body, sdpa_body


def keep_mask(
    b: Builder, g: torch.Generator, lq: int, lk: int, shape: tuple[int, ...], full_rows: bool
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


def mask_shape(
    b: Builder, batch: int, heads: int, lq: int, lk: int, rank: int, sdpa: bool = False
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


def attention_case(b: Builder, g: torch.Generator, kind: str) -> tuple[list[str], dict, dict]:
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
        inputs["x"] = random_tensor(g, (batch, lq, hidden), dtype)
        for name, rows in (("wq", hq * d), ("wk", hkv * d), ("wv", hkv * d), ("wo", hidden)):
            params[name] = random_tensor(g, (rows, hidden), dtype, hidden**-0.5)
        if b.chance(0.3):  # Qwen2 has biases on q/k/v
            for name, rows in (("bq", hq * d), ("bk", hkv * d), ("bv", hkv * d)):
                params[name] = random_tensor(g, (rows,), dtype, 0.1)
    elif layout == "3d":
        inputs["q"] = random_tensor(g, (batch * hq, lq, d), dtype)
        inputs["k"] = random_tensor(g, (batch * hkv, lk, d), dtype)
        inputs["v"] = random_tensor(g, (batch * hkv, lk, dv), dtype)
    else:
        inputs["q"] = random_tensor(g, (batch, hq, lq, d), dtype)
        inputs["k"] = random_tensor(g, (batch, hkv, lk, d), dtype)
        inputs["v"] = random_tensor(g, (batch, hkv, lk, dv), dtype)
    full_rows = b.chance(0.15)
    rank = 4 if layout in ("4d", "bart") else 3
    mask_kind = b.pick(None, "add", "add", "bool", "bool")
    sdpa = kind == "sdpa" or (kind == "block" and b.chance(0.3))
    if mask_kind == "add":
        shape = mask_shape(b, batch, hq, lq, lk, rank, sdpa)
        mag = b.pick(0.5, 2.0, 8.0)  # ALiBi-like biases reach a few units
        mask = torch.randn(shape, generator=g) * mag
        masked = keep_mask(b, g, lq, lk, shape, full_rows)
        fill = b.pick(torch.finfo(dtype).min, -math.inf, torch.finfo(dtype).min)
        mask = mask.masked_fill(~masked, fill)
        # Usually in q's dtype (Hugging Face builds it so); sometimes float32 (refused for
        # half-precision q: rounding it would change the scores).
        inputs["m"] = mask.to(dtype if b.chance(0.85) else torch.float32)
    elif mask_kind == "bool":
        shape = mask_shape(b, batch, hq, lq, lk, rank, sdpa)
        inputs["keep"] = keep_mask(b, g, lq, lk, shape, full_rows)
    if kind == "block":
        projections(b, params, hq, hkv, d)
    if sdpa:
        sdpa_body(b, inputs, hq, hkv, group, lq, lk, block=kind == "block")
    else:
        ctx = dict(batch=batch, hq=hq, hkv=hkv, group=group, lq=lq, lk=lk, d=d, layout=layout)
        manual_body(b, inputs, ctx, block=kind == "block")
    if kind == "block":
        b.emit(
            b.pick(
                "o = o.transpose(1, 2).reshape(B, L, -1)",
                "o = o.transpose(1, 2).contiguous().view(B, L, -1)",
            )
        )
        b.emit(b.pick("return F.linear(o, self.wo)", "return o @ self.wo.t()"))
    return list(inputs), inputs, params


def projections(b: Builder, params: dict, hq: int, hkv: int, d: int) -> None:
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


def linear_case(b: Builder, g: torch.Generator) -> tuple[list[str], dict, dict]:
    """A module's forward over x with parameters w [N, K], b [N], w_kn [K, N]."""
    m = b.pick(1, 2, 3, 7, 17)
    kdim, n = b.pick(1, 3, 8, 16, 33), b.pick(1, 3, 8, 16, 33)
    lead = b.pick((m,), (2, m), (1, m))
    dtype = b.dtype
    inputs = {"x": random_tensor(g, (*lead, kdim), dtype)}
    params = {
        "w": random_tensor(g, (n, kdim), dtype, kdim**-0.5),
        "b": random_tensor(g, (n,), dtype),
        "w2": random_tensor(g, (n, kdim), dtype, kdim**-0.5),
        "w_kn": random_tensor(g, (kdim, n), dtype, kdim**-0.5),
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
    dtype = rng.choice(DTYPES)
    dynamic = rng.random() < 0.25
    kind = rng.choice(("attention", "attention", "attention", "sdpa", "linear", "block"))
    b = Builder(rng, dtype, dynamic)
    if kind == "linear":
        names, inputs, params = linear_case(b, g)
    else:
        names, inputs, params = attention_case(b, g, kind)
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
