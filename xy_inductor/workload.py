"""The tiny-Llama ``generate()`` workload shared by ``xyserve demo``, the benchmark and the tests.

A 4-layer Llama with random weights (fixed seed, nothing downloaded) and 15 greedy
``generate()`` calls whose prompt lengths and batch sizes change on every call: the shape
churn that makes ``torch.compile`` recompile.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "NEW_TOKENS",
    "TINY_LLAMA",
    "WORKLOAD",
    "PassResult",
    "compile_seconds",
    "copy_model",
    "generate_pass",
    "graphs_compiled",
    "median_tokens_per_second",
    "prompt_batch",
    "tiny_llama",
]

TINY_LLAMA: dict[str, int] = dict(
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1408,
    vocab_size=4096,
)
"""The reference machine's baseline model (DESIGN.md): 16 M parameters."""

# Batch 1 with these prompt lengths, then left-padded batches of 2, 3 and 4.
WORKLOAD: tuple[tuple[int, ...], ...] = (
    (7,), (33,), (120,), (5,), (260,), (64,), (17,), (511,), (3,), (200,), (90,), (1,),
    (40, 25), (100, 64, 7), (300, 12, 150, 77),
)  # fmt: skip
NEW_TOKENS = 16


def tiny_llama(
    seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any
) -> torch.nn.Module:
    """A random-weight ``LlamaForCausalLM`` of ``TINY_LLAMA`` size, in eval mode, with SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 2048, **overrides})
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    # Random weights emit EOS at random; without it every call generates exactly NEW_TOKENS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt_batch(
    lengths: Sequence[int], vocab_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of these lengths, left-padded as ``generate()`` wants, and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, vocab_size, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


@dataclass
class PassResult:
    """One pass over the workload."""

    seconds: float
    new_tokens: int
    outputs: list[torch.Tensor] = field(repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


def generate_pass(
    model: torch.nn.Module,
    cache: str = "dynamic",
    workload: Sequence[Sequence[int]] = WORKLOAD,
    new_tokens: int = NEW_TOKENS,
    progress: Callable[[], None] | None = None,
) -> PassResult:
    """Greedy ``generate()`` over every batch of ``workload``; ``cache``: dynamic or static."""
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache must be 'dynamic' or 'static', got {cache!r}")
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    outputs, produced = [], 0
    start = time.perf_counter()
    with torch.no_grad():
        for i, lengths in enumerate(workload):
            ids, mask = prompt_batch(lengths, model.config.vocab_size, seed=i)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                **extra,
            )
            outputs.append(out)
            produced += (out.shape[1] - ids.shape[1]) * out.shape[0]
            if progress is not None:
                progress()
    return PassResult(time.perf_counter() - start, produced, outputs)


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process, whatever the backend."""
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_seconds() -> float:
    """Seconds Dynamo has spent compiling in this process: tracing plus the backend."""
    return float(
        sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))
    )


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with the same weights, for a second configuration."""
    return copy.deepcopy(model)


def median_tokens_per_second(passes: Sequence[PassResult]) -> float:
    return statistics.median(p.tokens_per_second for p in passes)
