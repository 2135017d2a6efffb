"""Where a pass of the ``generate()`` workload goes, call by call: eager, Inductor
``dynamic=True`` and xyserve with ``inductor=True``, in one process (``DynamicCache``, or
``StaticCache`` with ``--cache static``).

For each call of the workload (``xy_inductor.workload.WORKLOAD``) it times ``generate()`` with
16 new tokens and with 1 (the prefill and ``generate()``'s own set-up), medians over rounds that
alternate the variants; the difference over 15 is the cost of one decode step inside
``generate()``. It shows which calls a variant wins or loses, and whether by prefill or decode.

    .venv/bin/python benchmarks/generate_calls.py [--rounds 5] [--cache static]  # about 4 minutes
"""

from __future__ import annotations

import argparse
import functools

import torch
from timing import Stopwatch, interleaved

from xy_inductor import hf
from xy_inductor import workload as wl


def _generate_s(
    model: torch.nn.Module, index: int, lengths: tuple[int, ...], new: int, cache: str
) -> float:
    ids, mask = wl.prompt_batch(lengths, model.config.vocab_size, seed=index)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with Stopwatch() as sw, torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **extra
        )
    return sw.seconds


def _sample(call) -> float:
    return call()  # _generate_s times its own generate() (the prompt's set-up left out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cache", choices=("dynamic", "static"), default="dynamic")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64  # two compiled copies of one model class
    reference = wl.tiny_llama()
    inductor = wl.copy_model(reference)
    inductor.forward = torch.compile(inductor.forward, dynamic=True)
    variants = {
        "eager": reference,
        "inductor": inductor,
        "xyserve": hf.accelerate(wl.copy_model(reference), inductor=True),
    }
    for model in variants.values():  # compile, then one warm pass
        for _ in range(2):
            for i, lengths in enumerate(wl.WORKLOAD):
                _generate_s(model, i, lengths, wl.NEW_TOKENS, args.cache)
                _generate_s(model, i, lengths, 1, args.cache)
    # Side by side: every round runs each variant's calls in turn; each sample is one generate().
    calls = {
        (name, i, new): functools.partial(_generate_s, model, i, lengths, new, args.cache)
        for name, model in variants.items()
        for i, lengths in enumerate(wl.WORKLOAD)
        for new in (wl.NEW_TOKENS, 1)
    }
    timings = interleaved(list(calls.values()), rounds=args.rounds, warmup=0, sampler=_sample)
    ms = {key: t.ms for key, t in zip(calls, timings, strict=True)}
    steps = wl.NEW_TOKENS - 1
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds, "
        f"{args.cache} cache"
    )
    print(
        f"{'prompt lengths':<20}"
        + "".join(f"{n + ' ms':>13}{'prefill':>9}{'step':>7}" for n in variants)
        + f"{'inductor/xyserve':>18}"
    )
    totals = {name: [0.0, 0.0] for name in variants}
    for i, lengths in enumerate(wl.WORKLOAD):
        row = f"{','.join(map(str, lengths)):<20}"
        for name in variants:
            full, first = ms[name, i, wl.NEW_TOKENS], ms[name, i, 1]
            totals[name][0] += full
            totals[name][1] += first
            row += f"{full:>13.1f}{first:>9.1f}{(full - first) / steps:>7.2f}"
        print(row + f"{ms['inductor', i, wl.NEW_TOKENS] / ms['xyserve', i, wl.NEW_TOKENS]:>18.2f}")
    row = f"{'pass':<20}"
    for name in variants:
        full, first = totals[name]
        row += f"{full:>13.1f}{first:>9.1f}{'':>7}"
    print(row + f"{totals['inductor'][0] / totals['xyserve'][0]:>18.2f}")
    print(
        "ms: generate() of 16 new tokens; prefill: of 1 (prefill and generate()'s set-up); "
        "step: (ms - prefill) / 15, one decode step inside generate()"
    )


if __name__ == "__main__":
    main()
