"""Hugging Face generate() through xy_inductor.hf.accelerate: same tokens, at most 2 graphs."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import cpu_or_aten

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl
from xy_inductor.compile_marks import compiling

# A shorter version of the workload: batch 1 with prompt lengths that include 1, then
# left-padded batches of 2 and 3.
CALLS = ((7,), (1,), (33,), (5, 3), (9, 2, 4))
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def reference():
    return wl.tiny_llama()


def expected_tokens(model, cache):
    return wl.generate_pass(model, cache, CALLS, NEW_TOKENS).outputs


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_matches_eager_with_at_most_two_graphs(reference, cache):
    expected = expected_tokens(reference, cache)
    model = hf.accelerate(wl.copy_model(reference))
    first = wl.generate_pass(model, cache, CALLS, NEW_TOKENS)
    for want, got in zip(expected, first.outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    compiles = xy_inductor.stats().backend_compiles
    assert 1 <= compiles <= 2, f"{compiles} backend compiles"
    # A second pass over the same workload must not compile anything.
    with torch.compiler.set_stance("fail_on_recompile"):
        second = wl.generate_pass(model, cache, CALLS, NEW_TOKENS)
    for want, got in zip(expected, second.outputs, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    s = xy_inductor.stats()
    assert s.backend_compiles == compiles and s.graphs_fallback == 0
    layers = reference.config.num_hidden_layers
    # Every graph lowered every site; the ops ran on the ATen provider.
    assert s.sites_unlowered == {}
    assert s.sites_lowered == {
        "attention": layers * compiles,
        "linear": (7 * layers + 1) * compiles,
    }
    assert set(s.calls["gemm"]) == {"aten"}
    # Prefills run packed (attention per prompt, no padding), decode steps as dense rows.
    assert set(s.calls) == {"gemm", "attention", "attention_packed"}


def test_explain_shows_every_site_lowered(reference):
    model = hf.accelerate(wl.copy_model(reference))
    ids, mask = wl.prompt_batch([9, 4], reference.config.vocab_size, seed=0)
    with torch.no_grad():
        report = xy_inductor.explain(model, input_ids=ids, attention_mask=mask, logits_to_keep=1)
    layers = reference.config.num_hidden_layers
    assert (report.attention_total, report.attention_lowered) == (layers, layers)
    assert (report.linear_total, report.linear_lowered) == (7 * layers + 1, 7 * layers + 1)
    names = {s.name for s in report.sites}
    assert "lm_head" in names and "model.layers.0.self_attn.q_proj" in names
    assert report.unlowered == []
    assert report.routes == hf.routes(model).summary()
    assert "hf.accelerate routes: prepared, masks, packed_prefill" in str(report)


def test_accelerate_keeps_the_forward_signature_and_restore_undoes_it(reference):
    model = wl.copy_model(reference)
    before = inspect.signature(model.forward)
    hf.accelerate(model)
    assert inspect.signature(model.forward) == before  # generate() inspects it
    assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    assert model.generation_config.disable_compile is True
    hf.restore(model)
    assert "forward" not in vars(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model, "_xyserve_accelerator")
    with pytest.raises(ValueError, match="was not accelerated"):
        hf.restore(model)


def test_accelerate_twice_replaces_the_first(reference):
    model = hf.accelerate(wl.copy_model(reference))
    hf.accelerate(model, inductor=False, lower_linear=False)
    assert model._xyserve_accelerator.config.lower_linear is False
    hf.restore(model)
    assert model.config._attn_implementation == "sdpa"


def test_accelerate_rejects_bad_input(reference):
    with pytest.raises(ValueError, match="expects a Hugging Face PreTrainedModel, got Linear"):
        hf.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown xyserve option 'inductr'"):
        hf.accelerate(wl.copy_model(reference), inductr=True)


def test_accelerate_refuses_options_it_would_ignore(reference):
    with pytest.raises(ValueError, match=r"'dynamic' is not an .*: accelerate marks the sizes"):
        hf.accelerate(wl.copy_model(reference), dynamic=True)
    model = hf.accelerate(wl.copy_model(reference), pack_prefill=False, fullgraph=True)
    options = xy_inductor.AccelerateOptions(pack_prefill=False, fullgraph=True)
    assert model._xyserve_accelerator.options == options


def test_accelerated_forward_matches_eager_logits(reference):
    model = hf.accelerate(wl.copy_model(reference))
    ids, mask = wl.prompt_batch([11, 6], reference.config.vocab_size, seed=3)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()  # padded positions' logits are not meaningful in either
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("cache", "graphs"), [("dynamic", 2), ("static", 1)])
def test_model_with_per_layer_type_masks(cache, graphs):
    # Qwen2's config declares layer_types, so generate() hands static-cache calls a dict of
    # masks per layer type rather than one mask.
    reference = wl.tiny_model("qwen2")
    assert getattr(reference.config, "layer_types", None)
    expected = expected_tokens(reference, cache)
    model = hf.accelerate(wl.copy_model(reference))
    got = wl.generate_pass(model, cache, CALLS, NEW_TOKENS).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    s = xy_inductor.stats()
    assert s.backend_compiles == graphs and s.sites_unlowered == {}


def test_inductor_mode_does_not_recompile_on_cache_layout():
    # Inductor may leave the prefill's KV cache in a transposed layout; after a 1-token prompt
    # the difference hides in a size-1 dim. accelerate() must hand decode the layout it
    # traced, or Dynamo's stride guards recompile.
    reference = wl.tiny_llama(num_hidden_layers=2)
    calls = ((1,), (6,), (4, 2))
    expected = wl.generate_pass(reference, "dynamic", calls, 3).outputs
    model = hf.accelerate(wl.copy_model(reference), inductor=True)
    got = wl.generate_pass(model, "dynamic", calls, 3).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    s = xy_inductor.stats()
    assert s.backend_compiles == 2 and s.inductor_failures == 0


def test_lower_attention_false_keeps_sdpa_and_says_so(reference):
    model = hf.accelerate(wl.copy_model(reference), lower_attention=False)
    assert model.config._attn_implementation == hf.TRACED_IMPLEMENTATION
    ids, mask = wl.prompt_batch([6], reference.config.vocab_size, seed=1)
    with torch.no_grad():
        report = xy_inductor.explain(model, input_ids=ids, attention_mask=mask)
    layers = reference.config.num_hidden_layers
    assert (report.attention_total, report.attention_lowered) == (layers, 0)
    assert {reason for _site, reason in report.unlowered} == {
        "disabled by option lower_attention=False"
    }
    assert report.linear_lowered == report.linear_total == 7 * layers + 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_padded_prefills_run_packed_with_eager_tokens(reference, cache):
    # Left-padded batches: the prefill runs only the real tokens (attention per prompt), and
    # decode continues from the cache the padded prefill would have written.
    calls = ((5, 3), (9, 2, 4), (1,), (2, 1))
    expected = wl.generate_pass(reference, cache, calls, 3).outputs
    model = hf.accelerate(wl.copy_model(reference))
    xy_inductor.reset_stats()  # the probe's op calls
    got = wl.generate_pass(model, cache, calls, 3).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)
    layers = reference.config.num_hidden_layers
    s = xy_inductor.stats()
    # Every padded prefill packed; (1,), unpadded and after a decode step, ran in the decode
    # graph instead (the next test).
    assert s.calls["attention_packed"] == {cpu_or_aten(): layers * 3}
    assert s.backend_compiles == 2  # the packed prefill and decode


@pytest.mark.parametrize(
    ("cache", "inductor"), [("dynamic", False), ("dynamic", True), ("static", False)]
)
def test_unpadded_prefills_run_in_the_decode_graph_once_it_exists(reference, cache, inductor):
    # A prefill without padding gains nothing from packing; once a decode step has run, it
    # runs in the decode graph (a DynamicCache given zero-length layers, a StaticCache as
    # initialised), without a new graph.
    calls = ((7,), (5, 3), (12,), (4, 4), (1,))
    expected = wl.generate_pass(reference, cache, calls, 3).outputs
    model = hf.accelerate(wl.copy_model(reference), inductor=inductor)
    xy_inductor.reset_stats()  # the probe's op calls
    first = wl.generate_pass(model, cache, calls, 3)
    second = wl.generate_pass(model, cache, calls, 3)
    for want, a, b in zip(expected, first.outputs, second.outputs, strict=True):
        torch.testing.assert_close(a, want, rtol=0, atol=0)
        torch.testing.assert_close(b, want, rtol=0, atol=0)
    layers = reference.config.num_hidden_layers
    s = xy_inductor.stats()
    # Packed: the first (7,) (no decode step yet) and (5, 3) twice. (12,), (4, 4) (a batch
    # without padding) and (1,) ran in the decode graph.
    assert s.calls["attention_packed"] == {cpu_or_aten(): layers * 3}
    assert s.backend_compiles == 2


def test_a_prefill_of_another_form_gets_its_own_graph_and_no_guessed_positions(reference):
    # The decode graph serves a prefill only if the call has the form of the decode steps it
    # was compiled for (same keywords, scalar values, tensor ranks): here the prefill passes no
    # position_ids, the decode steps do. Without position ids it is not packed either (a
    # packed row's positions would be the model's default ones guessed), so it runs as one
    # padded graph of its own: two graphs in all, and the model's own logits.
    from transformers import DynamicCache

    model = hf.accelerate(wl.copy_model(reference))
    xy_inductor.reset_stats()  # the probe's calls
    for n in (6, 9):
        ids, mask = wl.prompt_batch([n], reference.config.vocab_size, seed=n)
        logits = []
        for m in (model, reference):
            cache = DynamicCache(config=reference.config)
            with torch.no_grad():
                out = m(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
                step = m(
                    input_ids=token,
                    attention_mask=torch.cat([mask, mask.new_ones((1, 1))], dim=1),
                    cache=cache,
                    position_ids=torch.tensor([[n]]),
                    logits_to_keep=1,
                )
            logits.append((out.logits, step.logits))
        for got, want in zip(*logits, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    s = xy_inductor.stats()
    assert "attention_packed" not in s.calls
    assert s.backend_compiles == 2


def test_pack_prefill_false_runs_the_padded_batch(reference):
    calls = ((5, 3),)
    expected = wl.generate_pass(reference, "dynamic", calls, 2).outputs
    model = hf.accelerate(wl.copy_model(reference), pack_prefill=False)
    got = wl.generate_pass(model, "dynamic", calls, 2).outputs
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert "attention_packed" not in xy_inductor.stats().calls
    assert hf.routes(model).packed_prefill == hf.Route(
        False, "disabled by option pack_prefill=False"
    )


def test_sliding_window_models_are_not_packed():
    model = hf.accelerate(wl.tiny_model("mistral"))
    routes = hf.routes(model)
    assert routes.prepared.taken and not routes.packed_prefill.taken
    assert "DynamicSlidingWindowLayer" in routes.packed_prefill.reason


def _hf_masks(model, mask, cache, batch):
    """What Hugging Face builds for a decode step (the builder ``_masks`` falls back to)."""
    from transformers.masking_utils import create_masks_for_generate

    return create_masks_for_generate(
        config=model.config,
        inputs_embeds=torch.empty((batch, 1, 0), dtype=model.dtype),
        attention_mask=mask,
        cache=cache,
        position_ids=None,
    )


def _filled_cache(model, batch, past):
    from transformers import DynamicCache

    text = model.config
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = DynamicCache(config=text)
    kv = torch.zeros(batch, heads, past, head_dim)
    for layer in range(text.num_hidden_layers):
        cache.update(kv, kv, layer)
    return cache


@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.int32])
@pytest.mark.parametrize(
    ("batch", "past", "padding"), [(1, 64, ()), (3, 10, (0, 3, 7)), (2, 1, ())]
)
def test_decode_masks_are_what_hugging_face_builds(reference, dtype, batch, past, padding):
    # accelerate() builds a decode step's mask of a full-attention DynamicCache itself (the
    # padding mask as [B, 1, 1, Lk] bool); it must be Hugging Face's mask exactly, strides
    # included (Dynamo guards them), or tokens or graphs would change.
    model = hf.accelerate(wl.copy_model(reference))
    accelerator = model._xyserve_accelerator
    assert hf.routes(model).decode_mask.taken
    cache = _filled_cache(reference, batch, past)
    mask = torch.ones(batch, past + 1, dtype=dtype)
    for row, pad in enumerate(padding):
        mask[row, :pad] = 0
    mine = accelerator._decode_mask(mask, cache, batch, 1)
    theirs = _hf_masks(model, mask, cache, batch)
    assert mine is not None
    assert (mine.dtype, mine.shape, mine.stride()) == (theirs.dtype, theirs.shape, theirs.stride())
    assert torch.equal(mine, theirs)
    # No mask at all: the same as an all-ones one.
    built = accelerator._masks({}, cache, batch, 1, torch.device("cpu"))
    ones = _hf_masks(model, torch.ones(batch, past + 1, dtype=torch.long), cache, batch)
    assert torch.equal(built, ones) and built.stride() == ones.stride()


def test_decode_masks_are_left_to_hugging_face_where_they_differ(reference):
    # Prefill (several queries: causal), a mask longer than the cache, a sliding-window model,
    # a model with per-layer mask types: each goes to Hugging Face's builder.
    accelerator = hf.accelerate(wl.copy_model(reference))._xyserve_accelerator
    cache = _filled_cache(reference, 1, 8)
    assert accelerator._decode_mask(torch.ones(1, 9 + 3), cache, 1, 3) is None
    assert accelerator._decode_mask(torch.ones(1, 12, dtype=torch.long), cache, 1, 1) is None
    assert accelerator._decode_mask(torch.ones(1, 9), cache, 1, 1) is None  # float mask
    for family in ("mistral", "qwen2"):
        other = hf.routes(hf.accelerate(wl.tiny_model(family)))
        assert not other.decode_mask.taken and "its config sets" in other.decode_mask.reason


def _decode_logits(model, steps: int = 2) -> torch.Tensor:
    from transformers import DynamicCache

    ids, mask = wl.prompt_batch([12], model.config.vocab_size, seed=0)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        for s in range(steps):
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            out = model(
                input_ids=token,
                attention_mask=mask,
                cache=cache,
                position_ids=torch.tensor([[12 + s]]),
                logits_to_keep=1,
            )
    return out.logits


def test_accelerate_after_a_plain_compile_of_the_same_class(reference):
    # Regression: a plain torch.compile(dynamic=True) of another instance, run first, left
    # Dynamo's automatic-dynamic state (per code object) holding a 2-D attention_mask; the
    # accelerated model's 4-D decode mask then got a symbol for its broadcast head dim, and the
    # attention op's broadcast check failed the compile (benchmarks/op_overhead.py --decode).
    plain = wl.copy_model(reference)
    plain.forward = torch.compile(plain.forward, backend="eager", dynamic=True)
    _decode_logits(plain)
    model = hf.accelerate(wl.copy_model(reference))
    torch.testing.assert_close(_decode_logits(model), _decode_logits(reference))
    assert xy_inductor.stats().calls["attention"]  # the op ran, not a fallback


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_deprecated_cache_keyword_is_prepared_like_the_new_one(reference, name):
    # transformers 5 calls the cache `cache` and still takes `past_key_values`; passed under
    # the old name, the cache used to reach the graph unprepared: a third graph for this run.
    from torch._dynamo.utils import counters
    from transformers import DynamicCache

    model = hf.accelerate(wl.copy_model(reference))
    before = counters["stats"]["unique_graphs"]
    for n in (5, 9, 17, 33):
        ids, mask = wl.prompt_batch([n], reference.config.vocab_size, seed=n)
        got, want = [], []
        with torch.no_grad():
            for m, out in ((model, got), (reference, want)):
                cache = DynamicCache(config=reference.config)
                step = m(input_ids=ids, attention_mask=mask, **{name: cache}, logits_to_keep=1)
                step_mask = mask
                for s in range(3):
                    token = step.logits[:, -1:].argmax(-1)
                    out.append(token)
                    step_mask = torch.cat([step_mask, step_mask.new_ones((1, 1))], dim=1)
                    step = m(
                        input_ids=token,
                        attention_mask=step_mask,
                        **{name: cache},
                        position_ids=torch.tensor([[n + s]]),
                        logits_to_keep=1,
                    )
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert counters["stats"]["unique_graphs"] - before == 2  # packed prefill, decode


def test_a_zero_length_cache_compiles_correctly_where_no_decode_graph_takes_it(reference):
    # Robustness: should Dynamo hold no graph for the zero-length prefill (a case _decode_serves
    # is meant to rule out), the call compiles one and still answers exactly.
    model = hf.accelerate(wl.copy_model(reference))
    accelerator = model._xyserve_accelerator
    calls = ((7,), (1,), (4, 4))
    expected = wl.generate_pass(reference, "dynamic", calls, 3).outputs
    wl.generate_pass(model, "dynamic", ((3,),), 2)  # the decode graph and its form
    form = accelerator.decode_form
    torch._dynamo.reset()
    accelerator.decode_form, accelerator.decode_generation = form, compiling.registered()
    got = wl.generate_pass(model, "dynamic", calls, 3).outputs
    for want, out in zip(expected, got, strict=True):
        torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["prompt_lookup", "assisted"])
def test_speculative_generation_under_accelerate_gives_eager_tokens(reference, mode):
    # Prompt-lookup and assisted generation check several drafted tokens in one forward: verify
    # steps of the accelerated model (issue 25). Batch 1, as transformers requires for both.
    torch.manual_seed(0)
    prompt = torch.randint(3, reference.config.vocab_size, (1, 6))
    ids = torch.cat([prompt, prompt, prompt], dim=1)  # repeats, so prompt lookup finds drafts
    extra = (
        {"prompt_lookup_num_tokens": 3}
        if mode == "prompt_lookup"
        else {"assistant_model": wl.copy_model(reference)}
    )
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=12, do_sample=False, **extra)
        model = hf.accelerate(wl.copy_model(reference))
        xy_inductor.reset_stats()
        got = model.generate(ids, max_new_tokens=12, do_sample=False, **extra)
        again = model.generate(ids, max_new_tokens=12, do_sample=False, **extra)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    assert xy_inductor.stats().backend_compiles <= 2
