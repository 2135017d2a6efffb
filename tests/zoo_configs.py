"""Tiny configs of every decoder-only family in transformers, built from its config alone.

``build(family)`` makes a random-weight float32 model whose sizes are those of ``TINY`` wherever
the family's config has a field of that name (or its ``FAMILY_FIELDS``), with one layer of each
kind it has, so that mixed, hybrid, MoE and MLA models keep their character. Used by the zoo
sweep (``zoo.py``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedConfig

__all__ = ["FAMILY_FIELDS", "MAX_PARAMETERS", "TINY", "Skip", "build", "tiny_config"]

MAX_PARAMETERS = 5_000_000
"""A config that still builds a larger model was not made tiny (a field this table misses)."""

TINY: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    # the same, under other names (OPT, CTRL, XLNet, decoders of encoder-decoders, ...)
    ffn_dim=128,
    dff=128,
    d_inner=128,
    decoder_ffn_dim=128,
    ffn_hidden_size=128,
    intermediate_size_mlp=128,
    vocab_size=256,
    max_position_embeddings=512,
    # mixture of experts
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    # multi-head latent attention (DeepSeek): key and value head sizes differ
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    # partial rotary embeddings (CodeGen, GPT-J): fewer dims than a head
    rotary_dim=8,
    # state space and linear attention layers (Mamba, Mamba 2, hybrids, gated delta nets)
    state_size=16,
    ssm_state_size=16,
    num_heads=4,
    n_groups=2,
    mamba_n_heads=8,
    mamba_d_state=16,
    mamba_d_ssm=128,
    mamba_num_heads=8,
    mamba_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_heads=4,
    linear_head_dim=16,
    # the scan in chunks shorter than the prompts, so that state passes between them (Mamba 2)
    chunk_size=4,
    mamba_chunk_size=4,
    # per-layer token embeddings (Gemma 3n, Gemma 4)
    vocab_size_per_layer_input=256,
    hidden_size_per_layer_input=16,
    # attention of the sliding-window layers, where it has its own sizes (Inkling)
    swa_num_attention_heads=4,
    swa_num_key_value_heads=2,
    swa_head_dim=16,
    # sparse attention indexers (DeepSeek V3.2): fewer keys than the prompts
    index_n_heads=4,
    index_head_dim=16,
    index_topk=4,
    # windows shorter than the prompts, so that they matter
    sliding_window=4,
    attention_chunk_size=4,
    local_attention=8,  # ModernBERT: a window of 4
    keep_window_size=4,  # Doge: the keys its dynamic mask keeps
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    # BERT-like encoders generate as decoders only with this (transformers warns without it)
    is_decoder=True,
)

# dots3: its sliding-window layers' multi-head latent attention has its own sizes (swa_*).
_DOTS3 = dict(
    swa_num_attention_heads=4,
    swa_num_key_value_heads=4,
    swa_q_lora_rank=24,
    swa_kv_lora_rank=16,
    swa_head_dim=16,
    swa_qk_nope_head_dim=8,
    swa_v_head_dim=8,
)
# Gemma 3n: KV sharing, the last two layers reuse the cache of the first sliding and full layers.
_GEMMA3N = dict(
    num_hidden_layers=4,
    layer_types=["sliding_attention", "full_attention"] * 2,
    activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0],
    num_kv_shared_layers=2,
    intermediate_size=128,
)
# Gemma 4: the full-attention layers' head size, twice the sliding ones' as in the default.
_GEMMA4 = dict(global_head_dim=32)
# Inkling 2: the output layer has the unpadded vocabulary.
_INKLING2 = dict(unpadded_vocab_size=250)
# Qwen4-Exp: the default full-attention layers index keys (QSA) but miss the indexer's sizes.
_QWEN4_EXP = dict(
    indexer_n_heads=4,
    indexer_kv_heads=1,
    indexer_head_dim=16,
    indexer_budget=4,
    indexer_compress_ratio=2,
    hc_lowrank=16,
)

FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    # Bamba's default has no attention layer (layer kinds come from attn_layer_indices).
    "bamba": dict(attn_layer_indices=[1]),
    # Byte latent transformer: the local models' cross-attention width is the global model's.
    "blt": dict(
        encoder_hash_byte_group_vocab=64,
        local_attention_window_len=4,
        encoder_config=dict(hidden_size_global=128),
        decoder_config=dict(hidden_size_global=128),
        global_config=dict(hidden_size=128),
    ),
    # The default rope_parameters miss the per-layer-type keys (and M-RoPE sections) it reads.
    "cohere_compass_text": dict(
        rope_parameters=dict(full_attention=dict(rope_theta=1e4, mrope_section=[4, 2, 2]))
    ),
    # The default misses attn_config's rope_theta and clip_qkv, which the model reads (DBRX's).
    "dbrx": dict(attn_config=dict(rope_theta=500_000.0, clip_qkv=8.0)),
    # Input, looped and output layers: one each, the loop with a sliding and a full layer.
    "dory": dict(
        num_hidden_layers=4,
        n_input_layers=1,
        n_output_layers=1,
        layer_types=["sliding_attention"] * 2 + ["full_attention", "sliding_attention"],
    ),
    # The vision and audio adapters' widths are the towers' and the text model's hidden sizes.
    "dots3_note": dict(
        text_config=_DOTS3,
        vision_config=dict(adapter_in_dim=64, adapter_out_dim=64),
        audio_config=dict(adapter_input_size=64, adapter_out_dim=64),
    ),
    "dots3_note_text": _DOTS3,
    "gemma3n": dict(text_config=_GEMMA3N),
    "gemma3n_text": _GEMMA3N,
    "gemma4": dict(text_config=_GEMMA4),
    "gemma4_text": _GEMMA4,
    "gemma4_unified": dict(text_config=_GEMMA4),
    "gemma4_unified_text": _GEMMA4,
    # Layer kinds come from attention_types: one global and one local layer.
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=4),
    # The default is all Mamba layers; the released models mix in attention.
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
    "inkling2_loop_text": _INKLING2,
    "inkling2_text": _INKLING2,
    # Mamba with a dense MLP, Mamba with experts, attention with a dense MLP, as in the default.
    "jamba": dict(
        num_hidden_layers=3,
        attn_layer_period=3,
        attn_layer_offset=2,
        expert_layer_period=2,
        expert_layer_offset=1,
    ),
    # Heads per layer are derived from num_attention_heads, unless given.
    "laguna": dict(num_attention_heads_per_layer=None),
    # The default is all attention layers; the released models mix in short convolutions.
    "lfm2": dict(layer_types=["conv", "full_attention"]),
    # The default has no layer_types, which the model reads; a dense then a MoE layer.
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    # Each of num_layers has two attention sublayers; head_dim is the rotary size; zero experts
    # (identity) come on top of the routed ones.
    "longcat_flash": dict(
        num_layers=2,
        head_dim=8,
        zero_expert_num=2,
        expert_ffn_hidden_size=32,
        moe_topk=2,
    ),
    # Heads times head_dim make the expanded width: 8 x 16 = 2 x 64.
    "mamba2": dict(num_heads=8),
    # Phi-4's audio encoder (Conformer) has its own names for its sizes.
    "phi4_multimodal": dict(
        audio_config=dict(
            num_blocks=2,
            ext_pw_out_channel=64,
            depthwise_separable_out_channel=64,
            nemo_conv_channels=32,
        )
    ),
    "qwen4_exp": dict(text_config=_QWEN4_EXP),
    "qwen4_exp_text": _QWEN4_EXP,
    # The block pattern (recurrent, recurrent, attention) repeats over the layers.
    "recurrent_gemma": dict(num_hidden_layers=3),
    # Axial position embeddings: their sizes add up to hidden_size. Layers come from attn_layers.
    "reformer": dict(axial_pos_embds_dim=[16, 48], attn_layers=["local", "lsh"]),
    # Hash-based shape and pronunciation embeddings of Chinese characters.
    "roc_bert": dict(
        shape_vocab_size=64,
        shape_embed_dim=16,
        pronunciation_vocab_size=64,
        pronunciation_embed_dim=16,
    ),
    # The q/k size rounds up to a multiple of 64: at 64 it would equal the value size. Its
    # chunkwise kernel fails on prompts longer than a chunk (in transformers 5.24).
    "xlstm": dict(hidden_size=128, chunk_size=64),
    # Per-language adapters: the model needs to know the input's language.
    "xmod": dict(default_language="en_XX"),
    # One attention block is shared by the hybrid layers: two of them, after a Mamba layer.
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"]),
    # The model supports one expert per token only.
    "zaya": dict(num_experts_per_tok=1),
}
"""Extra config fields per model type, where ``TINY`` alone does not make it tiny (or keep its
kind); a dict under a sub-config's name (``text_config``, ...) goes to that sub-config."""


