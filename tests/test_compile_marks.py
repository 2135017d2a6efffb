"""Size marks and symbolic settings exist only while Dynamo compiles (``compile_marks.py``)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.fx.experimental import _config as fx_config

import xy_inductor
from xy_inductor import compile_marks, hf
from xy_inductor import workload as wl
from xy_inductor.compile_marks import compiling

CALLS = ((7,), (1,), (33,), (5, 3), (9, 2, 4))


@pytest.fixture(scope="module")
def reference():
    return wl.tiny_llama()


def _dynamo_attrs(t: torch.Tensor) -> set[str]:
    return {k for k in vars(t) if k.startswith(("_dynamo_", "_has_dynamo_"))}


def _graphs() -> int:
    return xy_inductor.stats().backend_compiles


class _Counting:
    """``_Accelerator.marks`` with a count of its calls."""

    def __init__(self, accelerator) -> None:
        self.marks = accelerator.marks
        self.calls = 0

    def __call__(self, kw):
        self.calls += 1
        return self.marks(kw)


def _run_calls(model, reference, calls=CALLS):
    for i, lengths in enumerate(calls):
        ids, mask = wl.prompt_batch(lengths, reference.config.vocab_size, seed=i)
        with torch.no_grad():
            got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
            want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        # Nothing handed to the model keeps a mark.
        assert not _dynamo_attrs(ids) and not _dynamo_attrs(mask)


def test_marks_are_computed_only_when_dynamo_compiles(reference, monkeypatch):
    model = hf.accelerate(wl.copy_model(reference))
    accelerator = model._xyserve_accelerator
    counting = _Counting(accelerator)
    monkeypatch.setattr(accelerator, "marks", counting)
    _run_calls(model, reference)
    # Two graphs (prefill and decode): decode marks once; packed prefills mark their own
    # tensors through the same path, which counts under `list`, not here.
    assert _graphs() <= 2
    assert counting.calls == 1
    _run_calls(model, reference)  # a second pass compiles nothing and marks nothing
    assert counting.calls == 1


def test_settings_and_cache_marks_are_taken_off_after_each_compile(reference):
    from transformers import DynamicCache

    defaults = {k: getattr(fx_config, k) for k in compile_marks.SETTINGS if hasattr(fx_config, k)}
    model = hf.accelerate(wl.copy_model(reference))
    ids, mask = wl.prompt_batch((6,), reference.config.vocab_size, seed=0)
    cache = DynamicCache(config=reference.config)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        model(input_ids=token, attention_mask=mask, cache=cache, logits_to_keep=1)
    assert _graphs() == 2
    assert {k: getattr(fx_config, k) for k in defaults} == defaults
    for layer in cache.layers:
        assert not _dynamo_attrs(layer.keys) and not _dynamo_attrs(layer.values)
    assert not _dynamo_attrs(token) and not _dynamo_attrs(mask)


def test_a_failed_compile_takes_its_marks_and_settings_off():
    defaults = {k: getattr(fx_config, k) for k in compile_marks.SETTINGS if hasattr(fx_config, k)}
    x = torch.randn(3, 5)
    x._dynamo_static_indices = {7}  # a mark of the caller's own, kept as it was
    seen = {}

    def failing(gm, example_inputs):
        seen.update({k: getattr(fx_config, k) for k in defaults})
        seen["x"] = set(x._dynamo_weak_dynamic_indices)
        raise RuntimeError("backend failed")

    fn = torch.compile(lambda t: t * 2, backend=failing)
    call = compiling(list, [(x, (0,))])
    with call:
        # The failed compile does not fail the call: Dynamo runs the frame as it is.
        torch.testing.assert_close(fn(x), x * 2)
    assert "backend failed" in str(call.failure)
    assert seen == {**compile_marks.SETTINGS, "x": {0}}
    assert {k: getattr(fx_config, k) for k in defaults} == defaults
    assert torch._dynamo.config.suppress_errors is False
    assert _dynamo_attrs(x) == {"_dynamo_static_indices"} and x._dynamo_static_indices == {7}


def test_dynamo_reset_between_calls_keeps_the_marks_working(reference):
    model = hf.accelerate(wl.copy_model(reference))
    _run_calls(model, reference, CALLS[:2])
    torch._dynamo.reset()  # clears Dynamo's compile callbacks too
    before = _graphs()
    _run_calls(model, reference, CALLS)
    assert _graphs() - before <= 2


def test_without_compile_callbacks_marks_are_applied_around_the_call(reference, monkeypatch):
    # A torch without torch._dynamo.callback: the marks go on before the call and come off
    # after it, and the model still compiles two graphs.
    monkeypatch.setattr(compiling, "handler", None)
    model = hf.accelerate(wl.copy_model(reference))
    _run_calls(model, reference)
    assert _graphs() <= 2


def test_marks_that_raise_leave_the_compile_unmarked_and_the_settings_as_they_were(caplog):
    defaults = {k: getattr(fx_config, k) for k in compile_marks.SETTINGS if hasattr(fx_config, k)}
    x = torch.randn(3, 5)

    def broken(arg):
        yield (x, (0,))
        raise RuntimeError("no marks today")

    fn = torch.compile(lambda t: t * 2, backend="eager")
    with caplog.at_level("WARNING", logger="xy_inductor"), compiling(broken, None):
        torch.testing.assert_close(fn(x), x * 2)
    assert "could not mark the sizes of a call" in caplog.text
    assert {k: getattr(fx_config, k) for k in defaults} == defaults
    assert not _dynamo_attrs(x)


def test_a_compile_that_ends_in_another_thread_takes_its_settings_and_marks_off():
    # Dynamo runs the callbacks around the outermost of overlapping compiles, counted
    # process-wide. Here our call compiles (settings and marks go on), another thread's compile
    # overlaps it, ours ends first, our call returns, and the end callback runs in the other
    # thread later. Nothing may stay on: the settings (per thread) used to stay flipped for
    # every later compile of this thread, and the marks on the tensors.
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    compiling.registered()
    defaults = {k: getattr(fx_config, k) for k in compile_marks.SETTINGS if hasattr(fx_config, k)}
    x = torch.randn(3, 5)
    opened, closed = threading.Event(), threading.Event()
    seen_there: dict[str, object] = {}

    def other() -> None:
        with callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "other"):
            opened.set()
            closed.wait(10)
        seen_there.update({k: getattr(fx_config, k) for k in defaults})

    thread = threading.Thread(target=other)
    with compiling(list, [(x, (0,))]):
        ours = callback_handler.install_callbacks(CallbackTrigger.DYNAMO, "ours")
        ours.__enter__()
        assert {k: getattr(fx_config, k) for k in defaults} == {
            k: compile_marks.SETTINGS[k] for k in defaults
        }
        assert x._dynamo_weak_dynamic_indices == {0}
        thread.start()
        assert opened.wait(10)
        ours.__exit__(None, None, None)  # no end callback: the other compile is open
    assert {k: getattr(fx_config, k) for k in defaults} == defaults
    assert not _dynamo_attrs(x)
    closed.set()
    thread.join(10)
    assert seen_there == defaults  # the other thread's settings were never ours
    assert {k: getattr(fx_config, k) for k in defaults} == defaults
    assert not compile_marks._OPEN


def test_compiles_dynamo_starts_for_other_reasons_apply_nothing():
    # AOTAutograd's lazy backward and CUDA-graph recording also run the callbacks; a call
    # announced in this thread is not theirs to mark.
    from torch._dynamo.callback import CallbackTrigger, callback_handler

    compiling.registered()
    defaults = {k: getattr(fx_config, k) for k in compile_marks.SETTINGS if hasattr(fx_config, k)}
    x = torch.randn(3, 5)
    with (
        compiling(list, [(x, (0,))]),
        callback_handler.install_callbacks(CallbackTrigger.LAZY_BACKWARD, "backward"),
    ):
        assert {k: getattr(fx_config, k) for k in defaults} == defaults
        assert not _dynamo_attrs(x)


def test_a_compile_failing_under_the_settings_is_retried_without_them(reference, caplog):
    # torch 2.13 under backed_size_oblivious can fail a trace with a fake-tensor shape error
    # (Llama-4's MoE: TorchRuntimeError, raised out of generate()). The failing call runs as it
    # is, and later calls compile without the settings.
    model = hf.accelerate(wl.copy_model(reference))
    accelerator = model._xyserve_accelerator
    compiles = []

    def picky(gm, example_inputs):
        compiles.append(fx_config.backed_size_oblivious)
        if fx_config.backed_size_oblivious:
            raise RuntimeError("no symbolic sizes today")
        return gm.forward

    accelerator.compiled = torch.compile(accelerator.forward, backend=picky, dynamic=None)
    with caplog.at_level("WARNING", logger="xy_inductor"):
        _run_calls(model, reference, CALLS[:3])
    # The first call's frames failed under the settings (it ran as it is, inner frames too);
    # the calls after it compiled without them.
    assert compiles[0] is True and compiles[-1] is False
    assert accelerator.settings == {}
    assert "a compile failed" in caplog.text and "without backed_size_oblivious" in caplog.text
