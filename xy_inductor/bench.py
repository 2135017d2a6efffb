"""Measuring the tiny-Llama ``generate()`` workload: ``xyserve demo`` and ``xyserve bench``.

Each configuration is measured against eager PyTorch in the same process: a first pass over the
workload (which compiles), a second pass with recompiles counted, then rounds of eager and
compiled passes alternating, so that both see the same machine state. The steady rate is the
median over the rounds; the ratio is compiled over eager from the same rounds.

``bench`` runs each configuration in a fresh process, cold like the reference baseline in
DESIGN.md, and so that configurations never share Dynamo's per-function cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from xy_inductor import workload as wl

__all__ = ["CONFIGS", "Result", "format_table", "measure", "run_isolated", "summary"]


def _torch_compile(**kwargs: object) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def apply(model: torch.nn.Module) -> torch.nn.Module:
        model.forward = torch.compile(model.forward, **kwargs)
        return model

    return apply


def _xyserve(**options: object) -> Callable[[torch.nn.Module], torch.nn.Module]:
    def apply(model: torch.nn.Module) -> torch.nn.Module:
        from xy_inductor import hf

        return hf.accelerate(model, **options)

    return apply


CONFIGS: dict[str, Callable[[torch.nn.Module], torch.nn.Module] | None] = {
    "eager": None,
    "inductor": _torch_compile(),
    "inductor-dynamic": _torch_compile(dynamic=True),
    "xyserve": _xyserve(),
    "xyserve-inductor": _xyserve(inductor=True),
    "xyserve-fused": _xyserve(fuse_siblings=True),
}
"""Name -> how it is applied to a model's ``forward`` (None: eager, the reference)."""


@dataclass
class Result:
    config: str
    cache: str
    graphs: int
    """Graphs Dynamo compiled over the first pass."""
    recompiles_second_pass: int
    """Graphs compiled during the second pass over the same workload (should be 0)."""
    compile_seconds: float
    """Dynamo's compile time over both passes: tracing plus the backend."""
    first_pass_seconds: float
    steady_tokens_per_second: float
    eager_tokens_per_second: float
    ratio_to_eager: float
    identical: bool
    """Greedy tokens identical to eager on every call of every pass."""
    threads: int

    def eager_row(self) -> Result:
        """The eager reference of this measurement, as a row of its own."""
        return dataclasses.replace(
            self,
            config="eager",
            graphs=0,
            recompiles_second_pass=0,
            compile_seconds=0.0,
            first_pass_seconds=0.0,
            steady_tokens_per_second=self.eager_tokens_per_second,
            ratio_to_eager=1.0,
            identical=True,
        )


def measure(
    config: str,
    cache: str = "dynamic",
    rounds: int = 3,
    workload: Sequence[Sequence[int]] = wl.WORKLOAD,
    new_tokens: int = wl.NEW_TOKENS,
    progress: Callable[[], None] | None = None,
) -> Result:
    """Measure one configuration against eager in this process (see the module docstring)."""
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; expected one of {', '.join(CONFIGS)}")
    reference = wl.tiny_llama()
    model = wl.copy_model(reference)
    apply = CONFIGS[config]
    if apply is not None:
        model = apply(model)

    def one_pass(m: torch.nn.Module) -> wl.PassResult:
        return wl.generate_pass(m, cache, workload, new_tokens, progress)

    expected = one_pass(reference).outputs
    graphs0, seconds0 = wl.graphs_compiled(), wl.compile_seconds()
    first = one_pass(model)
    graphs = wl.graphs_compiled() - graphs0
    second = one_pass(model)
    recompiles = wl.graphs_compiled() - graphs0 - graphs
    compile_seconds = wl.compile_seconds() - seconds0
    identical = all(
        torch.equal(a, b)
        for run in (first, second)
        for a, b in zip(expected, run.outputs, strict=True)
    )
    eager_runs, model_runs = [], []
    for _ in range(rounds):
        eager_runs.append(one_pass(reference))
        model_runs.append(one_pass(model))
        identical &= all(
            torch.equal(a, b) for a, b in zip(expected, model_runs[-1].outputs, strict=True)
        )
    steady = wl.median_tokens_per_second(model_runs)
    eager = wl.median_tokens_per_second(eager_runs)
    return Result(
        config=config,
        cache=cache,
        graphs=graphs,
        recompiles_second_pass=recompiles,
        compile_seconds=compile_seconds,
        first_pass_seconds=first.seconds,
        steady_tokens_per_second=steady,
        eager_tokens_per_second=eager,
        ratio_to_eager=steady / eager,
        identical=identical,
        threads=torch.get_num_threads(),
    )


