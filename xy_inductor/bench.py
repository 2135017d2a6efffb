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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from xy_inductor import workload as wl

__all__ = [
    "CONFIGS",
    "PREFILL_LENGTHS",
    "Result",
    "format_table",
    "measure",
    "measure_prefill",
    "plot",
    "run_isolated",
    "summary",
]


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
    "xyserve-inductor-regions": _xyserve(inductor=True, inductor_regions=True),
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
    prefill_ms: float = 0.0
    """Time to first token of the padded prefill batch (``PREFILL_LENGTHS``), median."""
    prefill_eager_ms: float = 0.0
    """The same for eager, measured alternating with it in the same process."""
    prefill_identical: bool = True
    """The first token of every prompt equal to eager's."""

    @property
    def prefill_speedup(self) -> float:
        return self.prefill_eager_ms / self.prefill_ms if self.prefill_ms else 0.0

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
            prefill_ms=self.prefill_eager_ms,
            prefill_identical=True,
        )


def measure(
    config: str,
    cache: str = "dynamic",
    rounds: int = 3,
    workload: Sequence[Sequence[int]] = wl.WORKLOAD,
    new_tokens: int = wl.NEW_TOKENS,
    progress: Callable[[], None] | None = None,
    prefill_rounds: int = 0,
) -> Result:
    """Measure one configuration against eager in this process (see the module docstring);
    with ``prefill_rounds``, also its time to first token on the padded prefill batch."""
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
    prefill = (0.0, 0.0, True)
    if prefill_rounds:
        prefill = measure_prefill(model, reference, prefill_rounds, progress=progress)
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
        prefill_ms=prefill[0],
        prefill_eager_ms=prefill[1],
        prefill_identical=prefill[2],
    )


# A left-padded batch whose prompts differ a lot: padded to 4 x 2048 = 8192 rows for 3412 real
# tokens, the case packing (and planned attention) are for.
PREFILL_LENGTHS: tuple[int, ...] = (64, 300, 1000, 2048)


def measure_prefill(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    rounds: int = 3,
    lengths: Sequence[int] = PREFILL_LENGTHS,
    progress: Callable[[], None] | None = None,
) -> tuple[float, float, bool]:
    """Time to first token of ``generate()`` on a left-padded batch of ``lengths``: (model ms,
    eager ms, same first tokens), medians of ``rounds`` runs alternating with eager after one
    warm-up each (which compiles)."""
    ids, mask = wl.prompt_batch(lengths, reference.config.vocab_size, seed=1000)

    def first_token(m: torch.nn.Module) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
        return (time.perf_counter() - start) * 1e3, out

    _, want = first_token(reference)
    _, got = first_token(model)
    identical = torch.equal(want, got)
    ours, eager = [], []
    for _ in range(rounds):
        eager.append(first_token(reference)[0])
        ms, got = first_token(model)
        ours.append(ms)
        identical &= torch.equal(want, got)
        if progress is not None:
            progress()
    return statistics.median(ours), statistics.median(eager), identical


def passes_per_measure(rounds: int) -> int:
    return 3 + 2 * rounds  # reference, first, second, then eager + compiled per round


def run_isolated(
    config: str,
    cache: str,
    rounds: int,
    workload_size: int | None = None,
    prefill_rounds: int = 0,
) -> Result:
    """``measure`` in a fresh Python process (cold compile caches, no shared Dynamo state)."""
    cmd = [sys.executable, "-m", "xy_inductor.bench", "--one", config, "--cache", cache]
    cmd += ["--rounds", str(rounds), "--prefill-rounds", str(prefill_rounds)]
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
    prefill = any(r.prefill_ms for r in results)
    header = (
        f"{'config':<18} {'cache':<8} {'graphs':>6} {'2nd-pass':>8} {'compile s':>9} "
        f"{'steady tok/s':>12} {'x eager':>7}"
        + (f" {'TTFT ms':>8} {'x eager':>7}" if prefill else "")
        + "  identical"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        ttft = ""
        if prefill:
            ttft = f" {r.prefill_ms:>8.0f} {r.prefill_speedup:>7.2f}" if r.prefill_ms else " " * 16
        same = r.identical and r.prefill_identical
        lines.append(
            f"{r.config:<18} {r.cache:<8} {r.graphs:>6} {r.recompiles_second_pass:>8} "
            f"{r.compile_seconds:>9.1f} {r.steady_tokens_per_second:>12.1f} "
            f"{r.ratio_to_eager:>7.2f}{ttft}  {'yes' if same else 'NO'}"
        )
    return "\n".join(lines)


def plot(results: Sequence[Result], path: str) -> None:
    """Steady tokens/s and compile seconds per configuration and cache, as a PNG (matplotlib:
    ``pip install -e '.[bench]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib (pip install -e '.[bench]'): {e}") from e
    caches = list(dict.fromkeys(r.cache for r in results))
    configs = list(dict.fromkeys(r.config for r in results))
    by = {(r.config, r.cache): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(caches)
    for j, cache in enumerate(caches):
        xs = [i + j * width for i in range(len(configs))]
        rows = [by.get((c, cache)) for c in configs]
        axes[0].bar(xs, [r.steady_tokens_per_second if r else 0 for r in rows], width, label=cache)
        axes[1].bar(xs, [r.compile_seconds if r else 0 for r in rows], width, label=cache)
    titles = ("steady tokens/s (higher is better)", "compile s (lower is better)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks([i + width * (len(caches) - 1) / 2 for i in range(len(configs))])
        ax.set_xticklabels(configs, rotation=30, ha="right")
        ax.set_title(title)
    # One legend beside both panels: inside an axis it covered the tallest bars.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="cache", loc="center right")
    fig.suptitle(
        f"tiny Llama generate(), {results[0].threads} CPU threads, torch {torch.__version__}"
    )
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(path, dpi=120)


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
        if xy:
            lines.append(f"{cache}: xyserve steady tokens/s x eager: {xy.ratio_to_eager:.2f}")
        if xy and xy.prefill_ms:
            lines.append(f"{cache}: xyserve time to first token x eager: {xy.prefill_speedup:.2f}")
        if ind_dyn and xyi:
            lines.append(
                f"{cache}: xyserve-inductor / Inductor dynamic=True: steady "
                f"{xyi.steady_tokens_per_second / ind_dyn.steady_tokens_per_second:.2f}, "
                f"compile {xyi.compile_seconds / ind_dyn.compile_seconds:.3f}"
            )
    return "\n".join(lines)


def _main(argv: Sequence[str] | None = None) -> None:
    # Worker entry for run_isolated: measure one configuration, print it as JSON.
    p = argparse.ArgumentParser(prog="python -m xy_inductor.bench")
    p.add_argument("--one", required=True, choices=list(CONFIGS))
    p.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=None, help="use only the first N workload calls")
    p.add_argument("--prefill-rounds", type=int, default=0)
    args = p.parse_args(argv)
    calls = wl.WORKLOAD[: args.calls] if args.calls else wl.WORKLOAD
    start = time.perf_counter()
    result = measure(args.one, args.cache, args.rounds, calls, prefill_rounds=args.prefill_rounds)
    print(f"{args.one}/{args.cache}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
