"""Regional against whole-graph Inductor compilation under ``inductor=True``: compile seconds and
decode-step time of the tiny Llama with 4 and 16 layers.

Each variant runs in a fresh process with a fresh Inductor cache directory (cold compile, as in a
new deployment). Compile: the first ``generate()`` of one new token (the packed prefill graph),
then of two (the decode graph). Decode step: (``generate()`` of 33 new tokens - of 1) / 32, median
over 7 rounds.

    .venv/bin/python benchmarks/regions.py [--layers 4 16]      # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from timing import paired, time_once


def _one(layers: int, regions: bool) -> dict[str, float]:
    import torch

    from xy_inductor import hf
    from xy_inductor import workload as wl

    model = hf.accelerate(
        wl.tiny_llama(num_hidden_layers=layers), inductor=True, inductor_regions=regions
    )
    ids, mask = wl.prompt_batch((7,), model.config.vocab_size, seed=0)

    def generate(new: int) -> None:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False)

    compile_s = time_once(lambda: generate(1)) + time_once(lambda: generate(2))
    long, short = paired(lambda: generate(33), lambda: generate(1), rounds=7, warmup=0)
    step_ms = (long.median - short.median) / 32 * 1e3
    return {"compile_s": compile_s, "step_ms": step_ms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 16])
    p.add_argument("--one", nargs=2, metavar=("LAYERS", "REGIONS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(_one(int(args.one[0]), args.one[1] == "1")))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'layers':>6} {'compile':<8} {'compile s':>9} {'decode step ms':>14}")
    for layers in args.layers:
        for regions in (False, True):
            with tempfile.TemporaryDirectory(prefix="xyserve-regions-") as cache_dir:
                env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
                cmd = [sys.executable, __file__, "--one", str(layers), str(int(regions))]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            name = "regions" if regions else "whole"
            print(f"{layers:>6} {name:<8} {r['compile_s']:>9.1f} {r['step_ms']:>14.2f}")


if __name__ == "__main__":
    main()
