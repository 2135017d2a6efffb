"""Hugging Face generate() on the tiny Llama: eager, Inductor, Inductor dynamic=True, xyserve and
xyserve with inductor=True, side by side in one run (the same as ``xyserve bench``).

Each configuration runs in a fresh process with a fresh Inductor cache (cold compile, as in the
baseline of benchmarks/RESULTS.md), and is measured against eager in that same process: steady
rates are medians of passes alternating with eager, so the ratio column compares like with like.

    .venv/bin/python benchmarks/hf_generate.py [--rounds 3] [--caches dynamic static]
"""

from __future__ import annotations

import sys

from xy_inductor.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
