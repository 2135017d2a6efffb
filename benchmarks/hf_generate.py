"""Hugging Face generate() on the tiny Llama: eager, Inductor, Inductor dynamic=True, xyserve and
xyserve with inductor=True, side by side in one run.

Each configuration runs in a fresh process with a fresh Inductor cache (cold compile, as in the
DESIGN.md baseline), and is measured against eager in that same process: steady rates are medians
of passes alternating with eager, so the ratio column compares like with like.

    .venv/bin/python benchmarks/hf_generate.py [--rounds 3] [--caches dynamic static]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from xy_inductor import bench


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(bench.CONFIGS), choices=list(bench.CONFIGS))
    p.add_argument(
        "--caches", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"]
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    start = time.perf_counter()
    results = []
    for cache in args.caches:
        for config in args.configs:
            print(f"measuring {config} / {cache} ...", file=sys.stderr, flush=True)
            results.append(bench.run_isolated(config, cache, args.rounds))
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{results[0].threads} threads, {args.rounds} rounds"
    )
    print(bench.format_table(results))
    by = {(r.config, r.cache): r for r in results}
    for cache in args.caches:
        ind, xy = by.get(("inductor", cache)), by.get(("xyserve", cache))
        xyi, indd = by.get(("xyserve-inductor", cache)), by.get(("inductor-dynamic", cache))
        if ind and xy:
            ratio = xy.compile_seconds / ind.compile_seconds
            print(f"{cache}: xyserve compile time / Inductor's: {ratio:.3f}")
        if indd and xyi:
            print(
                f"{cache}: xyserve-inductor steady / Inductor dynamic=True steady: "
                f"{xyi.steady_tokens_per_second / indd.steady_tokens_per_second:.2f}"
            )
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
