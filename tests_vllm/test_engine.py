"""xyserve's CUSTOM attention backend inside a real vLLM engine (CPU build, in-process core).

Greedy fp32 tokens must equal vLLM's own CPU backend's, request by request, on a workload
where chunked prefill mixes with decode and prefix caching hits. Tokens alone cannot tell which
backend ran (vLLM's CPU platform used to fall back to its own silently), so every test also
checks the attention class each layer runs and the xyserve counters of the engine's process.
"""

from __future__ import annotations

import pytest
from workload import ENGINE, engine_run, mixed_prompts, vllm_and_custom

from xy_inductor.kernels.cpu import build


def _varlen_path() -> str:
    """The path xyserve's attention takes here: the CPU provider's native kernel where it builds
    (the tiny models' head sizes are multiples of 16), else ATen's rows."""
    return "cpu/paged" if build.why_not_loaded() is None else "aten/rows"


FAMILIES = ("llama", "qwen2", "mistral")
WINDOW = 48  # tiny_models.FAMILIES["mistral"]

# vLLM's CPU workers for two ranks on this 2-core machine (docs/vllm.md); the callable
# collective_rpc sends to the workers needs vLLM's pickle-based serialisation.
TP_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "0|1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
}


def _kinds(steps: list[dict]) -> dict[str, int]:
    """Steps with decode rows, fresh prefills, continued prefills (keys before the queries: a
    later chunk, or a prefill after a prefix-cache hit), steps mixing decode with prefill, and
    steps of decode rows only or prefill rows only (a one-token prompt is a prefill)."""
    kinds = {
        "decode": 0,
        "prefill": 0,
        "continued prefill": 0,
        "mixed": 0,
        "decode only": 0,
        "prefill only": 0,
    }
    for step in steps:
        rows = list(zip(step["q"], step["kv"], strict=True))
        decode = any(q == 1 and kv > 1 for q, kv in rows)
        fresh = any(q > 1 and q == kv for q, kv in rows)
        later = any(1 < q < kv for q, kv in rows)
        kinds["decode"] += decode
        kinds["prefill"] += fresh
        kinds["continued prefill"] += later
        kinds["mixed"] += decode and (fresh or later)
        kinds["decode only"] += all(q == 1 and kv > 1 for q, kv in rows)
        kinds["prefill only"] += not decode
    return kinds


def _check_served_by_xyserve(report: dict, layers: int = 2, first: bool = True) -> dict:
    """The engine's layers ran xyserve's attention, and did so one step at a time: one
    ``VarlenStep`` and one provider choice per step, every layer running it, at most one
    plan built per step (plans are cached per shape class, process-wide: ``first`` is whether
    this was the child's first xyserve engine, which must have built some). Returns the
    worker's counters."""
    assert "error" not in report, report.get("traceback")
    [worker] = report["workers"]
    assert list(worker["layers"].values()) == ["XyserveAttentionImpl"] * layers
    stats = worker["stats"]
    steps = len(report["steps"])
    assert steps > 0
    assert stats["varlen_steps"] == steps
    assert stats["paths"] == {"attention_varlen": {_varlen_path(): steps * layers}}
    assert stats["varlen_step_checks"] == steps
    assert (1 if first else 0) <= stats["attention_plans"] <= steps
    return stats


