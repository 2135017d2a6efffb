"""SmoothGEMM against the vendor library, per M, on the linear shapes of Llama-2-7B and Qwen2.5-7B.

    .venv/bin/python benchmarks/gemm.py                    # the device's default: CUDA if present
    .venv/bin/python benchmarks/gemm.py --overhead         # CPU: the op's overhead over F.linear

Per (shape, M): ``xyserve.gemm`` through the provider list (Triton on CUDA, the ATen provider on
the CPU) against ``torch.mm(x, w.t())`` (cuBLAS on CUDA, oneDNN/MKL on the CPU), timed side by
side in one process, interleaved, median of rounds. Prints a table with TFLOP/s and the ratio,
the geometric mean of the ratios per model and overall, the smallest ratio, and which provider
and tile served each M; ``--plot`` writes TFLOP/s against M as a PNG (needs matplotlib:
``pip install -e .[bench]``).

On CUDA the xyserve column times the planned Triton kernel (the tile ``plan_gemm`` picks for
that M, compiled before timing) and the baseline ``torch.mm``, both with Triton's CUDA-graph
timer, so Python launch costs stay out of both. On the CPU both run as Python calls, and the
xyserve column includes the op's own checks and dispatch.

``--overhead`` measures what the CPU provider adds: ``F.linear`` against ``gemm_impl`` (what
graphs that run as traced call) and the ``torch.ops.xyserve.gemm`` custom op (what Inductor's
code calls), K = N = 2048, fp32, M in 1, 7, 64, 129, 1000, 4096. The target is under 3%.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import Stopwatch, interleaved, reps_for, warm_up

import xy_inductor
from xy_inductor.kernels.gemm_plan import plan_gemm
from xy_inductor.runtime import providers
from xy_inductor.runtime.ops import gemm_impl

# (model, layer, K, N): x [M, K] @ W [N, K]ᵀ. Llama-2-7B: hidden 4096, MLP 11008 (gate and up
# fused: 22016), 32 heads of 128 (q/k/v fused: 12288). Qwen2.5-7B: hidden 3584, MLP 18944,
# 28 query heads and 4 KV heads of 128 (q/k/v fused: 3584 + 2 * 512 = 4608).
SHAPES = [
    ("llama2-7b", "qkv", 4096, 12288),
    ("llama2-7b", "o", 4096, 4096),
    ("llama2-7b", "gate_up", 4096, 22016),
    ("llama2-7b", "down", 11008, 4096),
    ("qwen2.5-7b", "qkv", 3584, 4608),
    ("qwen2.5-7b", "o", 3584, 3584),
    ("qwen2.5-7b", "gate_up", 3584, 37888),
    ("qwen2.5-7b", "down", 18944, 3584),
]
MS = [1, 2, 3, 8, 17, 64, 100, 128, 129, 257, 512, 1000, 1024, 2048, 4096]
OVERHEAD_MS = [1, 7, 64, 129, 1000, 4096]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cpu_median_s(fns: list[Callable[[], object]], rounds: int, budget_s: float) -> list[float]:
    """Median seconds per call of each fn, interleaved: each round runs every fn in turn; the
    repeats are sized on the first fn so that the whole measurement takes about ``budget_s``."""
    warm_up(fns)
    reps = reps_for(fns[:1], budget_s / (len(fns) * rounds), max_reps=1000)
    return [t.median for t in interleaved(fns, rounds=rounds, warmup=0, reps=reps)]


def cuda_median_s(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Median over rounds of each fn's time by Triton's CUDA-graph timer (itself a median)."""
    from triton.testing import do_bench_cudagraph

    def sample(fn: Callable[[], object]) -> float:
        return do_bench_cudagraph(fn, rep=50, return_mode="median") / 1e3

    return [t.median for t in interleaved(fns, rounds=rounds, warmup=0, sampler=sample)]