def tiny_config(family: str) -> Any:
    """The family's config with every size field ``TINY`` knows made small, sub-configs (text,
    vision, ...) included, then its ``FAMILY_FIELDS``. Per-layer lists are kept at the fewest
    layers that show every kind of each (at least two layers), so mixed models stay mixed."""
    cls = CONFIG_MAPPING[family]
    config = _tiny(cls(), {}, copy.deepcopy(FAMILY_FIELDS.get(family, {})))
    if _value(config, "vocab_size") is None and not config.is_encoder_decoder:
        # A multimodal config: ``generate_all`` reads its text model's vocabulary size here.
        config.vocab_size = config.get_text_config(decoder=True).vocab_size
    return config


def _fields(cls: type) -> dict[str, str]:
    """The config fields ``cls`` takes, each under its own name and its ``attribute_map`` names
    (``hidden_size`` for GPT-2's ``n_embd``): name -> field. Attributes its ``__post_init__``
    derives are left out: setting one makes the config inconsistent (a head size that rotary or
    latent dims decide), or fails (a read-only property)."""
    names = {f.name: f.name for f in dataclasses.fields(cls)}
    aliases = getattr(cls, "attribute_map", {})
    return {**{k: v for k, v in aliases.items() if v in names}, **names}


def _tiny_fields(names: dict[str, str]) -> dict[str, Any]:
    """``TINY`` by field name, not alias (an alias is set after ``__post_init__`` has derived
    from the field); a field's own name wins over an alias of it."""
    tiny = {names[k]: v for k, v in TINY.items() if k in names and names[k] != k}
    tiny.update({k: v for k, v in TINY.items() if names.get(k) == k})
    return tiny


