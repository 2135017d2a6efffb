"""Speculative decoding through xyserve's backend: verify rows in a real vLLM engine.

A drafter proposes ``DRAFTS`` tokens per request and step; the target model checks them in one
step: a verify row of up to 1 + ``DRAFTS`` queries per request (issue 25). Two drafters:

- a draft model, the target's own tiny model, so its drafts are accepted; vLLM serves the
  draft's attention with its own backend (``CPU_ATTN``), the target's with xyserve's, one KV
  cache layout for both;
- vLLM's ngram drafter (prompt lookup), on prompts that repeat a phrase.
"""

from __future__ import annotations

import random

from tiny_models import FIRST_WORD, VOCAB

DRAFTS = 3
ENGINE = {"max_num_batched_tokens": 64}


def _prompts() -> list[list[int]]:
    """Short prompts that are soon being verified, and two long ones prefilled in chunks of 64
    tokens meanwhile."""
    rng = random.Random(7)
    return [[rng.randrange(FIRST_WORD, VOCAB) for _ in range(n)] for n in (3, 5, 9, 17, 150, 230)]


def _run(backend, spec, prompts):
    engine = dict(ENGINE)
    if spec is not None:
        engine["speculative_config"] = spec
    return {"backend": backend, "prompts": prompts, "max_tokens": 24, "engine": engine}


def _check_speculation(vllm_spec: dict, xy_spec: dict, xy_plain: dict) -> None:
    """What a speculative run through xyserve must show, whatever drafted: the tokens of vLLM's
    backend with the same drafter and of no speculation, drafts proposed and accepted (vLLM's
    own counters, not assumed), every layer on xyserve, verify rows counted, and a step that
    verified drafts while another request's prompt was being prefilled."""
    for report in (vllm_spec, xy_spec, xy_plain):
        assert "error" not in report, report.get("traceback")
    assert xy_spec["tokens"] == vllm_spec["tokens"]
    assert xy_spec["tokens"] == xy_plain["tokens"]
    counters = xy_spec["spec_decode"]
    assert counters.get("vllm:spec_decode_num_draft_tokens", 0) > 0, counters
    assert counters.get("vllm:spec_decode_num_accepted_tokens", 0) > 0, counters
    [worker] = xy_spec["workers"]
    assert set(worker["layers"].values()) == {"XyserveAttentionImpl"}
    stats = worker["stats"]
    assert stats["varlen_rows"].get("verify", 0) > 0, stats["varlen_rows"]
    assert stats["varlen_step_kinds"].get("verify", 0) > 0
    assert "verify" not in xy_plain["workers"][0]["stats"]["varlen_rows"]
    # (The recorded steps include a draft model's, built by CPU_ATTN's builder.)
    mixed = [
        s
        for s in xy_spec["steps"]
        if any(1 < q <= 1 + DRAFTS < kv for q, kv in zip(s["q"], s["kv"], strict=True))
        and any(q > 1 + DRAFTS for q in s["q"])
    ]
    assert mixed, xy_spec["steps"][:20]


def test_draft_model_verify_rows_give_the_tokens_of_vllm_and_of_no_speculation(
    run_engines, model_dir
):
    prompts = _prompts()
    spec = {"method": "draft_model", "model": model_dir("llama"), "num_speculative_tokens": DRAFTS}
    vllm_spec, xy_spec, xy_plain = run_engines(
        model_dir("llama"),
        _run(None, spec, prompts),
        _run("CUSTOM", spec, prompts),
        _run("CUSTOM", None, prompts),
    )
    _check_speculation(vllm_spec, xy_spec, xy_plain)


# vLLM's ngram drafter: prompt lookup, no draft model. Its prompts repeat a phrase, and the tiny
# random model soon repeats itself too, so some of its output is found in its own context.
NGRAM = {"method": "ngram", "num_speculative_tokens": DRAFTS, "prompt_lookup_max": 3,
         "prompt_lookup_min": 1}  # fmt: skip


def _repeating_prompts() -> list[list[int]]:
    rng = random.Random(11)
    phrases = [[rng.randrange(FIRST_WORD, VOCAB) for _ in range(n)] for n in (2, 3, 4, 5)]
    short = [(p * 8)[: 4 * len(p) + 1] for p in phrases]
    long = [[rng.randrange(FIRST_WORD, VOCAB) for _ in range(n)] for n in (150, 230)]
    return short + long


def test_ngram_verify_rows_give_the_tokens_of_vllm_and_of_no_speculation(run_engines, model_dir):
    """The engine that runs the ngram drafter is the last of its process: once numba is
    imported (by the drafter), vLLM 0.32's ``register_triton_kernel_overrides`` fails the next
    engine's start in that process, scanning an llvmlite object in ``sys.modules``
    (``AttributeError: '_lib_fn_wrapper' object has no attribute 'get'``)."""
    prompts = _repeating_prompts()
    [vllm_spec] = run_engines(model_dir("llama"), _run(None, NGRAM, prompts))
    xy_plain, xy_spec = run_engines(
        model_dir("llama"), _run("CUSTOM", None, prompts), _run("CUSTOM", NGRAM, prompts)
    )
    _check_speculation(vllm_spec, xy_spec, xy_plain)