def compare(args: argparse.Namespace) -> list[dict]:
    device = args.device
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for model, layer, k, n in SHAPES:
        if args.models and model not in args.models:
            continue
        w = (torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype).to(device)
        plan = (
            plan_gemm(n, k, dtype=dtype, max_tokens=args.max_tokens) if device == "cuda" else None
        )
        if device == "cuda":
            from xy_inductor.kernels.calls import GemmWeight
            from xy_inductor.kernels.triton import warm_up_gemm

            rows_served = (1, args.max_tokens)
            warm_up_gemm(
                GemmWeight(w, has_bias=False, max_tokens=args.max_tokens, rows=rows_served)
            )
        for m in args.m:
            x = torch.randn(m, k, generator=gen).to(dtype).to(device)
            before = xy_inductor.stats().calls.get("gemm", {})
            ref = gemm_impl(x, w, None, args.max_tokens)
            after = xy_inductor.stats().calls.get("gemm", {})
            provider = next(p for p in after if after[p] != before.get(p, 0))
            want = torch.mm(x.float(), w.float().t())
            err = ((ref.float() - want).norm() / want.norm()).item()
            if not err < 2e-2:
                raise SystemExit(f"{model} {layer} M={m}: relative error {err:.2e}")
            if device == "cuda":
                from xy_inductor.kernels.triton.gemm import triton_gemm

                tile = plan.tile_for(m)
                out = torch.empty(m, n, dtype=dtype, device=device)
                ours, base = cuda_median_s(
                    [
                        lambda x=x, w=w, t=tile, o=out: triton_gemm(x, w, None, t, o),
                        lambda x=x, w=w: torch.mm(x, w.t()),
                    ],
                    args.rounds,
                )
                served = f"{provider} {tile.name}"
            else:
                ours, base = cpu_median_s(
                    [
                        lambda x=x, w=w: gemm_impl(x, w, None, args.max_tokens),
                        lambda x=x, w=w: torch.mm(x, w.t()),
                    ],
                    args.rounds,
                    args.budget,
                )
                served = provider
            flops = 2 * m * n * k
            rows.append(
                {
                    "model": model, "layer": layer, "k": k, "n": n, "m": m,
                    "ours_ms": ours * 1e3, "base_ms": base * 1e3,
                    "ours_tflops": flops / ours / 1e12, "base_tflops": flops / base / 1e12,
                    "ratio": base / ours, "served": served,
                }
            )  # fmt: skip
            r = rows[-1]
            print(
                f"{model:<11} {layer:<8} {k:>5}->{n:<6} {m:>5} {r['ours_ms']:>9.3f} "
                f"{r['base_ms']:>9.3f} {r['ours_tflops']:>8.3f} {r['base_tflops']:>8.3f} "
                f"{r['ratio']:>6.3f}  {served}",
                flush=True,
            )
    return rows


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ratios = [r["ratio"] for r in rows if r["model"] == model]
        lines.append(f"geomean {model:<11} {math.exp(statistics.fmean(map(math.log, ratios))):.3f}")
    ratios = [r["ratio"] for r in rows]
    worst = min(rows, key=lambda r: r["ratio"])
    lines.append(f"geomean all         {math.exp(statistics.fmean(map(math.log, ratios))):.3f}")
    lines.append(
        f"lowest              {worst['ratio']:.3f} ({worst['model']} {worst['layer']} "
        f"M={worst['m']}); M below 0.8x: {sum(r < 0.8 for r in ratios)} of {len(ratios)}"
    )
    return lines


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys((r["model"], r["layer"], r["k"], r["n"]) for r in rows))
    cols = 4
    fig, axes = plt.subplots(
        math.ceil(len(shapes) / cols), cols, figsize=(16, 4 * math.ceil(len(shapes) / cols)),
        squeeze=False,
    )  # fmt: skip
    for ax, (model, layer, k, n) in zip(axes.flat, shapes, strict=False):
        mine = [r for r in rows if (r["model"], r["layer"]) == (model, layer)]
        ms = [r["m"] for r in mine]
        ax.plot(ms, [r["ours_tflops"] for r in mine], "o-", label="xyserve.gemm")
        ax.plot(ms, [r["base_tflops"] for r in mine], "s--", label="torch.mm")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model} {layer} ({k}->{n})")
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(shapes) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def overhead(args: argparse.Namespace) -> None:
    """Two estimates of what the op adds: the difference of medians at K = N = 2048 (direct,
    but as noisy as the machine: several % here), and the op's fixed cost per call measured
    on a GEMM too small to matter (K = N = 8), divided by F.linear's time (precise)."""
    k = n = 2048
    gen = torch.Generator().manual_seed(0)
    op = torch.ops.xyserve.gemm.default

    def variants(x: torch.Tensor, w: torch.Tensor) -> list[Callable[[], object]]:
        return [lambda: F.linear(x, w), lambda: gemm_impl(x, w), lambda: op(x, w, None)]

    tiny = cpu_median_s(variants(torch.randn(1, 8), torch.randn(8, 8)), 15, 1.0)
    fixed_direct_s, fixed_op_s = tiny[1] - tiny[0], tiny[2] - tiny[0]
    print(
        f"fixed cost per call (K=N=8): F.linear {tiny[0] * 1e6:.1f} us, gemm_impl "
        f"+{fixed_direct_s * 1e6:.1f} us, custom op +{fixed_op_s * 1e6:.1f} us"
    )
    w = torch.randn(n, k, generator=gen)
    print(f"K=N={k}, fp32, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(
        f"{'M':>5} {'F.linear ms':>12} {'gemm_impl':>10} {'custom op':>10}   "
        f"{'measured: impl / op':>20}   {'fixed cost / F.linear: impl / op':>32}"
    )
    for m in OVERHEAD_MS:
        x = torch.randn(m, k, generator=gen)
        base, direct, custom = cpu_median_s(variants(x, w), args.rounds, args.budget)
        print(
            f"{m:>5} {base * 1e3:>12.3f} {direct * 1e3:>10.3f} {custom * 1e3:>10.3f}   "
            f"{direct / base - 1:>+9.2%} / {custom / base - 1:>+8.2%}   "
            f"{fixed_direct_s / base:>+20.3%} / {fixed_op_s / base:>+9.3%}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--m", type=int, nargs="+", default=MS)
    parser.add_argument("--models", nargs="+", choices=["llama2-7b", "qwen2.5-7b"])
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--budget", type=float, default=0.3, help="CPU: seconds per round")
    parser.add_argument("--plot", help="write TFLOP/s against M to this PNG")
    parser.add_argument("--overhead", action="store_true", help="CPU provider overhead only")
    args = parser.parse_args()
    if args.overhead:
        overhead(args)
        return
    if args.device == "cuda" and not any(p.name == "triton" for p in providers.active_providers()):
        raise SystemExit("--device cuda needs the Triton provider (pip install -e .[triton])")
    clock = Stopwatch()
    header = (
        f"{'model':<11} {'layer':<8} {'K->N':>12} {'M':>5} {'xy ms':>9} {'mm ms':>9} "
        f"{'xy TF/s':>8} {'mm TF/s':>8} {'mm/xy':>6}  served by"
    )
    print(header)
    rows = compare(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    for line in summary(rows):
        print(line)
    print(
        f"{args.dtype}, {args.device} ({device or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds, "
        f"{clock.seconds:.0f} s; mm/xy > 1 means xyserve is faster"
    )
    if args.plot:
        plot(rows, args.plot, f"xyserve.gemm vs torch.mm, {args.dtype}, {args.device} ({device})")


if __name__ == "__main__":
    sys.exit(main())