@pytest.mark.parametrize("family", FAMILIES)
def test_custom_gives_vllms_tokens_request_by_request(family, model_dir, run_engines):
    prompts = mixed_prompts()
    ref, got = run_engines(model_dir(family), *vllm_and_custom())
    assert "error" not in ref, ref.get("traceback")

    # Installed but not selected, the plugin changes nothing: vLLM's own backend ran.
    [ref_worker] = ref["workers"]
    assert set(ref_worker["layers"].values()) == {"CPUAttentionBackendImpl"}
    assert ref_worker["stats"]["calls"] == {}
    _check_served_by_xyserve(got)
    [worker] = got["workers"]
    window = WINDOW if family == "mistral" else None
    assert set(worker["windows"].values()) == {window}

    for i, (want, have) in enumerate(zip(ref["tokens"], got["tokens"], strict=True)):
        assert have == want, f"request {i} ({len(prompts[i])} prompt tokens)"
    assert [len(t) for t in got["tokens"]] == [8] * len(prompts)

    # The workload did mix stages in one call, and hit the prefix cache.
    assert got["steps"] == ref["steps"]
    kinds = _kinds(got["steps"])
    for kind, count in kinds.items():
        assert count > 0, (kind, kinds)
    assert got["prefix_cache_hits"] > 0
    if window is not None:
        assert max(kv for step in got["steps"] for kv in step["kv"]) > 4 * window


def test_half_precision_engines_run_on_custom(model_dir, run_engines):
    # Random weights leave top-1/top-2 logit margins near half precision's rounding, so
    # kernels that round differently may pick different tokens; what is checked is that
    # xyserve serves every step in bf16 and fp16 and that the first tokens mostly agree.
    prompts = mixed_prompts()
    runs = [
        engine_run(backend, prompts, max_tokens=2, dtype=dtype, **ENGINE)
        for dtype in ("bfloat16", "float16")
        for backend in (None, "CUSTOM")
    ]
    reports = run_engines(model_dir("llama"), *runs)
    for i, (ref, got) in enumerate(zip(reports[::2], reports[1::2], strict=True)):
        assert "error" not in ref, ref.get("traceback")
        _check_served_by_xyserve(got, first=i == 0)
        agree = sum(a[0] == b[0] for a, b in zip(ref["tokens"], got["tokens"], strict=True))
        assert agree >= len(prompts) * 3 // 4, (agree, ref["tokens"], got["tokens"])


def test_tensor_parallel_2_gives_the_tokens_of_1(model_dir, run_engines):
    model = model_dir("llama")
    _, one = run_engines(model, *vllm_and_custom())
    [two] = run_engines(
        model,
        engine_run(
            "CUSTOM",
            mixed_prompts(),
            tensor_parallel_size=2,
            distributed_executor_backend="mp",
            **ENGINE,
        ),
        env=TP_ENV,
    )
    assert "error" not in two, two.get("traceback")
    for i, (want, have) in enumerate(zip(one["tokens"], two["tokens"], strict=True)):
        assert have == want, f"request {i}"
    # Both ranks (worker processes) ran xyserve's attention on their half of the heads, one
    # provider choice per step each.
    assert len(two["workers"]) == 2
    steps = one["workers"][0]["stats"]["varlen_steps"]
    for worker in two["workers"]:
        assert list(worker["layers"].values()) == ["XyserveAttentionImpl"] * 2
        stats = worker["stats"]
        assert stats["paths"] == {"attention_varlen": {_varlen_path(): 2 * stats["varlen_steps"]}}
        assert stats["varlen_step_checks"] == stats["varlen_steps"] == steps


UNSERVABLE = {"gemma2": "logit soft-capping", "bloom": "ALiBi position biases"}


def test_unservable_models_fail_at_start_naming_layers_and_features(model_dir, run_engines):
    models = {family: model_dir(family) for family in UNSERVABLE}
    reports = run_engines(
        models["gemma2"],
        *(engine_run("CUSTOM", [[5, 6]], model=models[f], **ENGINE) for f in UNSERVABLE),
    )
    for (family, feature), report in zip(UNSERVABLE.items(), reports, strict=True):
        assert "error" in report, f"{family}: the engine started"
        message = report["error"]
        assert "xyserve attention backend (CUSTOM) cannot serve this model" in message
        assert report.get("steps") is None  # it failed before any step
        # Every layer is named with what it needs (Gemma-2's two layers are in two KV cache
        # groups, full and sliding-window: the first group's builder names both).
        layer = "self_attention" if family == "bloom" else "self_attn"
        for i in (0, 1):
            assert f".{i}.{layer}.attn: {feature}" in message, message
