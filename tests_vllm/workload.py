"""The requests the vLLM tests send: mixed lengths, and a group sharing a long prefix."""

from __future__ import annotations

import random
from typing import Any

from tiny_models import FIRST_WORD, VOCAB, words

# Prompt lengths 1 … 300: decode-only rows soon, prefills of every size, several chunks each
# at max_num_batched_tokens=64.
LENGTHS = (1, 2, 3, 7, 16, 31, 64, 100, 127, 129, 200, 257, 300)
# A 260-token prefix (two whole 128-token blocks: vLLM caches whole blocks) and short suffixes.
SHARED_PREFIX = 260
SUFFIXES = (3, 11, 25, 40)

# Small enough that prompts are prefilled in chunks while other requests decode.
ENGINE = {"max_num_batched_tokens": 64, "enable_prefix_caching": True}


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    """Token ids of the requests: 13 of lengths ``LENGTHS``, 4 sharing a prefix."""
    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(FIRST_WORD, VOCAB) for _ in range(n)]

    prompts = [ids(n) for n in LENGTHS]
    prefix = ids(SHARED_PREFIX)
    prompts += [prefix + ids(n) for n in SUFFIXES]
    return prompts


def mixed_texts(seed: int = 0) -> list[str]:
    """The same requests as text (the tiny models' tokenizer maps them back exactly)."""
    return [words(p) for p in mixed_prompts(seed)]


def engine_run(
    backend: str | None,
    prompts: list,
    *,
    max_tokens: int = 8,
    dtype: str = "float32",
    model: str | None = None,
    **engine: Any,
) -> dict[str, Any]:
    """One engine for ``run_engines``: the attention backend (None: vLLM's default), the
    requests (texts or token-id lists, greedy, ``max_tokens`` each), more ``vllm.LLM``
    arguments; ``model`` another model than the child's."""
    run = {
        "backend": backend,
        "prompts": prompts,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "engine": engine,
    }
    if model is not None:
        run["model"] = model
    return run


def vllm_and_custom() -> tuple[dict[str, Any], dict[str, Any]]:
    """The offline comparison every test shares: vLLM's own attention, then CUSTOM, on the
    mixed workload (one child for both; other tests reuse its reports)."""
    prompts = mixed_prompts()
    return engine_run(None, prompts, **ENGINE), engine_run("CUSTOM", prompts, **ENGINE)
