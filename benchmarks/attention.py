"""Meta-attention on the CPU against ``F.scaled_dot_product_attention``, side by side.

    .venv/bin/python benchmarks/attention.py            # fp32, D=64, 8 heads, about 1 minute

Issue #4's CPU targets, each timed against SDPA in one process, interleaved, median of rounds:

- a left-padded batch of 4 (lengths 64, 300, 1000, 2048), causal + padding: SDPA is given the
  dense [B, 1, L, L] mask; xyserve plans the rows from their lengths and skips the padding
  (target ≥ 3×; SDPA with ``is_causal`` on each unpadded sequence is the bound to approach);
- one causal sequence of 2048 (target ≥ 0.8× of SDPA with ``is_causal=True``);
- decode, batch 8, KV 4096 (target ≥ 0.9×).

xyserve's time includes planning (``plan_attention``; decode steps hit the plan cache, as
consecutive steps do). The paged line runs the same decode through a paged KV cache (block 16)
with the generic executor, which gathers its blocks: for information, with no target. The
padded batch also runs as the op a model calls (``torch.ops.xyserve.attention`` with the mask:
its reading into rows included) on the ATen provider and on the CPU provider's native kernel
(issue 24's target: ≥ 4× SDPA with the dense mask), and the mask read alone each way.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import Stopwatch, interleaved, reps_for

from xy_inductor.kernels import aten, cpu
from xy_inductor.kernels.aten.attention import run_dense
from xy_inductor.kernels.aten.menus import ATTENTION_MENU
from xy_inductor.kernels.aten.plan_executor import run_plan
from xy_inductor.kernels.attention_plan import _plan, plan_attention, rows_from_mask
from xy_inductor.runtime import providers

H, D = 8, 64
CPU_MENU = ATTENTION_MENU  # what the ATen provider plans with


def median_ms(fns: list[Callable[[], object]], rounds: int, budget_s: float = 0.15) -> list[float]:
    """Median ms per call of each fn; each round runs every fn in turn, repeated to fill about
    ``budget_s`` (short calls are too noisy one at a time). The calls that size the repeats are
    the warm-up."""
    reps = reps_for(fns, budget_s)
    return [t.ms for t in interleaved(fns, rounds=rounds, warmup=0, reps=reps)]


def left_padded(gen: torch.Generator, rounds: int) -> list[tuple]:
    lens = [64, 300, 1000, 2048]
    b, length = len(lens), max(lens)
    q, k, v = (torch.randn(b, H, length, D, generator=gen) for _ in range(3))
    pos = torch.arange(length)
    start = torch.tensor([length - n for n in lens])
    mask = (pos[:, None] >= pos[None, :])[None, None] & (pos >= start[:, None])[:, None, None, :]

    def ours():
        _plan.cache_clear()  # a prefill batch is planned afresh
        plan = plan_attention(lens, lens, causal=True, kv_heads=H, menu=CPU_MENU)
        return run_dense(
            plan, q, k, v, q_end=[length] * b, kv_start=start.tolist(), kv_lens=lens, scale=D**-0.5
        )

    def bound():
        return [
            F.scaled_dot_product_attention(
                q[r : r + 1, :, length - n :], k[r : r + 1, :, length - n :],
                v[r : r + 1, :, length - n :], is_causal=True,
            )
            for r, n in enumerate(lens)
        ]  # fmt: skip

    def op(listed: list) -> Callable[[], torch.Tensor]:
        # The whole op as a model calls it: the mask read into rows, planning, the kernel.
        def call() -> torch.Tensor:
            with providers.use_providers(listed):
                return torch.ops.xyserve.attention(q, k, v, mask)

        return call

    on_cpu, on_aten = op([cpu.PROVIDER, aten.PROVIDER]), op([aten.PROVIDER])
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    err = (ours() - want).abs().max().item()
    err_cpu = (on_cpu() - want).abs().max().item() if cpu.PROVIDER.unavailable() is None else None
    err_aten = (on_aten() - want).abs().max().item()
    fns = [lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), ours, bound, on_aten]
    fns.append(lambda: rows_from_mask(mask, b, length, length))
    if err_cpu is not None:
        fns += [on_cpu, lambda: rows_from_mask(mask, b, length, length, cpu._mask_stats)]
    sdpa, mine, per_seq, op_aten, read_aten, *op_cpu = median_ms(fns, rounds)
    rows = [
        ("left-padded 4 (64..2048), dense mask", sdpa, mine, 3.0, err),
        ("  bound: SDPA is_causal per sequence", sdpa, per_seq, None, float("nan")),
        ("  the op on ATen (mask read included)", sdpa, op_aten, None, err_aten),
        ("    of which the mask read (ATen passes)", sdpa, read_aten, None, float("nan")),
    ]
    if op_cpu:
        rows.append(("  the op on the CPU provider (same)", sdpa, op_cpu[0], 4.0, err_cpu))
        rows.append(("    of which the mask read (one scan)", sdpa, op_cpu[1], None, float("nan")))
    return rows


def causal_one(gen: torch.Generator, rounds: int) -> list[tuple]:
    n = 2048
    q, k, v = (torch.randn(1, H, n, D, generator=gen) for _ in range(3))

    def ours():
        _plan.cache_clear()
        plan = plan_attention([n], [n], causal=True, kv_heads=H, menu=CPU_MENU)
        return run_dense(plan, q, k, v, q_end=[n], kv_start=[0], kv_lens=[n], scale=D**-0.5)

    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    err = (ours() - want).abs().max().item()
    sdpa, mine = median_ms(
        [lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), ours], rounds
    )
    return [("causal 2048, is_causal", sdpa, mine, 0.8, err)]


def decode(gen: torch.Generator, rounds: int) -> list[tuple]:
    b, kv, block = 8, 4096, 16
    q = torch.randn(b, H, 1, D, generator=gen)
    k, v = (torch.randn(b, H, kv, D, generator=gen) for _ in range(2))

    def ours():
        plan = plan_attention([1] * b, [kv] * b, causal=True, kv_heads=H, menu=CPU_MENU)
        return run_dense(plan, q, k, v, q_end=[1] * b, kv_start=[0] * b, kv_lens=[kv] * b,
                         scale=D**-0.5)  # fmt: skip

    # The same keys in a paged cache, blocks in shuffled order.
    blocks = b * kv // block
    order = torch.randperm(blocks, generator=gen)
    table = order.view(b, kv // block)
    paged_k = torch.empty(blocks, block, H, D)
    paged_v = torch.empty(blocks, block, H, D)
    paged_k[order] = k.transpose(1, 2).reshape(blocks, block, H, D)
    paged_v[order] = v.transpose(1, 2).reshape(blocks, block, H, D)
    packed = q.reshape(b, H, D)

    def paged():
        plan = plan_attention([1] * b, [kv] * b, causal=True, kv_heads=H, menu=CPU_MENU)
        return run_plan(plan, packed, paged_k, paged_v, [kv] * b, scale=D**-0.5,
                        block_table=table, block_size=block)  # fmt: skip

    want = F.scaled_dot_product_attention(q, k, v)
    err = max(
        (ours() - want).abs().max().item(),
        (paged().view(b, H, 1, D) - want).abs().max().item(),
    )
    sdpa, mine, via_pages = median_ms(
        [lambda: F.scaled_dot_product_attention(q, k, v), ours, paged], rounds
    )
    return [
        ("decode 8 x KV 4096", sdpa, mine, 0.9, err),
        ("  paged KV (block 16), gathered", sdpa, via_pages, None, err),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    clock = Stopwatch()
    rows = left_padded(gen, args.rounds) + causal_one(gen, args.rounds) + decode(gen, args.rounds)
    print(
        f"{'workload':<40} {'SDPA ms':>9} {'xyserve ms':>11} {'speed-up':>9} {'target':>7}  max err"
    )
    for name, sdpa, mine, target, err in rows:
        speedup = sdpa / mine
        verdict = "" if target is None else ("met" if speedup >= target else "NOT met")
        goal = "" if target is None else f">={target:g}x"
        err_text = "" if math.isnan(err) else f"{err:.1e}"
        print(
            f"{name:<40} {sdpa:>9.2f} {mine:>11.2f} {speedup:>8.2f}x {goal:>7}  {err_text:<8} "
            f"{verdict}"
        )
    print(
        f"fp32, D={D}, {H} heads, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU menu q tiles {CPU_MENU.q_tiles}, kv chunk {CPU_MENU.kv_chunk}; median of "
        f"{args.rounds} interleaved rounds, {clock.seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
