"""The attention bodies of the case grammar: softmax(q @ kᵀ · scale + mask) @ v written out by
hand in the spellings real models use (``manual_body``), and F.scaled_dot_product_attention in
its argument forms (``sdpa_body``).

Every choice is a spelling seen in a model or in PyTorch (the comment next to it says where), or
a spelling the lowering must refuse (marked "refused"), so that the fuzzer checks both sides.
"""

from __future__ import annotations

import math

from .case import Builder


def scale_literal(b: Builder, d: int) -> str:
    return b.pick(
        repr(1 / math.sqrt(d)),
        "q.shape[-1] ** -0.5",  # Llama-style, symbolic under dynamic=True
        "0.125",
        "1.0 / math.sqrt(q.shape[-1])",
    )


def repeat_spelling(b: Builder, group: int, hkv: int) -> tuple[str, str]:
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


def manual_body(b: Builder, inputs: dict, c: dict, block: bool = False) -> None:
    """softmax(q @ kᵀ · scale + mask) @ v, in one of many spellings."""
    layout, group = c["layout"], c["group"]
    k, v = repeat_spelling(b, group, c["hkv"])
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
                f"q = q * {scale_literal(b, c['d'])}",
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
        kt = f"({kt} * {scale_literal(b, c['d'])})"  # scale after the transpose
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
            lit = scale_literal(b, c["d"])
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


def sdpa_body(
    b: Builder, inputs: dict, hq: int, hkv: int, group: int, lq: int, lk: int, block: bool
) -> None:
    """F.scaled_dot_product_attention in its argument forms."""
    k, v = "k", "v"
    gqa = "False"
    if hkv != hq:
        how = b.pick("repeat", "flag", "symbolic")
        if how == "repeat":  # Hugging Face's sdpa path with a mask
            k, v = repeat_spelling(b, group, 2)
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
