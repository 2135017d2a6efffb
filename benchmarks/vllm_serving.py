"""Offline serving throughput inside vLLM: vLLM's own attention backend against xyserve's (CUSTOM).

A synthetic mixed workload (by default 64 requests, prompt lengths drawn once from a fixed
heavy-tailed distribution, 32 output tokens each, ``max_num_batched_tokens=256`` so prefill
chunks and decodes share steps) runs on a random-weight model saved locally. Each engine runs
in a fresh child process, alternating backends for ``--rounds`` rounds; the table reports
medians over rounds: output tokens/s, mean and p99 time to first token (TTFT, from submission:
all requests arrive at once) and between tokens (ITL, every gap between a request's
consecutive tokens), and xyserve's ratio to vLLM. With ``--breakdown`` each child also times
the attention layers (the backend's forward, K/V write included) to say where the time goes.

Run it in the vLLM environment (``make vllm-venv``):

    .venv-vllm/bin/python benchmarks/vllm_serving.py [--rounds 3] [--model small]
        [--requests 64] [--output-tokens 32] [--kv-cache-mib 256] [--breakdown]

``--kv-cache-mib 32`` and ``1024`` on the same prompts compare the cost of a larger cache (it
must not change the time: each step reads only its rows' blocks).

``--spec self`` runs speculative decoding in both engines (``--num-speculative-tokens``, 3 by
default): the target model is its own draft (``method: draft_model``), so every draft is
accepted and each decode step of the target is a verify row of 1 + k queries. The draft's
attention is vLLM's own in both engines; the rows xyserve ran are printed per kind.
``--spec ngram`` drafts by prompt lookup instead (vLLM's ngram drafter, up to 3 tokens matched).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import pathlib
import random
import statistics
import subprocess
import sys
import tempfile
import time

from timing import Stopwatch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests_vllm"))

# Model shapes (random weights, the tiny word-level tokenizer of tests_vllm).
MODELS = {
    # the tests' model: overhead-bound, attention a small share
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    # a larger one: 8 query heads of 64, 2 KV heads (GQA 4), 4 layers
    "small": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2},
}  # fmt: skip
BACKENDS = {"vllm": None, "xyserve": "CUSTOM"}


def prompt_lengths(n: int, seed: int = 0, longest: int = 1536) -> list[int]:
    """Heavy-tailed prompt lengths: log-normal around 128 tokens (sigma 1), 8 … ``longest``."""
    rng = random.Random(seed)
    return [min(longest, max(8, int(rng.lognormvariate(math.log(128), 1.0)))) for _ in range(n)]


def make_model(size: str, out: pathlib.Path) -> pathlib.Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from workload import FIRST_WORD, VOCAB

    config = LlamaConfig(
        vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False,
        initializer_range=0.1, **MODELS[size],
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return out


# -- child: one engine -------------------------------------------------------------------------


def _time_attention(totals: dict) -> None:
    """Accumulate the wall time of every attention layer call (either backend) in totals."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from xy_inductor.vllm.attention import XyserveAttentionImpl

    def timed(method):
        def wrapper(*args, **kwargs):
            # A bare clock: this runs inside every step being measured, so it must cost little.
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                totals["attention_s"] += time.perf_counter() - start

        return wrapper

    for cls, names in (
        (CPUAttentionBackendImpl, ("forward", "do_kv_cache_update")),
        (XyserveAttentionImpl, ("forward",)),
    ):
        for name in names:
            setattr(cls, name, timed(getattr(cls, name)))


def child(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import xy_inductor

    totals = {"attention_s": 0.0}
    if spec["breakdown"]:
        _time_attention(totals)
    engine = {
        "model": spec["model"],
        "dtype": spec["dtype"],
        "seed": 0,
        "max_model_len": 2048,
        "max_num_batched_tokens": spec["max_num_batched_tokens"],
        "kv_cache_memory_bytes": spec["kv_cache_mib"] << 20,
        "enforce_eager": True,
        # Speculation's acceptance counters need vLLM's stats (both engines alike).
        "disable_log_stats": spec.get("spec", "none") == "none",
    }
    if spec["backend"]:
        engine["attention_config"] = {"backend": spec["backend"]}
    if spec.get("spec") == "self":
        engine["speculative_config"] = {
            "method": "draft_model",
            "model": spec["model"],
            "num_speculative_tokens": spec["num_speculative_tokens"],
        }
    elif spec.get("spec") == "ngram":
        engine["speculative_config"] = {
            "method": "ngram",
            "num_speculative_tokens": spec["num_speculative_tokens"],
            "prompt_lookup_max": 3,
            "prompt_lookup_min": 1,
        }
    llm = LLM(**engine)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in spec["lengths"]]

    def params() -> SamplingParams:
        # A fresh object per use: LLM.generate switches the one it is given to final-only
        # outputs, and the measured loop needs every token as it comes.
        return SamplingParams(max_tokens=spec["output_tokens"], temperature=0, ignore_eos=True)

    # Warm-up: one short request through every code path once (not measured).
    llm.generate([TokensPrompt(prompt_token_ids=prompts[0][:8])], params(), use_tqdm=False)
    totals["attention_s"] = 0.0
    xy_inductor.reset_stats()

    core = llm.llm_engine
    seen: dict[str, list[float]] = {}
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    clock = Stopwatch()  # every request is submitted now: token times are seconds from here
    for i, p in enumerate(prompts):
        core.add_request(str(i), TokensPrompt(prompt_token_ids=p), params())
    while core.has_unfinished_requests():
        outputs = core.step()
        now = clock.seconds
        for out in outputs:
            times = seen.setdefault(out.request_id, [])
            times.extend([now] * (len(out.outputs[0].token_ids) - len(times)))
    wall = clock.stop()
    if profiler is not None:
        import io
        import pstats

        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(f"-- profile ({spec['backend'] or 'vllm'}) --\n{text.getvalue()}", file=sys.stderr)
    drafts = {}
    if spec.get("spec", "none") != "none":
        drafts = {
            m.name.removeprefix("vllm:spec_decode_"): int(m.value)
            for m in llm.get_metrics()
            if m.name.startswith("vllm:spec_decode_num")
            and isinstance(getattr(m, "value", None), int | float)
        }
    tokens = sum(len(t) for t in seen.values())
    ttft = [t[0] for t in seen.values()]
    itl = [b - a for t in seen.values() for a, b in itertools.pairwise(t)]
    stats = xy_inductor.stats()
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_p99_s": _p99(ttft),
        "itl_mean_s": statistics.fmean(itl),
        "itl_p99_s": _p99(itl),
        "attention_s": totals["attention_s"] if spec["breakdown"] else None,
        "xyserve_calls": stats.paths.get("attention_varlen", {}),
        "xyserve_steps": stats.varlen_steps,
        "xyserve_rows": dict(stats.varlen_rows),
        "drafts": drafts,
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


