"""``xyserve.attention_packed`` (Hugging Face's packed prefill) on the CPU: the CPU provider's
native kernel against the ATen provider, side by side.

    .venv/bin/python benchmarks/packed_cpu.py [--rounds 7] [--dtypes fp32,bf16]

Each case packs causal sequences back to back (q ``[tokens, Hq, D]``, k/v ``[tokens, Hkv, D]``)
and runs the op under ``use_providers([cpu, aten])`` and ``use_providers([aten])``, alternating,
median of rounds (``benchmarks/timing.py``); both outputs are checked against each other first.
Ratio = ATen ms / cpu ms (> 1: the native kernel is faster).
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import interleaved, reps_for

from xy_inductor.kernels import aten, cpu
from xy_inductor.runtime import providers

# (sequence lengths, Hq, Hkv, D): a tiny HF model's batch, a Llama-3-8B-like batch, many short.
CASES = [
    ([300, 300, 300, 300], 8, 2, 64),
    ([1000, 37, 512], 32, 8, 128),
    ([64] * 16, 4, 4, 64),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args(argv)
    reason = cpu.PROVIDER.unavailable()
    if reason is not None:
        print(f"the CPU provider is unavailable here: {reason}", file=sys.stderr)
        return 1
    op = torch.ops.xyserve.attention_packed
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    head = f"{'dtype':<5} {'lens':<22} {'Hq':>3} {'Hkv':>3} {'D':>4} {'aten ms':>9} {'cpu ms':>8}"
    print(head + " ratio")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for lens, hq, hkv, d in CASES:
            t = sum(lens)
            q = torch.randn(t, hq, d, generator=gen).to(dtype)
            k = torch.randn(t, hkv, d, generator=gen).to(dtype)
            v = torch.randn(t, hkv, d, generator=gen).to(dtype)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)

            def run(listed: list, q=q, k=k, v=v, cu=cu) -> torch.Tensor:
                with providers.use_providers(listed):
                    return op(q, k, v, cu, True, None, None)

            def with_aten() -> torch.Tensor:
                return run([aten.PROVIDER])

            def with_cpu() -> torch.Tensor:
                return run([cpu.PROVIDER, aten.PROVIDER])

            a, c = with_aten().double(), with_cpu().double()
            err = ((a - c).norm() / a.norm()).item()
            if err > TOLERANCE[dtype]:
                print(f"outputs differ: relative error {err:.1e}", file=sys.stderr)
                return 1
            fns = [with_aten, with_cpu]
            t_aten, t_cpu = interleaved(fns, rounds=args.rounds, reps=reps_for(fns, 0.1))
            shown = str(lens) if len(lens) < 5 else f"[{lens[0]}] * {len(lens)}"
            print(
                f"{name:<5} {shown:<22} {hq:>3} {hkv:>3} {d:>4} {t_aten.ms:>9.3f} "
                f"{t_cpu.ms:>8.3f} {t_aten.median / t_cpu.median:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