def _value(config: Any, name: str) -> Any:
    """``config.name``, or None where it has none."""
    try:
        return getattr(config, name, None)
    except Exception:  # a per-layer attribute of a heterogeneous config: its global value
        return config._getattr_without_heterogeneous_validation(name, None)


def _fewer_layers(default: Any, names: dict[str, str], layers: int) -> dict[str, Any]:
    """``num_hidden_layers`` and the per-layer fields of a config of ``layers`` layers, cut down
    to the first layer of each kind: a kind is a layer's entries in the per-layer lists
    (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``, ...) and whether it is in each
    list of layer indices (``moe_layers``, ``cross_attention_layers``, ``full_attn_idxs``, ...).
    At least two layers are kept. Index lists are renumbered to the kept layers."""
    per_layer: dict[str, Any] = {}
    indices: dict[str, set[int]] = {}
    for name in sorted(set(names.values())):
        value = _value(default, name)
        if not isinstance(value, (list, tuple)) or not value:
            continue
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in value)
        ascending = ints and list(value) == sorted(set(value)) and value[-1] < layers
        if ascending and (list(value) == list(range(layers)) or name.endswith(_INDEX_LISTS)):
            indices[name] = set(value)
        elif len(value) == layers:
            per_layer[name] = value
    if not per_layer and not indices:
        return {}
    keep: list[int] = []
    seen: set[tuple[str, str]] = set()
    for i in range(layers):
        kind = {(name, repr(kinds[i])) for name, kinds in per_layer.items()}
        kind |= {(name, repr(i in members)) for name, members in indices.items()}
        if kind - seen:
            keep.append(i)
            seen |= kind
    if len(keep) < 2:
        keep = sorted(set(keep) | {next(i for i in range(layers) if i not in keep)})
    fields: dict[str, Any] = {names["num_hidden_layers"]: len(keep)}
    tiny = _tiny_fields(names)
    for name, kinds in per_layer.items():
        # A size given per layer (Gemma 3n's intermediate_size) takes TINY's size on each.
        fields[name] = type(kinds)(tiny.get(name, kinds[i]) for i in keep)
    for name, members in indices.items():
        fields[name] = type(_value(default, name))(j for j, i in enumerate(keep) if i in members)
    return fields


_INDEX_LISTS = ("layers", "indices", "indexes", "idxs")
"""How the names of config fields that list layer indices end."""


def _tiny(default: Any, base: dict[str, Any], extra: dict[str, Any]) -> Any:
    """A tiny config of ``default``'s class, from the fields ``base``, ``TINY`` and ``extra``
    (which win, in that order; a dict under a sub-config's name goes to that sub-config)."""
    cls = type(default)
    names = _fields(cls)
    tiny = _tiny_fields(names)
    # Not a size where the config has a list of them (per stage of a vision backbone).
    tiny = {
        k: v
        for k, v in tiny.items()
        if k.endswith("token_id") or not isinstance(_value(default, k), (list, tuple))
    }
    heads = _value(default, "num_attention_heads")
    if "num_key_value_heads" in names and heads and _value(default, "num_key_value_heads") == heads:
        # Multi-head attention stays so (multi-head latent attention needs it).
        tiny[names["num_key_value_heads"]] = TINY["num_attention_heads"]
    layers = _value(default, "num_hidden_layers")
    if isinstance(layers, int) and layers > 2 and "num_hidden_layers" in names:
        tiny.update(_fewer_layers(default, names, layers))
    fields = {**base, **tiny}
    specs = getattr(cls, "sub_configs_defaults", {})
    for name in getattr(cls, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if isinstance(sub, PreTrainedConfig):
            init = dict(specs[name].init_kwargs) if name in specs else {}
            fields[name] = _tiny(sub, init, extra.pop(name, {}))
    fields.update(extra)
    return cls(**fields)


def build(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight float32 model of ``family`` in eval mode, greedy, without EOS."""
    config = tiny_config(family)
    if getattr(config, "is_encoder_decoder", False):
        raise Skip("an encoder-decoder model")
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise Skip(f"the tiny config still has {size / 1e6:.0f} M parameters")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    generation = model.generation_config
    generation.eos_token_id = None
    generation.pad_token_id = 0
    generation.do_sample = False
    return model


class Skip(Exception):
    """The family cannot be tested here (not a failure of xyserve)."""
