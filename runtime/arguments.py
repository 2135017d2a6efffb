"""One validator per xyserve op: the argument rules, each written once, with the message a
caller sees when one fails (a ``ValueError`` naming the argument and what was expected).

A validator states every rule as ``check(condition, message, *values)``. The op's real
implementation passes ``raise_unless``: a plain test that formats the message only when the rule
fails, so a well-formed call pays for the comparisons alone. Its fake implementation passes
``check_symbolic``: ``torch._check_value``, which holds for symbolic sizes without turning each
comparison into a guard (one condition per rule for the same reason: ``and`` on symbolic sizes
would force each side into one).

Messages are ``str.format`` templates; ``{0!t}`` writes a tensor's shape as a tuple.
"""

from __future__ import annotations

import string
from collections.abc import Callable

import torch

__all__ = [
    "Check",
    "check_attention_args",
    "check_gemm_args",
    "check_gemm_fused_args",
    "check_packed_args",
    "check_symbolic",
    "check_varlen_args",
    "raise_unless",
]

Check = Callable[..., None]
"""``check(condition, message, *values)``: fails with ``message.format(*values)`` unless the
condition holds."""


class _Messages(string.Formatter):
    def convert_field(self, value: object, conversion: str | None) -> object:
        if conversion == "t":
            return tuple(value.shape)  # type: ignore[attr-defined]
        return super().convert_field(value, conversion)


_MESSAGES = _Messages()


def raise_unless(cond: bool, message: str, *values: object) -> None:
    """The real implementations' check: ``ValueError`` when ``cond`` is false."""
    if not cond:
        raise ValueError(_MESSAGES.format(message, *values))


def check_symbolic(cond: object, message: str, *values: object) -> None:
    """The fake implementations' check: holds for symbolic sizes without guarding on them."""
    torch._check_value(cond, lambda: _MESSAGES.format(message, *values))


def _same(a: torch.Tensor, b: torch.Tensor, what: str, op: str, check: Check) -> None:
    check(a.dtype == b.dtype, "xyserve.{}: {} dtypes differ: {} vs {}", op, what, a.dtype, b.dtype)
    check(
        a.device == b.device,
        "xyserve.{}: {} devices differ: {} vs {}",
        op,
        what,
        a.device,
        b.device,
    )


def check_gemm_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_tokens: int,
    check: Check = raise_unless,
) -> None:
    """``xyserve.gemm``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None, all of one
    dtype and device; ``max_tokens`` a positive int."""
    check(
        isinstance(max_tokens, int) and max_tokens >= 1,
        "xyserve.gemm: max_tokens must be a positive int, got {!r}",
        max_tokens,
    )
    check(x.dim() >= 1, "xyserve.gemm: x must have at least 1 dim [..., K]")
    check(weight.dim() == 2, "xyserve.gemm: weight must be [N, K], got {}-D", weight.dim())
    check(
        x.shape[-1] == weight.shape[1],
        "xyserve.gemm: x has K={} but weight is [N, K] with K={}",
        x.shape[-1],
        weight.shape[1],
    )
    _same(x, weight, "x and weight", "gemm", check)
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            "xyserve.gemm: bias must be [N={}], got {!t}",
            weight.shape[0],
            bias,
        )
        _same(x, bias, "x and bias", "gemm", check)


