"""The ``xyserve`` console script: ``demo``, ``bench``, ``explain``, ``plan``, ``providers``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from xy_inductor import bench
from xy_inductor import workload as wl
from xy_inductor.config import XyConfig
from xy_inductor.explainer import explain
from xy_inductor.kernels.aten import native
from xy_inductor.kernels.cpu import build as cpu_build
from xy_inductor.runtime import ops, providers
from xy_inductor.runtime.providers import plan_gemm

__all__ = ["main"]


def _progress(total: int, desc: str):
    from tqdm import tqdm  # optional (the hf extra): imported only by commands that show progress

    return tqdm(total=total, desc=desc, unit="call", file=sys.stderr, dynamic_ncols=True)


def demo(args: argparse.Namespace) -> int:
    """Eager vs xyserve on the built-in tiny Llama, both Hugging Face caches, and the time to
    first token of a padded prefill; with --inductor, Inductor and xyserve+Inductor too."""
    calls = wl.WORKLOAD[: args.calls] if args.calls else wl.WORKLOAD
    caches = ("dynamic", "static")
    configs = ("xyserve", "xyserve-inductor", "inductor-dynamic") if args.inductor else ("xyserve",)
    lengths = ", ".join(map(str, bench.PREFILL_LENGTHS))
    print(
        f"tiny Llama (random weights, {wl.TINY_LLAMA['num_hidden_layers']} layers, "
        f"hidden {wl.TINY_LLAMA['hidden_size']}), {len(calls)} generate() calls of "
        f"{wl.NEW_TOKENS} new tokens, prompt lengths 1..{max(max(c) for c in calls)}, "
        f"batches 1..{max(len(c) for c in calls)}, {torch.get_num_threads()} threads; "
        f"TTFT: first token of a left-padded batch of {lengths} tokens",
        flush=True,
    )
    start = time.perf_counter()
    results = []
    per = bench.passes_per_measure(args.rounds) * len(calls)
    total = len(configs) * (len(caches) * per + args.prefill_rounds)
    with _progress(total, f"eager vs {', '.join(configs)}") as bar:
        for config in configs:
            for cache in caches:
                torch._dynamo.reset()  # each configuration from a cold Dynamo cache
                prefill = args.prefill_rounds if cache == caches[0] else 0
                result = bench.measure(
                    config, cache, args.rounds, calls, progress=bar.update, prefill_rounds=prefill
                )
                results += [result] if config != configs[0] else [result.eager_row(), result]
    print(bench.format_table(results))
    print(
        f"graphs: compiled by Dynamo over the first pass; 2nd-pass: recompiles on a second pass "
        f"(want 0); steady: median of {args.rounds} passes alternating with eager; TTFT: median "
        f"of {args.prefill_rounds}. {time.perf_counter() - start:.0f} s in all."
    )
    ok = all(r.identical and r.prefill_identical for r in results)
    return 0 if ok and all(r.recompiles_second_pass == 0 for r in results) else 1


def bench_cmd(args: argparse.Namespace) -> int:
    """Every configuration, each in a fresh process, side by side."""
    start = time.perf_counter()
    results = []
    for cache in args.caches:
        for config in args.configs:
            print(f"measuring {config} / {cache} ...", file=sys.stderr, flush=True)
            prefill = args.prefill_rounds if cache == args.caches[0] else 0
            results.append(bench.run_isolated(config, cache, args.rounds, args.calls, prefill))
    print(bench.format_table(results))
    print(bench.summary(results))
    seconds = time.perf_counter() - start
    print(f"{args.rounds} rounds, each configuration in a fresh process; {seconds:.0f} s")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"plot: {args.plot}")
    return 0


def _family_rows(families: Sequence[str]) -> list[tuple[str, str, object]]:
    rows = []
    for family in families:
        for attn in ("sdpa", "eager"):
            if family == "minilm":
                model, tokenizer = wl.minilm(attn)
                batch = dict(
                    tokenizer(
                        ["A sentence.", "Another, longer one."], padding=True, return_tensors="pt"
                    )
                )
            else:
                model = wl.tiny_model(family, attn)
                ids, mask = wl.prompt_batch([9, 5], model.config.vocab_size, seed=0)
                batch = {"input_ids": ids, "attention_mask": mask}
            with torch.no_grad():
                rows.append((family, attn, explain(model, **batch)))
            torch._dynamo.reset()
    return rows


def explain_cmd(args: argparse.Namespace) -> int:
    """What xyserve lowers: the tiny Llama as generate() calls it, or model families."""
    # Imported here, not with the rest: xy_inductor.hf imports transformers, which only the
    # commands that run Hugging Face models need.
    from xy_inductor import hf

    if args.family is None:
        model = hf.accelerate(wl.tiny_llama(num_hidden_layers=args.layers))
        ids, mask = wl.prompt_batch([args.length], model.config.vocab_size, seed=0)
        with torch.no_grad():
            print(explain(model, input_ids=ids, attention_mask=mask, logits_to_keep=1))
        return 0
    families = [*wl.FAMILIES, "minilm"] if args.family == "all" else [args.family]
    rows = _family_rows(families)
    if len(rows) == 2 and args.family != "all":
        for family, attn, report in rows:
            print(f"{family} ({attn} attention)\n{report}\n")
        return 0
    print("| model | attention | attention sites lowered | linear sites lowered |")
    print("| --- | --- | --- | --- |")
    for family, attn, r in rows:
        print(
            f"| {family} | {attn} | {r.attention_lowered} / {r.attention_total} "
            f"| {r.linear_lowered} / {r.linear_total} |"
        )
    return 0 if all(not r.unlowered for _, _, r in rows) else 1


def plan_cmd(args: argparse.Namespace) -> int:
    """Which GEMM tile serves which M for an (N, K): the SmoothGEMM plan."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        plan = plan_gemm(
            args.n, args.k, dtype=dtype, max_tokens=args.max_tokens, provider=args.provider
        )
    except ValueError as e:
        print(f"xyserve plan: {e}", file=sys.stderr)
        return 2
    print(plan)
    return 0


