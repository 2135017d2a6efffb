"""What calling an xyserve op costs on top of its kernel, and what that does to a decode step.

Part 1, per call (gemm, M=1 with K=N=64, then at decode size K=512 N=1408; no grad):
  F.linear                        the kernel alone
  gemm_impl                       our checks + provider dispatch (what graphs run as traced call)
  torch.ops.xyserve.gemm          the torch.library.custom_op op (what Inductor's code calls)
  define/impl twin                the same implementation registered with torch.library.define
                                  + impl + register_fake (vLLM's direct_register_custom_op style)

Part 2 (--decode), one decode step of the tiny Llama (B=1, KV 64), each variant in this
process against eager: Inductor dynamic=True, xyserve with inductor=True as shipped
(custom_op), and the same with the lowering pointed at the define/impl twins.

    .venv/bin/python benchmarks/op_overhead.py [--decode]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.library import Library, infer_schema

import xy_inductor
from xy_inductor.runtime import ops

_LIB = Library("xyserve_twin", "FRAGMENT")
for _name, _impl, _fake in (
    ("gemm", ops.gemm_impl, ops._gemm_fake),
    ("attention", ops.attention_impl, ops._attention_fake),
):
    _LIB.define(_name + infer_schema(_impl, mutates_args=()))
    _LIB.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"xyserve_twin::{_name}", _fake, lib=_LIB)


def per_call_us(fn, n: int = 20000, repeats: int = 5) -> float:
    for _ in range(500):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def part1() -> None:
    # A tiny GEMM shows the overhead alone; the decode-size one shows it next to a real kernel.
    for m, k, n in ((1, 64, 64), (1, 512, 1408)):
        x, w = torch.randn(1, m, k), torch.randn(n, k)
        with torch.no_grad():
            rows = {
                "F.linear": per_call_us(lambda x=x, w=w: F.linear(x, w, None)),
                "gemm_impl (direct)": per_call_us(lambda x=x, w=w: ops.gemm_impl(x, w, None)),
                "custom_op": per_call_us(
                    lambda x=x, w=w: torch.ops.xyserve.gemm.default(x, w, None)
                ),
                "define/impl twin": per_call_us(
                    lambda x=x, w=w: torch.ops.xyserve_twin.gemm.default(x, w, None)
                ),
            }
        base = rows["F.linear"]
        print(f"{f'gemm call, M={m} K={k} N={n}':<30} {'us/call':>8} {'over F.linear':>14}")
        for name, us in rows.items():
            print(f"{name:<30} {us:>8.1f} {us - base:>+14.1f}")


def decode_ms(model, steps: int = 30) -> float:
    from transformers import DynamicCache

    from xy_inductor import workload as wl

    ids, _ = wl.prompt_batch([64], model.config.vocab_size, seed=0)
    times = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for s in range(steps):
            start = time.perf_counter()
            model(
                input_ids=token,
                cache=cache,
                position_ids=torch.tensor([[64 + s]]),
                use_cache=True,
                logits_to_keep=1,
            )
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def part2(rounds: int = 5) -> None:
    from xy_inductor import workload as wl
    from xy_inductor.lowering import LinearToGemm, SdpaToAttention

    torch._dynamo.config.recompile_limit = 64  # several models of one class in one process
    reference = wl.tiny_llama()
    variants = {"eager": reference}
    variants["inductor dynamic=True"] = wl.copy_model(reference)
    variants["inductor dynamic=True"].forward = torch.compile(
        variants["inductor dynamic=True"].forward, dynamic=True
    )
    variants["xyserve inductor (custom_op)"] = xy_inductor.hf.accelerate(
        wl.copy_model(reference), inductor=True
    )
    gemm_op, attention_op = LinearToGemm.lowered_op, SdpaToAttention.lowered_op
    LinearToGemm.lowered_op = lambda self: torch.ops.xyserve_twin.gemm.default
    SdpaToAttention.lowered_op = lambda self: torch.ops.xyserve_twin.attention.default
    try:
        twin = xy_inductor.hf.accelerate(wl.copy_model(reference), inductor=True)
        decode_ms(twin, 2)  # compile while the lowering targets the twins
    finally:
        LinearToGemm.lowered_op, SdpaToAttention.lowered_op = gemm_op, attention_op
    variants["xyserve inductor (define/impl)"] = twin
    for model in variants.values():
        decode_ms(model, 2)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            times[name].append(decode_ms(model))
    eager = statistics.median(times["eager"])
    print(f"\n{'decode step, B=1, KV 64':<32} {'ms':>6} {'x eager':>8}")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:<32} {ms:>6.2f} {eager / ms:>8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decode", action="store_true", help="also time decode steps (compiles)")
    args = p.parse_args()
    part1()
    if args.decode:
        part2()


if __name__ == "__main__":
    main()