def check_gemm_fused_args(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    max_tokens: int,
    check: Check = raise_unless,
) -> None:
    """``xyserve.gemm_fused``: at least one weight, no biases or one per weight, and each
    (weight, bias) a valid ``gemm`` with ``x``."""
    check(len(weights) >= 1, "xyserve.gemm_fused: no weights")
    check(
        len(biases) in (0, len(weights)),
        "xyserve.gemm_fused: {} biases for {} weights",
        len(biases),
        len(weights),
    )
    for i, w in enumerate(weights):
        check_gemm_args(x, w, biases[i] if biases else None, max_tokens, check)


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    check: Check = raise_unless,
) -> None:
    """``xyserve.attention``: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk,
    Dv]`` of one dtype and device, Hq a multiple of Hkv; ``attn_mask`` (not with ``is_causal``)
    bool or q's dtype, broadcasting to ``[B, Hq, Lq, Lk]``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == 4, "xyserve.attention: {} must be [B, H, L, D], got {}-D", name, t.dim())
    _same(q, k, "q and k", "attention", check)
    _same(q, v, "q and v", "attention", check)
    for other in (k, v):
        check(
            q.shape[0] == other.shape[0],
            "xyserve.attention: batch sizes differ: q {}, k {}, v {}",
            q.shape[0],
            k.shape[0],
            v.shape[0],
        )
    for dim in (1, 2):
        check(
            k.shape[dim] == v.shape[dim],
            "xyserve.attention: k {!t} and v {!t} must share [B, Hkv, Lk]",
            k,
            v,
        )
    check(
        q.shape[1] % k.shape[1] == 0,
        "xyserve.attention: q heads ({}) must be a multiple of kv heads ({})",
        q.shape[1],
        k.shape[1],
    )
    check(
        q.shape[3] == k.shape[3],
        "xyserve.attention: q head dim {} differs from k head dim {}",
        q.shape[3],
        k.shape[3],
    )
    if attn_mask is None:
        return
    check(not is_causal, "xyserve.attention: give either attn_mask or is_causal=True, not both")
    check(
        attn_mask.dtype == torch.bool or attn_mask.dtype == q.dtype,
        "xyserve.attention: attn_mask must be bool or {}, got {}",
        q.dtype,
        attn_mask.dtype,
    )
    check(
        attn_mask.dim() <= 4,
        "xyserve.attention: attn_mask has {} dims; at most 4 broadcast to [B, H, Lq, Lk]",
        attn_mask.dim(),
    )
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for i in range(1, attn_mask.dim() + 1):
        m = attn_mask.shape[-i]
        # Only a literal 1 broadcasts: a symbolic size that happens to be 1 must match, or the
        # check would turn into a guard on that size.
        if isinstance(m, int) and m == 1:
            continue
        check(
            m == target[-i],
            "xyserve.attention: attn_mask {!t} does not broadcast to [B, Hq, Lq, Lk] = {} "
            "(dim -{}: {})",
            attn_mask,
            target,
            i,
            m,
        )


def check_varlen_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    check: Check = raise_unless,
) -> None:
    """``xyserve.attention_varlen``: q ``[tokens, Hq, D]``, paged caches ``[blocks,
    block_size, Hkv, D]``, integer ``cu_seqlens_q [rows + 1]``, ``kv_lens [rows]`` and
    ``block_table [rows, width]``. (The lengths' values are checked where they are read.)"""
    op = "xyserve.attention_varlen"
    check(q.dim() == 3, "{}: q must be packed [tokens, Hq, D], got {}-D", op, q.dim())
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check(
            t.dim() == 4,
            "{}: {} must be paged [blocks, block_size, Hkv, D], got {}-D",
            op,
            name,
            t.dim(),
        )
    _same(q, k_cache, "q and k_cache", "attention_varlen", check)
    _same(q, v_cache, "q and v_cache", "attention_varlen", check)
    check(
        q.shape[1] % k_cache.shape[2] == 0,
        "{}: q heads ({}) must be a multiple of kv heads ({})",
        op,
        q.shape[1],
        k_cache.shape[2],
    )
    check(
        q.shape[2] == k_cache.shape[3],
        "{}: q head dim {} differs from k_cache head dim {}",
        op,
        q.shape[2],
        k_cache.shape[3],
    )
    for name, t, dims in (
        ("cu_seqlens_q", cu_seqlens_q, 1),
        ("kv_lens", kv_lens, 1),
        ("block_table", block_table, 2),
    ):
        check(
            t.dim() == dims and not t.dtype.is_floating_point,
            "{}: {} must be a {}-D integer tensor, got {}-D {}",
            op,
            name,
            dims,
            t.dim(),
            t.dtype,
        )
    rows = kv_lens.shape[0]
    check(
        cu_seqlens_q.shape[0] == rows + 1,
        "{}: cu_seqlens_q needs rows + 1 = {} entries, got {}",
        op,
        rows + 1,
        cu_seqlens_q.shape[0],
    )
    check(
        block_table.shape[0] == rows,
        "{}: block_table has {} rows for {} sequences",
        op,
        block_table.shape[0],
        rows,
    )


def check_packed_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    check: Check = raise_unless,
) -> None:
    """``xyserve.attention_packed``: q ``[tokens, Hq, D]``, k/v ``[tokens, Hkv, D]`` of one
    dtype and device, Hq a multiple of Hkv, an integer ``cu_seqlens [rows + 1]``."""
    op = "xyserve.attention_packed"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(t.dim() == 3, "{}: {} must be packed [tokens, H, D], got {}-D", op, name, t.dim())
    _same(q, k, "q and k", "attention_packed", check)
    _same(q, v, "q and v", "attention_packed", check)
    for other, name in ((k, "k"), (v, "v")):
        check(
            other.shape[0] == q.shape[0],
            "{}: {} has {} tokens, q {} (rows attend to their own tokens)",
            op,
            name,
            other.shape[0],
            q.shape[0],
        )
    check(k.shape[1] == v.shape[1], "{}: k has {} heads, v {}", op, k.shape[1], v.shape[1])
    check(
        q.shape[1] % k.shape[1] == 0,
        "{}: q heads ({}) must be a multiple of kv heads ({})",
        op,
        q.shape[1],
        k.shape[1],
    )
    check(
        q.shape[2] == k.shape[2],
        "{}: q head dim {} differs from k head dim {}",
        op,
        q.shape[2],
        k.shape[2],
    )
    check(
        cu_seqlens.dim() == 1 and not cu_seqlens.dtype.is_floating_point,
        "{}: cu_seqlens must be a 1-D integer tensor, got {}-D {}",
        op,
        cu_seqlens.dim(),
        cu_seqlens.dtype,
    )
