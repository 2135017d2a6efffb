"""The CPU provider's kernel on large_decode over vLLM's two KV cache layouts, side by side.

    .venv/bin/python benchmarks/cpu_layouts.py [--rounds 7]

32 decode rows of 2048 keys, Hq 8, Hkv 2, D 128, blocks of 128 (vLLM's large_decode at
Llama-3-8B TP 4), shuffled block table. ``LBNHC``: a block is ``[block_size, Hkv, D + Dv]``;
``LBHNC``: ``[Hkv, block_size, D + Dv]`` (each KV head's slots contiguous). The same kernel
reads both through their strides; the rate is the cache's bytes over the step's time.
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import interleaved, reps_for

from xy_inductor.kernels import cpu
from xy_inductor.kernels.calls import VarlenAttention

ROWS, KV, HQ, HKV, D, BLOCK = 32, 2048, 8, 2, 128, 128


def step(dtype: torch.dtype, layout: str, gen: torch.Generator):
    blocks = ROWS * KV // BLOCK
    table = torch.randperm(blocks, generator=gen).to(torch.int32).view(ROWS, KV // BLOCK)
    if layout == "LBNHC":
        cache = torch.randn(blocks, BLOCK, HKV, 2 * D, generator=gen).to(dtype)
    else:
        cache = torch.randn(blocks, HKV, BLOCK, 2 * D, generator=gen).to(dtype).transpose(1, 2)
    q = torch.randn(ROWS, HQ, D, generator=gen).to(dtype)
    call = VarlenAttention(
        q, cache[..., :D], cache[..., D:], [1] * ROWS, [KV] * ROWS, table, True, None, None
    )
    accept = cpu.check_attention_varlen(call)
    return (lambda: cpu.run_attention_varlen(call, accept)), cache.numel() * cache.element_size()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    reason = cpu.PROVIDER.unavailable()
    if reason is not None:
        print(f"the CPU provider is unavailable here: {reason}", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for dtype in (torch.float32, torch.bfloat16):
        (a, nbytes), (b, _) = step(dtype, "LBNHC", gen), step(dtype, "LBHNC", gen)
        t_a, t_b = interleaved([a, b], rounds=args.rounds, reps=reps_for([a, b], 0.1))
        for name, t in (("LBNHC", t_a), ("LBHNC", t_b)):
            print(f"{dtype!s:<15} {name}  {t.ms:7.3f} ms  {nbytes / t.median / 1e9:5.1f} GB/s")
        print(f"{dtype!s:<15} LBHNC / LBNHC time: {t_b.median / t_a.median:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