def passes_per_measure(rounds: int) -> int:
    return 3 + 2 * rounds  # reference, first, second, then eager + compiled per round


def run_isolated(config: str, cache: str, rounds: int, workload_size: int | None = None) -> Result:
    """``measure`` in a fresh Python process (cold compile caches, no shared Dynamo state)."""
    cmd = [sys.executable, "-m", "xy_inductor.bench", "--one", config, "--cache", cache]
    cmd += ["--rounds", str(rounds)]
    if workload_size is not None:
        cmd += ["--calls", str(workload_size)]
    with tempfile.TemporaryDirectory(prefix="xyserve-bench-") as cache_dir:
        # A fresh Inductor cache directory: compile times are cold, as in a new deployment.
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{config}/{cache} failed:\n{proc.stderr[-4000:]}")
    return Result(**json.loads(proc.stdout.strip().splitlines()[-1]))


def format_table(results: Sequence[Result]) -> str:
    header = (
        f"{'config':<18} {'cache':<8} {'graphs':>6} {'2nd-pass':>8} {'compile s':>9} "
        f"{'steady tok/s':>12} {'x eager':>7}  identical"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.config:<18} {r.cache:<8} {r.graphs:>6} {r.recompiles_second_pass:>8} "
            f"{r.compile_seconds:>9.1f} {r.steady_tokens_per_second:>12.1f} "
            f"{r.ratio_to_eager:>7.2f}  {'yes' if r.identical else 'NO'}"
        )
    return "\n".join(lines)


def summary(results: Sequence[Result]) -> str:
    """The header line and the two ratios the targets are stated in."""
    first = results[0]
    lines = [
        f"torch {torch.__version__}, {platform.machine()}, {first.threads} threads, "
        f"tokens/s = new tokens over wall time of a pass (median over rounds)"
    ]
    by = {(r.config, r.cache): r for r in results}
    for cache in dict.fromkeys(r.cache for r in results):
        ind, xy = by.get(("inductor", cache)), by.get(("xyserve", cache))
        xyi, ind_dyn = by.get(("xyserve-inductor", cache)), by.get(("inductor-dynamic", cache))
        if ind and xy:
            ratio = xy.compile_seconds / ind.compile_seconds
            lines.append(f"{cache}: xyserve compile time / Inductor's: {ratio:.3f}")
        if ind_dyn and xyi:
            lines.append(
                f"{cache}: x eager, xyserve-inductor vs Inductor dynamic=True: "
                f"{xyi.ratio_to_eager:.2f} vs {ind_dyn.ratio_to_eager:.2f}"
            )
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    # Worker entry for run_isolated: measure one configuration, print it as JSON.
    p = argparse.ArgumentParser(prog="python -m xy_inductor.bench")
    p.add_argument("--one", required=True, choices=list(CONFIGS))
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=None, help="use only the first N workload calls")
    args = p.parse_args(argv)
    calls = wl.WORKLOAD[: args.calls] if args.calls else wl.WORKLOAD
    start = time.perf_counter()
    result = measure(args.one, args.cache, args.rounds, calls)
    print(f"{args.one}/{args.cache}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
