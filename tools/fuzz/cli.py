"""The fuzzer's command line: ``python -m tools.fuzz`` (``make fuzz``); ``--help`` lists it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from .case import load_case, save_case
from .grammar import make_case
from .runner import run_case, run_fuzz

DESCRIPTION = (
    "A differential fuzzer for the lowering: random attention and linear subgraphs, each "
    "compiled with xyserve and compared with eager."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.fuzz", description=DESCRIPTION)
    parser.add_argument("--cases", type=int, default=1000, help="how many cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first case index (default 0)")
    parser.add_argument("--case", type=int, default=None, help="run only this case index")
    parser.add_argument("--load", metavar="FILE", default=None, help="run only this saved case")
    parser.add_argument(
        "--save-failures",
        metavar="DIR",
        default=None,
        help="write each wrong or crashed case to DIR/<seed>-<case>.pt (for tests/fuzz_cases)",
    )
    args = parser.parse_args(argv)
    if args.case is not None or args.load is not None:
        case = load_case(args.load) if args.load else make_case(args.seed, args.case)
        result = run_case(case)
        print(
            f"case --seed {case.seed} --case {case.index}: {case.kind}, {case.dtype}, "
            f"dynamic={case.dynamic}, fuse_siblings={case.fuse_siblings}"
        )
        print(case.source)
        for name, value in case.inputs.items():
            print(f"  {name}: {tuple(value.shape)} {value.dtype}")
        for site in result.sites:
            print(f"  site: {site}")
        print(f"  -> {result.status} {result.detail} (error {result.error:.2e})")
        return 0 if result.status in ("ok", "known", "closer") else 1
    summary = run_fuzz(args.cases, args.seed, start=args.start, progress=True)
    print(summary)
    if args.save_failures:
        os.makedirs(args.save_failures, exist_ok=True)
        for result in summary.bad:
            if result.status in ("wrong", "crashed"):
                c = result.case
                save_case(c, os.path.join(args.save_failures, f"{c.seed}-{c.index}.pt"))
    return 0 if summary.wrong == 0 else 1