# -- parent: children side by side -------------------------------------------------------------


def run_child(spec: dict, cpus: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "spec.json"
        path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(path)],
            capture_output=True,
            text=True,
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_OMP_THREADS_BIND": cpus},
        )
        result = pathlib.Path(folder) / "result.json"
        if proc.returncode != 0 or not result.exists():
            sys.exit(f"child failed ({spec['backend']}):\n{proc.stderr[-4000:]}")
        if spec.get("profile"):
            print(proc.stderr[proc.stderr.index("-- profile") :], file=sys.stderr)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=256)
    parser.add_argument("--kv-cache-mib", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--spec", choices=["none", "self", "ngram"], default="none", help="speculative decoding"
    )
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument(
        "--backends", nargs="+", choices=sorted(BACKENDS), default=["vllm", "xyserve"]
    )
    parser.add_argument("--breakdown", action="store_true", help="time the attention layers")
    parser.add_argument("--profile", action="store_true", help="cProfile each measured run")
    parser.add_argument(
        "--cpus",
        default="auto",
        help="VLLM_CPU_OMP_THREADS_BIND for every engine: 'auto' (all cores), or e.g. '0' for "
        "one thread on core 0 (steadier on a shared machine)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(pathlib.Path(args.child).read_text())
        result = child(spec)
        pathlib.Path(args.child).with_name("result.json").write_text(json.dumps(result))
        return

    lengths = prompt_lengths(args.requests)
    with tempfile.TemporaryDirectory() as folder:
        model = make_model(args.model, pathlib.Path(folder) / args.model)
        results: dict[str, list[dict]] = {name: [] for name in args.backends}
        for _ in range(args.rounds):
            for name in args.backends:
                spec = {
                    "model": str(model), "backend": BACKENDS[name], "lengths": lengths,
                    "output_tokens": args.output_tokens, "dtype": args.dtype,
                    "max_num_batched_tokens": args.max_num_batched_tokens,
                    "kv_cache_mib": args.kv_cache_mib, "breakdown": args.breakdown,
                    "profile": args.profile, "spec": args.spec,
                    "num_speculative_tokens": args.num_speculative_tokens,
                }  # fmt: skip
                results[name].append(run_child(spec, args.cpus))
    print(
        f"model {args.model} ({MODELS[args.model]}), {args.dtype}, {args.requests} requests, "
        f"prompt tokens {sum(lengths)} (median {statistics.median(lengths)}, max {max(lengths)}), "
        f"{args.output_tokens} output tokens each, max_num_batched_tokens "
        f"{args.max_num_batched_tokens}, KV cache {args.kv_cache_mib} MiB, CPUs {args.cpus}, "
        f"speculation {args.spec}"
        + (f" ({args.num_speculative_tokens} drafts)" if args.spec != "none" else "")
        + "; "
        "medians of "
        f"{args.rounds} rounds, each engine in a fresh process"
    )
    columns = [("tokens_per_s", "out tok/s", 1), ("ttft_mean_s", "TTFT mean ms", 1e3),
               ("ttft_p99_s", "TTFT p99 ms", 1e3), ("itl_mean_s", "ITL mean ms", 1e3),
               ("itl_p99_s", "ITL p99 ms", 1e3), ("wall_s", "wall s", 1)]  # fmt: skip
    if args.breakdown:
        columns.append(("attention_s", "attention s", 1))
    print("| backend | " + " | ".join(c[1] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key, _, _ in columns}
        for name, runs in results.items()
    }
    for name, values in medians.items():
        cells = " | ".join(f"{values[key] * scale:.1f}" for key, _, scale in columns)
        print(f"| {name} | {cells} |")
    if set(medians) == {"vllm", "xyserve"}:
        ratio = medians["xyserve"]["tokens_per_s"] / medians["vllm"]["tokens_per_s"]
        print(f"\nxyserve / vLLM output tokens/s: {ratio:.2f}x")
        runs = results["xyserve"]
        print(f"xyserve: {runs[0]['xyserve_steps']} steps, calls {runs[0]['xyserve_calls']}")
        print(f"xyserve rows per kind (one run): {runs[0]['xyserve_rows']}")
    for name, runs in results.items():
        if runs[0]["drafts"]:
            print(f"{name} drafts (one run, including warm-up): {runs[0]['drafts']}")


if __name__ == "__main__":
    main()
