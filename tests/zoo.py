"""The transformers zoo: every decoder-only architecture run through ``hf.accelerate`` and eager.

For each model type in transformers' causal-LM mapping, a tiny random-weight model is built
from its config alone (``zoo_configs.py``, nothing downloaded), and greedy ``generate()`` runs on
it twice, as the model is and under ``xy_inductor.hf.accelerate``: left-padded batches and a
single unpadded prompt, with a dynamic and with a static cache. Each family ends as one of

- ``equal``: the same tokens, and every step's float32 logits within ``ATOL`` of eager's;
  the graphs compiled per cache and on a second pass are recorded;
- ``refused``: ``accelerate`` refused the model, with its reason;
- ``wrong``: other tokens, or logits further than ``ATOL``;
- ``crash``: ``accelerate`` or the accelerated ``generate()`` raised;
- ``skipped``: the family could not be tested here (its config does not build tiny, or eager
  ``generate()`` itself fails on both caches), with the reason. A cache whose eager
  ``generate()`` fails, or gives other answers when run twice, is left out, with the reason,
  and the family is run on the other.

``python tests/zoo.py`` (``make zoo``) runs every family, each in a child process with a
memory limit, and prints a Markdown table; ``tests/test_zoo.py`` runs a fixed sample in process.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from zoo_configs import Skip, build

import xy_inductor
from xy_inductor import hf
from xy_inductor.workload import prompt_batch

ATOL = 1e-4
"""Largest difference from eager's float32 logits that counts as equal: an exact route stays
near 1e-6 on these models; a dropped term (a sink, a soft-cap) shows 1e-3 and up."""

MEMORY_LIMIT = 6 << 30
"""Address space of one family's child process: a config that was not made tiny fails there,
not by taking the machine's memory."""

NEW_TOKENS = 3

CALLS: tuple[tuple[int, ...], ...] = ((5, 3), (6,), (2, 7, 4))
"""Prompt lengths of each ``generate()`` call: left-padded batches and one unpadded prompt."""

CACHES = ("dynamic", "static")

Outputs = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Result:
    """How one family ended (module docstring)."""

    family: str
    outcome: str
    detail: str = ""
    graphs: dict[str, int] = field(default_factory=dict)
    """Backend compiles per cache on the first pass, and on the second pass (all caches)."""
    max_logit_error: float = 0.0
    routes: list[tuple[str, bool]] = field(default_factory=list)
    """Each of ``hf.accelerate``'s routes, and whether the model took it."""
    seconds: float = 0.0


