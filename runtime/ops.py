"""The xyserve ops, defined once: ``torch.ops.xyserve.gemm``, ``.gemm_fused``, ``.attention``,
``.attention_varlen``, ``.attention_packed``.

Each op has a fake implementation that computes the output from the input sizes alone, so it
traces with symbolic sizes and never reads data, and a real implementation that checks its
arguments, wraps them in a call object (``runtime.calls``) and hands it to the provider
registry (``providers.run``). The argument checks are shared by both and raise ``ValueError``:
the fake implementations check with ``torch._check_value``, which also holds for symbolic
sizes; the real ones with a plain ``if``, which costs nanoseconds instead of microseconds.

The ops are registered with ``torch.library`` ``define`` + ``impl`` + ``register_fake``
(vLLM's ``direct_register_custom_op``), not ``torch.library.custom_op``, whose Python autograd
layer costs about 10 us more on every call from Inductor's generated code
(``benchmarks/op_overhead.py``; pytorch/pytorch#139500). They are inference ops: their
Autograd kernel raises a clear error when asked to record gradients, and otherwise runs the
implementation itself, so a call crosses into Python once.

``gemm_impl``, ``attention_impl``… are the real implementations as plain functions.
``DIRECT_CALLS`` maps each op to its implementation: a graph that runs as traced (no Inductor)
calls them directly, skipping the dispatcher altogether, except where C++ kernels serve the op
(``gemm`` and ``attention`` on CPU tensors, ``native.py``), which costs less still.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from xy_inductor.runtime import providers
from xy_inductor.runtime import stats as _stats
from xy_inductor.runtime.calls import (
    DenseAttention,
    GemmCall,
    PackedAttention,
    VarlenAttention,
    attention_output,
)
from xy_inductor.runtime.gemm_plan import rows_of
from xy_inductor.runtime.serving import check_block_ids

__all__ = [
    "DIRECT_CALLS",
    "attention",
    "attention_impl",
    "attention_packed",
    "attention_packed_impl",
    "attention_varlen",
    "attention_varlen_impl",
    "check_attention_args",
    "check_gemm_args",
    "gemm",
    "gemm_fused",
    "gemm_fused_impl",
    "gemm_impl",
    "stacked_rows",
]

Check = Callable[[bool, Callable[[], str]], None]

# XyConfig.max_tokens's default; ops called directly (not through the backend) use it.
DEFAULT_MAX_TOKENS = 8192


def _raise_unless(cond: bool, message: Callable[[], str]) -> None:
    if not cond:
        raise ValueError(message())


def _same(a: torch.Tensor, b: torch.Tensor, what: str, op: str, check: Check) -> None:
    check(a.dtype == b.dtype, lambda: f"xyserve.{op}: {what} dtypes differ: {a.dtype} vs {b.dtype}")
    check(
        a.device == b.device,
        lambda: f"xyserve.{op}: {what} devices differ: {a.device} vs {b.device}",
    )


def check_gemm_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    check: Check = _raise_unless,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> None:
    check(
        isinstance(max_tokens, int) and max_tokens >= 1,
        lambda: f"xyserve.gemm: max_tokens must be a positive int, got {max_tokens!r}",
    )
    check(x.dim() >= 1, lambda: "xyserve.gemm: x must have at least 1 dim [..., K]")
    check(weight.dim() == 2, lambda: f"xyserve.gemm: weight must be [N, K], got {weight.dim()}-D")
    check(
        x.shape[-1] == weight.shape[1],
        lambda: (
            f"xyserve.gemm: x has K={x.shape[-1]} but weight is [N, K] with K={weight.shape[1]}"
        ),
    )
    _same(x, weight, "x and weight", "gemm", check)
    if bias is not None:
        check(
            bias.dim() == 1 and bias.shape[0] == weight.shape[0],
            lambda: f"xyserve.gemm: bias must be [N={weight.shape[0]}], got {tuple(bias.shape)}",
        )
        _same(x, bias, "x and bias", "gemm", check)


def _note_rows(x: torch.Tensor, weight: torch.Tensor, max_tokens: int) -> None:
    k = x.shape[-1]
    if k and x.numel() <= max_tokens * k:
        return  # M <= max_tokens, told without walking the leading sizes
    m = rows_of(x)
    if m > max_tokens:
        _stats.record_over_max_tokens(m, weight.shape[0], k, max_tokens)


def gemm_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """``x @ weight.T + bias``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None.

    Returns a contiguous ``[..., N]``. Providers with a tile menu serve M = 1…``max_tokens``
    (M is the product of x's leading sizes); a larger M goes to the ATen fallback, counted.
    """
    if not _gemm_args_ok(x, weight, bias, max_tokens):
        check_gemm_args(x, weight, bias, max_tokens=max_tokens)  # raises, naming the argument
    return _traced_gemm(x, weight, bias, max_tokens)


def _traced_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    """``gemm_impl`` for arguments already checked: what a graph that runs as traced calls (the
    fake implementation checked them when the graph was traced, Dynamo's guards keep them so)."""
    _note_rows(x, weight, max_tokens)
    return providers.run("gemm", GemmCall(x, weight, bias, max_tokens))


def _gemm_args_ok(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> bool:
    """``check_gemm_args`` as one expression, for the serving path: the checks with their
    messages build a closure per condition, which costs microseconds on every call."""
    return (
        type(max_tokens) is int
        and max_tokens >= 1
        and x.dim() >= 1
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.dtype == weight.dtype
        and x.device == weight.device
        and (
            bias is None
            or (
                bias.dim() == 1
                and bias.shape[0] == weight.shape[0]
                and bias.dtype == x.dtype
                and bias.device == x.device
            )
        )
    )


def _gemm_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
):
    check_gemm_args(x, weight, bias, torch._check_value, max_tokens)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def check_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    check: Check = _raise_unless,
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(
            t.dim() == 4,
            lambda t=t, name=name: (
                f"xyserve.attention: {name} must be [B, H, L, D], got {t.dim()}-D"
            ),
        )
    _same(q, k, "q and k", "attention", check)
    _same(q, v, "q and v", "attention", check)
    # One condition per check: `and` on symbolic sizes would force each into a guard.
    for other in (k, v):
        check(
            q.shape[0] == other.shape[0],
            lambda: (
                f"xyserve.attention: batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, "
                f"v {v.shape[0]}"
            ),
        )
    for dim in (1, 2):
        check(
            k.shape[dim] == v.shape[dim],
            lambda: (
                f"xyserve.attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share "
                "[B, Hkv, Lk]"
            ),
        )
    check(
        q.shape[1] % k.shape[1] == 0,
        lambda: (
            f"xyserve.attention: q heads ({q.shape[1]}) must be a multiple of "
            f"kv heads ({k.shape[1]})"
        ),
    )
    check(
        q.shape[3] == k.shape[3],
        lambda: f"xyserve.attention: q head dim {q.shape[3]} differs from k head dim {k.shape[3]}",
    )
    if attn_mask is None:
        return
    check(
        not is_causal,
        lambda: "xyserve.attention: give either attn_mask or is_causal=True, not both",
    )
    check(
        attn_mask.dtype == torch.bool or attn_mask.dtype == q.dtype,
        lambda: f"xyserve.attention: attn_mask must be bool or {q.dtype}, got {attn_mask.dtype}",
    )
    check(
        attn_mask.dim() <= 4,
        lambda: (
            f"xyserve.attention: attn_mask has {attn_mask.dim()} dims; at most 4 "
            "broadcast to [B, H, Lq, Lk]"
        ),
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
            lambda m=m, i=i: (
                f"xyserve.attention: attn_mask {tuple(attn_mask.shape)} does not broadcast "
                f"to [B, Hq, Lq, Lk] = {target} (dim -{i}: {m})"
            ),
        )


def attention_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, grouped-query native, no dropout.

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` with Hq a multiple of
    Hkv (query head h reads kv head ``h // (Hq // Hkv)``; K and V are never repeated).
    ``attn_mask`` broadcasts to ``[B, Hq, Lq, Lk]``: bool (True = attend) or additive in q's
    dtype. ``is_causal`` masks as ``F.scaled_dot_product_attention`` does (aligned top-left).
    ``scale`` defaults to ``D ** -0.5``. Returns ``[B, Hq, Lq, Dv]`` stored as ``[B, Lq, Hq, Dv]``.
    """
    if not _attention_args_ok(q, k, v, attn_mask, is_causal):
        check_attention_args(q, k, v, attn_mask, is_causal)  # raises, naming the argument
    return _traced_attention(q, k, v, attn_mask, is_causal, scale)


def _attention_args_ok(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
) -> bool:
    """``check_attention_args`` as one expression on real tensors, for the serving path (see
    ``_gemm_args_ok``); ``check_attention_args`` gives the message when this is False."""
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4):
        return False
    # One unpacking per tensor: each ``.shape[i]`` builds a torch.Size, which adds up on a
    # path every decode layer takes.
    b, hq, lq, d = q.shape
    bk, hk, lk, dk = k.shape
    bv, hv, lv, _ = v.shape
    if not (
        q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and b == bk == bv
        and hk == hv
        and lk == lv
        and hq % hk == 0
        and d == dk
    ):
        return False
    if attn_mask is None:
        return True
    if is_causal or attn_mask.dim() > 4:
        return False
    if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
        return False
    target = (b, hq, lq, lk)
    shape = attn_mask.shape
    return all(shape[-i] == 1 or shape[-i] == target[-i] for i in range(1, len(shape) + 1))


def _traced_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
) -> torch.Tensor:
    """``attention_impl`` for arguments already checked (see ``_traced_gemm``)."""
    return providers.run("attention", DenseAttention(q, k, v, attn_mask, is_causal, scale))


def _attention_fake(q, k, v, attn_mask=None, is_causal=False, scale=None):
    check_attention_args(q, k, v, attn_mask, is_causal, torch._check_value)
    return attention_output(q, v)


def stacked_rows(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """One tensor viewing ``tensors`` stacked along dim 0, when they already lie that way in one
    storage (row blocks of one buffer, as ``fuse_weights`` lays sibling weights); else None."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (
            not t.is_contiguous()
            or t.dtype != first.dtype
            or t.device != first.device
            or t.shape[1:] != first.shape[1:]
            or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or t.storage_offset() != offset
        ):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def gemm_fused_impl(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> torch.Tensor:
    """Sibling linear layers on one input: ``cat([x @ w.T + b for each w, b], -1)``.

    ``biases`` is empty or one per weight. When the weights are row blocks of one buffer, one
    GEMM reads them in place (nothing is copied, so nothing can be stale); otherwise each runs
    on its own and the outputs are concatenated.
    """
    torch._check_value(len(weights) >= 1, lambda: "xyserve.gemm_fused: no weights")
    torch._check_value(
        len(biases) in (0, len(weights)),
        lambda: f"xyserve.gemm_fused: {len(biases)} biases for {len(weights)} weights",
    )
    for i, w in enumerate(weights):
        check_gemm_args(x, w, biases[i] if biases else None, max_tokens=max_tokens)
    weight = stacked_rows(weights)
    bias = (stacked_rows(biases) if biases else None) if weight is not None else None
    if weight is not None and (bias is not None or not biases):
        _stats.record_fusion(fused=True)
        _note_rows(x, weight, max_tokens)
        return providers.run("gemm", GemmCall(x, weight, bias, max_tokens))
    _stats.record_fusion(fused=False)
    outs = []
    for i, w in enumerate(weights):
        _note_rows(x, w, max_tokens)
        call = GemmCall(x, w, biases[i] if biases else None, max_tokens)
        outs.append(providers.run("gemm", call))
    return torch.cat(outs, dim=-1)


def _gemm_fused_fake(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    max_tokens: int = DEFAULT_MAX_TOKENS,
):
    for i, w in enumerate(weights):
        check_gemm_args(x, w, biases[i] if biases else None, torch._check_value, max_tokens)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


def check_varlen_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    check: Check = _raise_unless,
) -> None:
    op = "xyserve.attention_varlen"
    check(q.dim() == 3, lambda: f"{op}: q must be packed [tokens, Hq, D], got {q.dim()}-D")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check(
            t.dim() == 4,
            lambda t=t, name=name: (
                f"{op}: {name} must be paged [blocks, block_size, Hkv, D], got {t.dim()}-D"
            ),
        )
    _same(q, k_cache, "q and k_cache", "attention_varlen", check)
    _same(q, v_cache, "q and v_cache", "attention_varlen", check)
    check(
        q.shape[1] % k_cache.shape[2] == 0,
        lambda: f"{op}: q heads ({q.shape[1]}) must be a multiple of kv heads ({k_cache.shape[2]})",
    )
    check(
        q.shape[2] == k_cache.shape[3],
        lambda: f"{op}: q head dim {q.shape[2]} differs from k_cache head dim {k_cache.shape[3]}",
    )
    for name, t, dims in (
        ("cu_seqlens_q", cu_seqlens_q, 1),
        ("kv_lens", kv_lens, 1),
        ("block_table", block_table, 2),
    ):
        check(
            t.dim() == dims and not t.dtype.is_floating_point,
            lambda t=t, name=name, dims=dims: (
                f"{op}: {name} must be a {dims}-D integer tensor, got {t.dim()}-D {t.dtype}"
            ),
        )
    rows = kv_lens.shape[0]
    check(
        cu_seqlens_q.shape[0] == rows + 1,
        lambda: (
            f"{op}: cu_seqlens_q needs rows + 1 = {rows + 1} entries, got {cu_seqlens_q.shape[0]}"
        ),
    )
    check(
        block_table.shape[0] == rows,
        lambda: f"{op}: block_table has {block_table.shape[0]} rows for {rows} sequences",
    )


def _varlen_rows(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, k_cache: torch.Tensor,
    block_table: torch.Tensor, positional: bool,
) -> tuple[list[int], list[int]]:  # fmt: skip
    """The token table's lengths, read on the host (the plan step), checked."""
    op = "xyserve.attention_varlen"
    cu = cu_seqlens_q.tolist()
    kv = kv_lens.tolist()
    q_lens = [b - a for a, b in itertools.pairwise(cu)]
    if cu[0] != 0 or any(n < 0 for n in q_lens) or cu[-1] != q.shape[0]:
        raise ValueError(
            f"{op}: cu_seqlens_q must rise from 0 to the {q.shape[0]} packed tokens, got {cu}"
        )
    capacity = block_table.shape[1] * k_cache.shape[1]
    for r, (n, m) in enumerate(zip(q_lens, kv, strict=True)):
        if m < 0 or m > capacity or (positional and n > m):
            raise ValueError(
                f"{op}: row {r} has {n} queries and kv_len {m}; expected 0 <= kv_len <= "
                f"{capacity} (block_table width × block size)"
                + (" and queries <= kv_len (they are the row's last tokens)" if positional else "")
            )
    return q_lens, kv


def attention_varlen_impl(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    kv_lens: torch.Tensor,
    block_table: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention for serving: packed queries of many sequences over a paged KV cache.

    q ``[tokens, Hq, D]``, sequence r's queries at ``cu_seqlens_q[r] : cu_seqlens_q[r + 1]``,
    being the last tokens of its ``kv_lens[r]`` keys (prefill, decode, chunked or
    prefix-cached prefill and verify rows mix freely). k/v caches ``[blocks, block_size, Hkv,
    D]``; ``block_table[r, j]`` is the block of row r's keys ``j * block_size …``. ``window``:
    a query at position p sees keys after p - window. Returns ``[tokens, Hq, Dv]``.
    """
    check_varlen_args(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table)
    q_lens, kv = _varlen_rows(
        q, cu_seqlens_q, kv_lens, k_cache, block_table, causal or window is not None
    )
    # Per call, beside the length reads above: the op reads its token table on the host anyway.
    check_block_ids(block_table, kv, k_cache.shape[1], k_cache.shape[0], "xyserve.attention_varlen")
    call = VarlenAttention(q, k_cache, v_cache, q_lens, kv, block_table, causal, window, scale)
    return providers.run("attention_varlen", call)


def _attention_varlen_fake(
    q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, causal=True, window=None, scale=None
):
    check_varlen_args(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, torch._check_value)
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))


def check_packed_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    check: Check = _raise_unless,
) -> None:
    op = "xyserve.attention_packed"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check(
            t.dim() == 3,
            lambda t=t, name=name: f"{op}: {name} must be packed [tokens, H, D], got {t.dim()}-D",
        )
    _same(q, k, "q and k", "attention_packed", check)
    _same(q, v, "q and v", "attention_packed", check)
    for other, name in ((k, "k"), (v, "v")):
        check(
            other.shape[0] == q.shape[0],
            lambda other=other, name=name: (
                f"{op}: {name} has {other.shape[0]} tokens, q {q.shape[0]} (rows attend to "
                "their own tokens)"
            ),
        )
    check(
        k.shape[1] == v.shape[1],
        lambda: f"{op}: k has {k.shape[1]} heads, v {v.shape[1]}",
    )
    check(
        q.shape[1] % k.shape[1] == 0,
        lambda: f"{op}: q heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})",
    )
    check(
        q.shape[2] == k.shape[2],
        lambda: f"{op}: q head dim {q.shape[2]} differs from k head dim {k.shape[2]}",
    )
    check(
        cu_seqlens.dim() == 1 and not cu_seqlens.dtype.is_floating_point,
        lambda: (
            f"{op}: cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dim()}-D "
            f"{cu_seqlens.dtype}"
        ),
    )


def attention_packed_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention of packed sequences (a prompt batch without its padding).

    q ``[tokens, Hq, D]``, k/v ``[tokens, Hkv, D]``: sequence r is the tokens
    ``cu_seqlens[r] : cu_seqlens[r + 1]``, which attend to each other only (causally, within a
    ``window`` if given). Returns ``[tokens, Hq, Dv]``.
    """
    check_packed_args(q, k, v, cu_seqlens)
    cu = cu_seqlens.tolist()
    lens = [b - a for a, b in itertools.pairwise(cu)]
    if not cu or cu[0] != 0 or any(n < 0 for n in lens) or cu[-1] != q.shape[0]:
        raise ValueError(
            f"xyserve.attention_packed: cu_seqlens must rise from 0 to the {q.shape[0]} packed "
            f"tokens, got {cu}"
        )
    if window is not None and window < 1:
        raise ValueError(f"xyserve.attention_packed: window must be >= 1 or None, got {window}")
    call = PackedAttention(q, k, v, lens, cu[:-1], causal, window, scale)
    return providers.run("attention_packed", call)


def _attention_packed_fake(q, k, v, cu_seqlens, causal=True, window=None, scale=None):
    check_packed_args(q, k, v, cu_seqlens, torch._check_value)
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


# -- registration ---------------------------------------------------------------------------------

_LIB = torch.library.Library("xyserve", "DEF")


def _requires_grad(args: tuple) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and _requires_grad(tuple(a)):
            return True
    return False


_REAL = (torch.Tensor, torch.nn.Parameter)


def _inference_only(name: str, impl: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The op's Autograd kernel: a clear error where gradients would be recorded; otherwise the
    implementation, run here (real tensors) or below autograd (fake or functional tensors, while
    tracing, which reach the fake implementation)."""

    def kernel(*args: object) -> torch.Tensor:
        if type(args[0]) not in _REAL:  # fake or functional tensors: a trace, not a run
            with torch._C._AutoDispatchBelowAutograd():
                return getattr(torch.ops.xyserve, name).default(*args)
        if torch.is_grad_enabled() and _requires_grad(args):
            raise RuntimeError(
                f"xyserve.{name} is an inference op and has no backward: call it (or the model "
                "compiled with xyserve) under torch.no_grad() or torch.inference_mode(); "
                "xyserve's backend runs graphs that need gradients as traced"
            )
        return impl(*args)

    return kernel


def _register(name: str, impl: Callable[..., torch.Tensor], fake: Callable[..., object]) -> object:
    _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()))
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    _LIB.impl(name, _inference_only(name, impl), "Autograd")
    torch.library.register_fake(f"xyserve::{name}", fake, lib=_LIB)
    return getattr(torch.ops.xyserve, name)


gemm = _register("gemm", gemm_impl, _gemm_fake)
attention = _register("attention", attention_impl, _attention_fake)
gemm_fused = _register("gemm_fused", gemm_fused_impl, _gemm_fused_fake)
attention_varlen = _register("attention_varlen", attention_varlen_impl, _attention_varlen_fake)
attention_packed = _register("attention_packed", attention_packed_impl, _attention_packed_fake)

DIRECT_CALLS: dict[object, Callable[..., torch.Tensor]] = {
    torch.ops.xyserve.attention_varlen.default: attention_varlen_impl,
    torch.ops.xyserve.gemm.default: _traced_gemm,
    torch.ops.xyserve.attention.default: _traced_attention,
    torch.ops.xyserve.gemm_fused.default: gemm_fused_impl,
    torch.ops.xyserve.attention_packed.default: attention_packed_impl,
}
"""What a graph that runs as traced calls for each op: the implementation without the
dispatcher, and for the hot ops without re-checking what tracing checked."""
