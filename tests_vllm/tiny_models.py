"""Tiny random-weight models saved locally with a local word-level tokenizer (no downloads).

Each family is a two-layer ``transformers`` config with grouped KV heads where the family has
them; weights are random but seeded. ``initializer_range`` is raised above the default so
attention scores are far from uniform: a wrong mask, window or cache slot changes tokens.

The tokenizer maps the words ``w3 … w511`` to ids 3 … 511 (0 unk, 1 bos, 2 eos) and adds no
special tokens, so the text ``"w7 w19"`` is exactly the prompt ``[7, 19]``.
"""

from __future__ import annotations

import pathlib
from typing import Any

VOCAB = 512
FIRST_WORD = 3

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "initializer_range": 0.1,
}

# family -> config arguments on top of _COMMON
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen2": {"num_attention_heads": 4, "num_key_value_heads": 2},
    # Every layer windowed: queries see their last 48 keys.
    "mistral": {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 48},
    # Unservable on purpose: logit soft-capping (Gemma-2), ALiBi (BLOOM). vLLM ties their
    # output embedding to the input one.
    "gemma2": {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "attn_logit_softcapping": 50.0,
        "tie_word_embeddings": True,
    },
    "bloom": {"n_head": 4, "n_layer": 2, "tie_word_embeddings": True},
}


def words(ids: list[int]) -> str:
    """The text the tokenizer turns into exactly ``ids``."""
    return " ".join(f"w{i}" for i in ids)


def make_model(family: str, out: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Save a tiny random ``family`` model and its tokenizer in ``out``; returns ``out``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    kwargs = {**_COMMON, **FAMILIES[family]}
    if family == "bloom":
        kwargs.pop("intermediate_size")
        kwargs.pop("num_hidden_layers")
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, VOCAB)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(out)
    return out
