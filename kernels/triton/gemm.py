"""SmoothGEMM in Triton: ``out = x @ weight.T (+ bias)`` with fixed tiles and virtual padding.

One ``@triton.jit`` kernel; each menu entry (``kernels.gemm_plan.GemmTile``) is one compiled
variant of it (the block sizes are ``tl.constexpr``). M, the token count, is a run-time argument
marked ``do_not_specialize``: Triton would otherwise compile a new variant whenever M's
divisibility by 16 (or M == 1) changes. The last row tile is masked on load and store, so M is
padded only in registers, never in memory. N and K are model constants; they may specialise.
Row and column offsets are 64-bit: with a large-vocabulary ``lm_head`` and a raised
``max_tokens``, M × N passes 2³¹ elements.

Runs on CUDA, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow; the tests use it). Triton
is imported by this module: import it only when Triton is installed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from xy_inductor.kernels.gemm_plan import GemmTile
from xy_inductor.kernels.triton import row_stride

__all__ = [
    "compiled_variants",
    "launch_key",
    "record_launch_keys",
    "triton_gemm",
    "warm_up",
]

# Tiles along M are walked in groups so that neighbouring programs share weight columns in L2
# (the grouped ordering of Triton's matmul tutorial).
GROUP_M = 8


@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_wk,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP32_IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # -- which output tile this program computes (grouped along M) ----------------------------
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    # 64-bit: offs * stride passes 2**31 on a large lm_head (M x N elements).
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Virtual padding: rows past M (and columns past N) are masked, never read or written.
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk

    # -- reduce over K in BLOCK_K slices, accumulating in fp32 ---------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(x_ptrs, mask=mask_m[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            # Triton's interpreter multiplies bf16 operands as raw bits (triton 3.6); fp32
            # holds every bf16 product exactly, so this is the tensor-core result.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_IEEE or UPCAST:
            # fp32 inputs: full precision, as torch's matmul does by default (no TF32).
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    # -- epilogue: bias, cast, store the real rows only ----------------------------------------
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _args(
    tile: GemmTile,
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> tuple[tuple, dict]:
    m, k = x2.shape
    n = weight.shape[0]
    args = (
        x2,
        weight,
        bias if bias is not None else weight,  # never read without HAS_BIAS
        out,
        m,
        n,
        k,
        x2.stride(0),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
    )
    meta = {
        "HAS_BIAS": bias is not None,
        "EVEN_K": k % tile.block_k == 0,
        "FP32_IEEE": x2.dtype == torch.float32,
        "UPCAST": x2.device.type != "cuda" and x2.dtype == torch.bfloat16,
        "BLOCK_M": tile.block_m,
        "BLOCK_N": tile.block_n,
        "BLOCK_K": tile.block_k,
        "GROUP_M": GROUP_M,
        "num_warps": tile.num_warps,
        "num_stages": tile.num_stages,
    }
    return args, meta


# -- compile keys: what Triton would compile, also computable under the interpreter ------------

_recorders: list[set] = []


@contextlib.contextmanager
def record_launch_keys() -> Iterator[set]:
    """Collect, inside the block, the compile key of every launch and warm-up.

    The keys come from Triton's own argument specialisation (as for an sm_90 target), so a
    launch whose key is already in the set is one Triton would serve from its cache.
    """
    keys: set = set()
    _recorders.append(keys)
    try:
        yield keys
    finally:
        _recorders.remove(keys)


_binder = None


def launch_key(args: tuple, meta: dict) -> str:
    """Triton's compile key for launching the GEMM kernel with ``args`` and ``meta``."""
    global _binder
    if _binder is None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        # Under TRITON_INTERPRET=1 the kernel object is an interpreter; rebuild a JITFunction
        # from the same Python function to reach the binder Triton uses on a GPU.
        jit = JITFunction(_gemm_kernel.fn, do_not_specialize=["M"])
        backend = make_backend(GPUTarget("cuda", 90, 32))
        _binder = create_function_from_signature(jit.signature, jit.params, backend)
    options = {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")}
    constexprs = {k: v for k, v in meta.items() if k not in options}
    _, specialization, _ = _binder(*args, **constexprs)
    return repr((specialization, sorted(options.items())))


def _record(args: tuple, meta: dict) -> None:
    if _recorders:
        key = launch_key(args, meta)
        for keys in _recorders:
            keys.add(key)


def compiled_variants() -> int:
    """Variants Triton has compiled of the GEMM kernel on the current CUDA device (0 without)."""
    caches = getattr(_gemm_kernel, "device_caches", None)
    if not caches or not torch.cuda.is_available():
        return 0
    return sum(len(cache[0]) for cache in caches.values())


# -- host wrappers -----------------------------------------------------------------------------


def triton_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tile: GemmTile,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ weight [N, K]ᵀ (+ bias [N])`` with one menu tile; returns ``[..., N]``.

    x must be viewable as ``[M, K]`` rows with K contiguous (``row_stride``): nothing is
    copied. ``out`` (``[M, N]`` contiguous, x's dtype) is written in full when given; tests
    poison it.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"triton_gemm: weight must be [N, K={k}], got {tuple(weight.shape)}")
    stride = row_stride(x)
    if stride is None:
        raise ValueError(
            f"triton_gemm: x {tuple(x.shape)} with strides {x.stride()} is not a view of "
            "[M, K] rows with K contiguous (the Triton provider's checker declines it)"
        )
    m = math.prod(x.shape[:-1])
    x2 = x.as_strided((m, k), (stride, 1))
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or not out.is_contiguous() or out.dtype != x.dtype:
        raise ValueError(
            f"triton_gemm: out must be a contiguous [{m}, {n}] {x.dtype} tensor, got "
            f"{tuple(out.shape)} {out.dtype}"
        )
    if m > 0:
        args, meta = _args(tile, x2, weight, bias, out)
        _record(args, meta)
        grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n),)
        _gemm_kernel[grid](*args, **meta)
    return out.view(*x.shape[:-1], n)


def warm_up(
    tiles: tuple[GemmTile, ...],
    weight: torch.Tensor,
    *,
    has_bias: bool,
) -> int:
    """Compile the kernel for each tile with this weight's dtype, shape and strides, before
    the first request. Under the interpreter there is nothing to compile; the keys are still
    recorded. Returns how many variants were warmed."""
    n, k = weight.shape
    for tile in tiles:
        x2 = torch.empty((tile.block_m, k), dtype=weight.dtype, device=weight.device)
        out = torch.empty((tile.block_m, n), dtype=weight.dtype, device=weight.device)
        bias = torch.empty((n,), dtype=weight.dtype, device=weight.device) if has_bias else None
        args, meta = _args(tile, x2, weight, bias, out)
        _record(args, meta)
        if weight.is_cuda:
            _gemm_kernel.warmup(*args, grid=(1,), **meta)
    return len(tiles)