def families() -> list[str]:
    """Every model type of transformers' causal-LM mapping."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def generate_all(
    model: torch.nn.Module, cache: str, calls: Sequence[tuple[int, ...]] = CALLS
) -> Outputs:
    """Tokens and per-step logits of every call of ``calls`` with this cache."""
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    vocab = min(
        model.get_output_embeddings().weight.shape[0],
        model.config.get_text_config(decoder=True).vocab_size,
    )
    outputs = []
    with torch.no_grad():
        for i, lengths in enumerate(calls):
            ids, mask = prompt_batch(lengths, vocab, seed=i)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                return_dict_in_generate=True,
                output_logits=True,
                **extra,
            )
            outputs.append((out.sequences, torch.stack(out.logits, 1)))
    return outputs


def compare(want: Outputs, got: Outputs) -> tuple[str, float]:
    """``("", error)`` where tokens agree and logits are within ``ATOL``, else what differs."""
    worst = 0.0
    for i, ((w_ids, w_logits), (g_ids, g_logits)) in enumerate(zip(want, got, strict=True)):
        if not torch.equal(w_ids, g_ids):
            return f"call {i}: other tokens", float("inf")
        error = float((w_logits - g_logits).abs().nan_to_num(float("inf")).max())
        worst = max(worst, error)
        if error > ATOL:
            return f"call {i}: logits off by {error:.2e}", worst
    return "", worst


def run_family(family: str, calls: Sequence[tuple[int, ...]] = CALLS) -> Result:
    """Build ``family`` and compare accelerated ``generate()`` with eager's (module docstring)."""
    start = time.perf_counter()
    result = Result(family, "skipped")
    try:
        try:
            model = build(family)
        except Skip as e:
            result.detail = str(e)
            return result
        except Exception as e:
            result.detail = f"does not build: {_short(e)}"
            return result
        want, left_out = {}, []
        for cache in CACHES:
            try:
                first, again = (generate_all(model, cache, calls) for _ in range(2))
            except Exception as e:
                left_out.append(f"eager fails with the {cache} cache: {_short(e)}")
                continue
            differs, _ = compare(first, again)
            if differs:
                # Nothing to compare with (uninitialised memory read, ties broken at random).
                left_out.append(f"eager differs from itself with the {cache} cache: {differs}")
                continue
            want[cache] = first
        if not want:
            result.detail = "; ".join(left_out)
            return result
        torch._dynamo.reset()
        xy_inductor.reset_stats()
        try:
            hf.accelerate(model)
        except hf.RefusedError as e:
            result.outcome, result.detail = "refused", str(e)
            return result
        result.routes = [(name, r.taken) for name, r in hf.routes(model).route_items()]
        for cache in want:
            before = xy_inductor.stats().backend_compiles
            detail, error = compare(want[cache], generate_all(model, cache, calls))
            result.graphs[cache] = xy_inductor.stats().backend_compiles - before
            result.max_logit_error = max(result.max_logit_error, error)
            if detail:
                result.outcome, result.detail = "wrong", f"{cache} cache, {detail}"
                return result
        before = xy_inductor.stats().backend_compiles
        for cache in want:
            detail, _ = compare(want[cache], generate_all(model, cache, calls))
            if detail:
                result.outcome, result.detail = "wrong", f"second pass, {cache} cache, {detail}"
                return result
        result.graphs["second pass"] = xy_inductor.stats().backend_compiles - before
        result.outcome = "equal"
        result.detail = "; ".join([hf.routes(model).summary(), *left_out])
        return result
    except Exception as e:
        result.outcome, result.detail = "crash", _short(e)
        return result
    finally:
        result.seconds = time.perf_counter() - start


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}"


def _child(family: str, queue: Any, threads: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    try:
        queue.put(asdict(run_family(family)))
    except BaseException as e:  # MemoryError included: reported, not lost
        queue.put(asdict(Result(family, "crash", _short(e))))
        traceback.print_exc()


def run_isolated(family: str, timeout: float, threads: int) -> Result:
    """``run_family`` in a child process with ``MEMORY_LIMIT`` and ``threads`` torch threads; a
    child that dies or runs past ``timeout`` seconds is a crash."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(family, queue, threads))
    child.start()
    try:
        return Result(**queue.get(timeout=timeout))
    except Exception:
        return Result(family, "crash", f"child process died or ran past {timeout:.0f} s")
    finally:
        child.join(5)
        if child.is_alive():
            child.kill()


def table(results: list[Result]) -> str:
    """The results as a Markdown table, then a count per outcome."""
    lines = [
        "| family | outcome | graphs per cache, then on a second pass | max logit error | detail |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        graphs = ", ".join(f"{k} {n}" for k, n in r.graphs.items())
        error = f"{r.max_logit_error:.1e}" if r.graphs else ""
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {r.family} | {r.outcome} | {graphs} | {error} | {detail} |")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", help="model types (default: every one)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per family")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=1, help="families run at once")
    args = parser.parse_args(argv)
    names = args.families or families()
    threads = max(1, torch.get_num_threads() // args.jobs)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        runs = {pool.submit(run_isolated, n, args.timeout, threads): n for n in names}
        for done, run in enumerate(concurrent.futures.as_completed(runs), 1):
            r = run.result()
            print(f"[{done}/{len(names)}] {r.family}: {r.outcome} {r.detail[:120]}", flush=True)
    results = [run.result() for run in runs]  # in the mapping's order
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 1 if any(r.outcome in ("wrong", "crash") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