def providers_cmd(args: argparse.Namespace) -> int:
    """Which kernel providers this machine can run, in priority order, and why not the others;
    whether the C++ CPU kernels are built (--build builds them now, once per machine)."""
    if args.build:
        ops.load_native()
        cpu_build.why_not_loaded()  # builds them; status() below says why not

    listed = providers.describe()
    width = max(len(name) for name, _ in listed)
    for name, reason in listed:
        print(f"{name:<{width}}  {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"CPU attention kernels (attention_varlen): {cpu_build.status()}")
    active = ", ".join(p.name for p in providers.active_providers())
    print(f"xyserve ops try, in order: {active}")
    why = native.status()
    print("C++ CPU kernels (gemm, attention): " + ("loaded" if why is None else f"no: {why}"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``xyserve`` command line (``argv`` as ``sys.argv[1:]``); its exit status."""
    parser = argparse.ArgumentParser(prog="xyserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help=demo.__doc__)
    p.add_argument("--rounds", type=int, default=2, help="steady-state rounds (default 2)")
    p.add_argument("--calls", type=int, default=None, help="only the first N workload calls")
    p.add_argument("--prefill-rounds", type=int, default=2, help="TTFT rounds (default 2)")
    p.add_argument(
        "--inductor",
        action="store_true",
        help="also Inductor dynamic=True and xyserve with inductor=True (compiles for minutes)",
    )
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help=bench_cmd.__doc__)
    p.add_argument("--configs", nargs="+", default=list(bench.CONFIGS), choices=list(bench.CONFIGS))
    p.add_argument(
        "--caches", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=None, help="only the first N workload calls")
    p.add_argument(
        "--prefill-rounds", type=int, default=3, help="TTFT rounds, first cache only (0: skip)"
    )
    p.add_argument("--plot", help="write tokens/s and compile seconds per config to this PNG")
    p.set_defaults(run=bench_cmd)
    p = sub.add_parser("explain", help=explain_cmd.__doc__)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=17, help="prompt length traced")
    p.add_argument(
        "--family",
        choices=["all", "llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "minilm"],
        help="explain tiny random-weight models of a family (or the real MiniLM) instead",
    )
    p.set_defaults(run=explain_cmd)
    p = sub.add_parser("plan", help=plan_cmd.__doc__)
    p.add_argument("n", type=int, help="output features (rows of the weight)")
    p.add_argument("k", type=int, help="input features")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--max-tokens", type=int, default=XyConfig().max_tokens)
    p.add_argument("--provider", choices=["triton", "aten"], default="triton")
    p.set_defaults(run=plan_cmd)
    p = sub.add_parser("providers", help=providers_cmd.__doc__)
    p.add_argument(
        "--build",
        action="store_true",
        help="build the C++ CPU kernels now (else the first compile or call does)",
    )
    p.set_defaults(run=providers_cmd)
    args = parser.parse_args(argv)
    if getattr(args, "rounds", 1) < 1:
        parser.error("--rounds must be at least 1")
    if getattr(args, "calls", None) is not None and args.calls < 1:
        parser.error("--calls must be at least 1")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
