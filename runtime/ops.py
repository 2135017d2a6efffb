"""The xyserve ops, defined once: ``torch.ops.xyserve.gemm``, ``.gemm_fused``, ``.attention``,
``.attention_varlen``, ``.attention_packed``.

Each op has a fake implementation that computes the output from the input sizes alone, so it
traces with symbolic sizes and never reads data, and a real implementation that checks its
arguments, wraps them in a call object (``kernels.calls``) and hands it to the provider
registry (``providers.run``). Both check the arguments with the op's one validator
(``arguments.py``), which raises a ``ValueError`` naming the argument.

The ops are registered with ``torch.library`` ``define`` + ``impl`` + ``register_fake``
(vLLM's ``direct_register_custom_op``), not ``torch.library.custom_op``, whose Python autograd
layer adds a Python autograd step to every call from Inductor's generated code
(``benchmarks/op_overhead.py``; pytorch/pytorch#139500). They are inference ops: their
Autograd kernel raises a clear error when asked to record gradients, and otherwise runs the
implementation itself, so a call crosses into Python once.

``gemm_impl``, ``attention_impl``… are the real implementations as plain functions.
``DIRECT_CALLS`` maps each op to its implementation: a graph that runs as traced (no Inductor)
calls them directly, skipping the dispatcher altogether, except where ATen's C++ kernels serve
the op (``gemm`` and ``attention`` on CPU tensors, ``load_native``), which costs less still.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from xy_inductor.kernels.aten import native
from xy_inductor.kernels.calls import (
    DenseAttention,
    GemmCall,
    PackedAttention,
    VarlenAttention,
    attention_output,
)
from xy_inductor.kernels.gemm_plan import DEFAULT_MAX_TOKENS, rows_of
from xy_inductor.kernels.tree_masks import parse_tree_mask
from xy_inductor.runtime import counters, providers
from xy_inductor.runtime.arguments import (
    check_attention_args,
    check_gemm_args,
    check_gemm_fused_args,
    check_packed_args,
    check_symbolic,
    check_varlen_args,
)
from xy_inductor.runtime.serving import check_block_ids

__all__ = [
    "DIRECT_CALLS",
    "attention",
    "attention_impl",
    "attention_packed",
    "attention_packed_impl",
    "attention_varlen",
    "attention_varlen_impl",
    "gemm",
    "gemm_fused",
    "gemm_fused_impl",
    "gemm_impl",
    "load_native",
    "stacked_rows",
]


def _note_rows(x: torch.Tensor, weight: torch.Tensor, max_tokens: int) -> None:
    k = x.shape[-1]
    if k and x.numel() <= max_tokens * k:
        return  # M <= max_tokens, told without walking the leading sizes
    m = rows_of(x)
    if m > max_tokens:
        counters.record_over_max_tokens(m, weight.shape[0], k, max_tokens)


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
    check_gemm_args(x, weight, bias, max_tokens)
    return _traced_gemm(x, weight, bias, max_tokens)


def _traced_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_tokens: int
) -> torch.Tensor:
    """``gemm_impl`` for arguments already checked: what a graph that runs as traced calls (the
    fake implementation checked them when the graph was traced, Dynamo's guards keep them so)."""
    _note_rows(x, weight, max_tokens)
    return providers.run("gemm", GemmCall(x, weight, bias, max_tokens))


def _gemm_fake(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
):
    check_gemm_args(x, weight, bias, max_tokens, check_symbolic)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


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
    check_attention_args(q, k, v, attn_mask, is_causal)
    return _traced_attention(q, k, v, attn_mask, is_causal, scale)


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
    check_attention_args(q, k, v, attn_mask, is_causal, check_symbolic)
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
    check_gemm_fused_args(x, weights, biases, max_tokens)
    weight = stacked_rows(weights)
    bias = (stacked_rows(biases) if biases else None) if weight is not None else None
    if weight is not None and (bias is not None or not biases):
        counters.record_fusion(fused=True)
        _note_rows(x, weight, max_tokens)
        return providers.run("gemm", GemmCall(x, weight, bias, max_tokens))
    counters.record_fusion(fused=False)
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
    check_gemm_fused_args(x, weights, biases, max_tokens, check_symbolic)
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


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
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention for serving: packed queries of many sequences over a paged KV cache.

    q ``[tokens, Hq, D]``, sequence r's queries at ``cu_seqlens_q[r] : cu_seqlens_q[r + 1]``,
    being the last tokens of its ``kv_lens[r]`` keys (prefill, decode, chunked or
    prefix-cached prefill and verify rows mix freely). k/v caches ``[blocks, block_size, Hkv,
    D]``; ``block_table[r, j]`` is the block of row r's keys ``j * block_size …``. ``window``:
    a query at position p sees keys after p - window. ``tree_mask``: tree verify rows (causal
    only), int64 ``[tokens]``: bit j of query i's entry set when it sees its row's query token j,
    ``-1`` for plain causal rows (``kernels/tree_masks.py``). Returns ``[tokens, Hq, Dv]``.
    """
    check_varlen_args(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table)
    q_lens, kv = _varlen_rows(
        q, cu_seqlens_q, kv_lens, k_cache, block_table, causal or window is not None
    )
    # Per call, beside the length reads above: the op reads its token table on the host anyway.
    check_block_ids(block_table, kv, k_cache.shape[1], k_cache.shape[0], "xyserve.attention_varlen")
    tree = None
    if tree_mask is not None:
        tree = parse_tree_mask(tree_mask, q_lens, "xyserve.attention_varlen", causal=causal)
    call = VarlenAttention(
        q, k_cache, v_cache, q_lens, kv, block_table, causal, window, scale, tree=tree
    )
    return providers.run("attention_varlen", call)


def _attention_varlen_fake(
    q,
    k_cache,
    v_cache,
    cu_seqlens_q,
    kv_lens,
    block_table,
    causal=True,
    window=None,
    scale=None,
    tree_mask=None,
):
    check_varlen_args(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_table, check_symbolic)
    if tree_mask is not None:
        check_symbolic(
            tree_mask.dim() == 1 and tree_mask.dtype == torch.int64,
            "{}: tree_mask must be a 1-D int64 tensor, got {}-D {}",
            "xyserve.attention_varlen",
            tree_mask.dim(),
            tree_mask.dtype,
        )
    return q.new_empty((q.shape[0], q.shape[1], v_cache.shape[3]))


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
    check_packed_args(q, k, v, cu_seqlens, check_symbolic)
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


def load_native() -> str | None:
    """Load ATen's C++ kernels for ``gemm`` and ``attention`` (``kernels/aten/native.py``) when
    ATen alone serves this process; None when they serve its CPU calls, else why not."""
    return native.load(providers.default(), {"gemm": gemm_impl, "attention": attention_impl})
