"""What calling an xyserve op costs on top of the kernel it runs, and what that does to decode.

Part 1, per call (no grad), for ``gemm`` (M=1, K=N=64, then decode size K=512 N=1408) and
``attention`` (one decode query over 64 keys, GQA 8/4, D=64):

  the kernel alone              F.linear / F.scaled_dot_product_attention
  graph run as traced           the Python implementation called directly (``DIRECT_CALLS``):
                                what a lowered graph without Inductor calls where the C++
                                kernels do not load
  torch.ops.xyserve.*           the registered op with its Python kernels: what Inductor's
                                generated code calls
  custom_op twin                the same implementation registered with
                                ``torch.library.custom_op`` (how the ops were registered
                                before), for comparison
  torch.ops.xyserve.*, C++      the registered op once the C++ CPU kernels are loaded
                                (``kernels/aten/native.py``; ``inductor=True`` loads them)

Targets: at most 2 us over the kernel from a graph run as traced, 3 us from Inductor's code.

Part 2 (--decode), one decode step of the tiny Llama (B=1, KV 64, an all-ones 2-D mask as
generate() passes it), each variant in this process
against eager: Inductor dynamic=True, xyserve, and xyserve with inductor=True, each of the last
two through ``hf.accelerate`` and through plain ``torch.compile`` (what accelerate's per-step
work costs). For the Inductor variants the step splits into the time inside Inductor's generated
code and the rest (guards, runtime wrappers, regions, accelerate's own work).

    .venv/bin/python benchmarks/op_overhead.py [--decode [--profile]]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import Stopwatch, Timing, measure

import xy_inductor
from xy_inductor.runtime import ops

_TWIN = {
    name: torch.library.custom_op(f"xyserve_twin::{name}", impl, mutates_args=())
    for name, impl in (("gemm", ops.gemm_impl), ("attention", ops.attention_impl))
}
_TWIN["gemm"].register_fake(ops._gemm_fake)
_TWIN["attention"].register_fake(ops._attention_fake)


def per_call_us(fn, n: int = 20000, repeats: int = 7) -> float:
    # The least disturbed repeat: overhead is a floor, not a distribution.
    return measure(fn, warmup=500, repeats=repeats, reps=n).min * 1e6


def _table(title: str, rows: dict[str, float]) -> None:
    base = next(iter(rows.values()))
    print(f"{title:<32} {'us/call':>8} {'over the kernel':>16}")
    for name, us in rows.items():
        print(f"{name:<32} {us:>8.2f} {us - base:>+16.2f}")


def _cases() -> list[tuple[str, str, Callable, Callable, Callable, Callable]]:
    """(title, op, the kernel alone, the op as a traced graph calls it, the registered op, its
    custom_op twin) for each measured call."""
    traced = ops.DIRECT_CALLS
    gemm, attention = torch.ops.xyserve.gemm.default, torch.ops.xyserve.attention.default
    cases = []
    # A tiny GEMM shows the overhead alone; the decode-size one next to a real kernel.
    for m, k, n in ((1, 64, 64), (1, 512, 1408)):
        x, w = torch.randn(1, m, k), torch.randn(n, k)
        cases.append(
            (
                f"gemm, M={m} K={k} N={n}",
                "gemm",
                lambda x=x, w=w: F.linear(x, w, None),
                lambda x=x, w=w: traced[gemm](x, w, None, 8192),
                lambda x=x, w=w: gemm(x, w, None, 8192),
                lambda x=x, w=w: _TWIN["gemm"](x, w, None, 8192),
            )
        )
    q, k, v = torch.randn(1, 8, 1, 64), torch.randn(1, 4, 64, 64), torch.randn(1, 4, 64, 64)
    cases.append(
        (
            "attention, decode, KV 64",
            "attention",
            lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
            lambda: traced[attention](q, k, v, None, False, None),
            lambda: attention(q, k, v, None, False, None),
            lambda: _TWIN["attention"](q, k, v, None, False, None),
        )
    )
    return cases


def part1() -> None:
    """Per-call cost with the ops' Python kernels, then with the C++ CPU kernels loaded (what
    ``inductor=True`` loads; it cannot be unloaded, so it comes second)."""
    kernel_names = {"gemm": "F.linear", "attention": "F.scaled_dot_product_attention"}
    cases = _cases()
    with torch.no_grad():
        for title, op, kernel, traced, registered, twin in cases:
            _table(
                title,
                {
                    kernel_names[op]: per_call_us(kernel),
                    "graph run as traced": per_call_us(traced),
                    f"torch.ops.xyserve.{op}": per_call_us(registered),
                    "custom_op twin": per_call_us(twin),
                },
            )
        why = ops.load_native()
        if why is not None:
            print(f"\nC++ CPU kernels not loaded: {why}")
            return
        print(
            "\nwith the C++ CPU kernels loaded (kernels/aten/native.cpp), which Inductor's code "
            "and graphs run as traced then call"
        )
        for title, op, kernel, _, registered, _ in cases:
            _table(
                title,
                {
                    kernel_names[op]: per_call_us(kernel),
                    f"torch.ops.xyserve.{op}, C++": per_call_us(registered),
                },
            )


class _CodeTimer:
    """Time spent inside Inductor's generated code (``CompiledFxGraph.__call__``, one call per
    compiled graph or region), so that a decode step splits into Inductor's code and everything
    around it: Dynamo's guards, AOT autograd's runtime wrappers, regions, ``hf.accelerate``.
    Patches that private method for the benchmark's lifetime; absent, the split is skipped."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        try:
            from torch._inductor.output_code import CompiledFxGraph
        except ImportError:
            self.available = False
            return
        self.available = True
        inner = CompiledFxGraph.__call__

        def timed(graph, inputs):
            # A bare clock: this runs inside the decode step being timed, so it must cost little.
            start = time.perf_counter()
            try:
                return inner(graph, inputs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        CompiledFxGraph.__call__ = timed


_TIMER: _CodeTimer | None = None


def decode_ms(model, steps: int = 30) -> tuple[float, float, float]:
    """Median decode step (ms), the median part of it in Inductor's code (ms), and Inductor
    code calls per step."""
    from transformers import DynamicCache

    from xy_inductor import workload as wl

    timer = _TIMER
    ids, mask = wl.prompt_batch([64], model.config.vocab_size, seed=0)
    times, code, calls = [], [], []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1
        )
        token = out.logits[:, -1:].argmax(-1)
        for s in range(steps):
            # The 2-D mask grows by one column a step, as generate() passes it.
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            if timer is not None:
                timer.seconds, timer.calls = 0.0, 0
            with Stopwatch() as step:
                model(
                    input_ids=token,
                    attention_mask=mask,
                    cache=cache,
                    position_ids=torch.tensor([[64 + s]]),
                    use_cache=True,
                    logits_to_keep=1,
                )
            times.append(step.seconds)
            if timer is not None:
                code.append(timer.seconds)
                calls.append(timer.calls)
    if not code:
        code, calls = [0.0], [0]
    return (
        Timing(times).ms,
        Timing(code).ms,
        statistics.median(calls),
    )


