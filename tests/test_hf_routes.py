"""accelerate() takes a route only where its probe showed it exact on the model (issue 22).
Families of the zoo each with their routes: ``test_zoo.py``."""

from __future__ import annotations

import warnings

import pytest
import torch
import zoo
from transformers import DynamicCache

import xy_inductor
from xy_inductor import hf
from xy_inductor import workload as wl


@pytest.fixture(scope="module")
def llama():
    return wl.tiny_model("llama")


def _eager_and_accelerated(family: str):
    model = zoo.build(family)
    want = {cache: zoo.generate_all(model, cache) for cache in ("dynamic", "static")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.accelerate(model)
    got = {cache: zoo.generate_all(model, cache) for cache in ("dynamic", "static")}
    for cache in want:
        detail, error = zoo.compare(want[cache], got[cache])
        assert not detail, f"{family}, {cache} cache: {detail}"
        assert error <= zoo.ATOL
    return hf.routes(model), [str(w.message) for w in caught]


def test_a_model_with_its_own_attention_runs_plain_with_its_own_logits():
    # GPT-NeoX-Japanese computes attention itself: the packed prefill made every prompt see
    # the ones before it, and the decode mask (bool) was added to its scores as +1. Now the
    # probe finds it does not call AttentionInterface functions, and it runs as a plain
    # compile, with a warning that says so.
    routes, messages = _eager_and_accelerated("gpt_neox_japanese")
    assert not routes.prepared.taken
    assert "AttentionInterface" in routes.prepared.reason
    assert not routes.packed_prefill.taken and not routes.decode_mask.taken
    assert any("plain torch.compile" in m for m in messages)


def test_under_autocast_the_model_gives_autocasts_answers(llama):
    # Under bf16 autocast rotary embeddings leave q and k in float32 and v comes out bfloat16:
    # xyserve.attention raised where SDPA casts all three.
    model = wl.copy_model(llama)
    ids, mask = wl.prompt_batch([5, 3], llama.config.vocab_size, seed=0)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=3,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = llama.generate(**kwargs)
        hf.accelerate(model)
        got = model.generate(**kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-2)  # bf16
    assert xy_inductor.stats().calls["attention"]


def test_a_packed_prefill_changes_no_process_wide_setting(llama):
    # The packed prefill used to switch model.config._attn_implementation for its call: a
    # second thread's forward on the same model then saw the packed function (KeyError) or
    # traced it.
    model = hf.accelerate(wl.copy_model(llama))
    accelerator = model._xyserve_accelerator
    compiled, seen = accelerator.compiled, []

    def spy(*args, **kwargs):
        seen.append(model.config._attn_implementation)
        return compiled(*args, **kwargs)

    accelerator.compiled = spy
    xy_inductor.reset_stats()
    wl.generate_pass(model, "dynamic", ((5, 3),), 2)
    assert xy_inductor.stats().calls["attention_packed"]
    assert seen and set(seen) == {hf.ATTN_IMPLEMENTATION}


def _padded_prefill(model, **extra):
    ids, mask = wl.prompt_batch([6, 4], model.config.vocab_size, seed=2)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    kwargs.update(extra)
    with torch.no_grad():
        return model(**kwargs, cache=DynamicCache(config=model.config), use_cache=True)


def test_return_dict_false_gives_the_tuple(llama):
    # The packed path read out["logits"] of what the model returned: a tuple here (TypeError).
    model = hf.accelerate(wl.copy_model(llama))
    got, want = _padded_prefill(model, return_dict=False), _padded_prefill(llama, return_dict=False)
    assert isinstance(got, tuple)
    valid = torch.tensor([True, True])
    torch.testing.assert_close(got[0][valid], want[0][valid], rtol=1e-5, atol=1e-5)


def test_position_ids_of_batch_one_broadcast_over_the_batch(llama):
    # position_ids [1, L] for a batch of 2 is legal (it broadcasts); the packed path indexed
    # it per row (IndexError).
    model = hf.accelerate(wl.copy_model(llama))
    ids = torch.randint(
        1, llama.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0)
    )
    kwargs = dict(input_ids=ids, position_ids=torch.arange(5)[None], logits_to_keep=1)
    xy_inductor.reset_stats()
    with torch.no_grad():
        got = model(**kwargs, cache=DynamicCache(config=llama.config), use_cache=True).logits
        want = llama(**kwargs, cache=DynamicCache(config=llama.config), use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert xy_inductor.stats().calls["attention_packed"]


def test_a_model_that_cannot_be_probed_is_refused_or_left_alone(llama, monkeypatch):
    model = wl.copy_model(llama)

    def broken(*args, **kwargs):
        raise RuntimeError("this model cannot generate")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(hf.RefusedError, match="cannot generate"):
        hf.accelerate(model)
    assert "forward" not in vars(model) and model.config._attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match="left as it was"):
        assert hf.accelerate(model, strict=False) is model
    assert not hasattr(model, "_xyserve_accelerator") and "forward" not in vars(model)


def test_routes_say_what_was_taken(llama):
    routes = hf.routes(hf.accelerate(wl.copy_model(llama)))
    assert all(route.taken for _, route in routes.route_items())
    taken = "prepared, masks, packed_prefill, decode_prefill, decode_mask"
    assert routes.summary() == f"routes: {taken}"
    assert routes.kv_shapes == ((2, 16, 16), (2, 16, 16))
    with pytest.raises(ValueError, match="was not accelerated"):
        hf.routes(wl.copy_model(llama))