def profile_decode(variants: dict, names: tuple[str, ...], steps: int = 20, rows: int = 14) -> None:
    """torch.profiler's top ops by self CPU time over ``steps`` decode steps of each variant:
    where a variant's step time goes (the profiler itself inflates per-op costs)."""
    from torch.profiler import ProfilerActivity, profile

    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode_ms(variants[name], steps)
        print(f"\n{name}: {steps} decode steps under torch.profiler")
        print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50
            )
        )


def part2(rounds: int = 5, profile: bool = False) -> None:
    from xy_inductor import workload as wl

    torch._dynamo.config.recompile_limit = 64  # several models of one class in one process
    reference = wl.tiny_llama()
    variants = {"eager": reference}
    variants["inductor dynamic=True"] = wl.copy_model(reference)
    variants["inductor dynamic=True"].forward = torch.compile(
        variants["inductor dynamic=True"].forward, dynamic=True
    )
    variants["xyserve"] = xy_inductor.hf.accelerate(wl.copy_model(reference))
    variants["xyserve inductor=True"] = xy_inductor.hf.accelerate(
        wl.copy_model(reference), inductor=True
    )
    # The same backend without hf.accelerate's per-step work (masks built outside the graph,
    # sizes marked dynamic): what that wrapper costs a decode step. Plain torch.compile
    # recompiles as shapes change in generate(); here only decode runs.
    for name, options in (("xyserve", {}), ("xyserve inductor=True", {"inductor": True})):
        plain = wl.copy_model(reference)
        plain.forward = torch.compile(
            plain.forward, backend="xyserve", options=options or None, dynamic=True
        )
        variants[f"{name}, torch.compile only"] = plain
    global _TIMER
    _TIMER = _CodeTimer()
    if not _TIMER.available:
        _TIMER = None
    for model in variants.values():
        decode_ms(model, 2)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, model in variants.items():
            times[name].append(decode_ms(model))
    eager = statistics.median(t[0] for t in times["eager"])
    print(
        f"\n{'decode step, B=1, KV 64':<44} {'ms':>6} {'x eager':>8}"
        f" {'Inductor code ms':>17} {'rest ms':>8} {'code calls':>11}"
    )
    for name, ts in times.items():
        ms = statistics.median(t[0] for t in ts)
        code = statistics.median(t[1] for t in ts)
        calls = statistics.median(t[2] for t in ts)
        split = f"{code:>17.2f} {ms - code:>8.2f} {calls:>11.0f}"
        print(f"{name:<44} {ms:>6.2f} {eager / ms:>8.2f} {split}")
    if profile:
        profile_decode(variants, ("inductor dynamic=True", "xyserve inductor=True"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--decode", action="store_true", help="also time decode steps (compiles)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="with --decode: top ops of Inductor's and xyserve+Inductor's decode steps",
    )
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    part1()
    if args.decode:
        part2(profile=args.profile)


if __name__ == "__main__":
    main()
