"""xyserve as vLLM's compiler, in a real vLLM CPU engine: ``compilation_config={"mode": 2,
"backend": "xyserve"}`` with vLLM's compile cache on (first start saves, second start loads),
linear layers lowered when vLLM runs them as ``F.linear`` (as on CUDA), and piecewise mode 3
through a platform's ``get_compile_backend()`` returning ``XyserveCompiler``.

Every engine is compared with vLLM eager (``enforce_eager``) on the same prompts, greedy fp32,
request by request. Each test runs in its own child process(es) with its own ``VLLM_CACHE_ROOT``.
"""

from __future__ import annotations

import json

import pytest
from tiny_models import words
from workload import engine_run

from xy_inductor.config import OPTIONS_ENV

# Short and long prompts, one longer than max_num_batched_tokens: steps of several sizes, so
# one graph must serve several token counts.
PROMPTS = [words(list(range(3 + i, 3 + i + n))) for i, n in enumerate((5, 40, 90, 1, 17))]
ENGINE = {"max_num_batched_tokens": 64, "max_num_seqs": 8}
MODE2 = {"mode": 2, "backend": "xyserve"}
PIECEWISE = {"mode": 3, "backend": ""}  # the platform's get_compile_backend() names ours

# Ops of vLLM's graph on the CPU platform that xyserve leaves alone, by name (one of each per
# layer; 2 layers). RoPE and the norms are vLLM's custom ops only when enabled for the platform.
VLLM_ATTENTION_OPS = {"vllm.unified_attention_with_output": 2, "vllm.unified_kv_cache_update": 2}
LINEARS = 8  # per layer: qkv_proj, o_proj, gate_up_proj, down_proj


def _compiled(compilation_config: dict) -> dict:
    return engine_run(
        None,
        PROMPTS,
        max_tokens=6,
        enforce_eager=False,
        compilation_config=compilation_config,
        **ENGINE,
    )


def _eager() -> dict:
    return engine_run(None, PROMPTS, max_tokens=6, **ENGINE)


@pytest.fixture(scope="module")
def eager_tokens(model_dir, run_engines) -> list[list[int]]:
    [ref] = run_engines(model_dir("llama"), _eager())
    assert "error" not in ref, ref.get("traceback")
    return ref["tokens"]


def _stats(report: dict) -> dict:
    assert "error" not in report, report.get("traceback")
    [worker] = report["workers"]
    return worker["stats"]


def test_mode2_with_the_compile_cache_saves_then_loads(
    model_dir, run_engines, tmp_path, eager_tokens
):
    env = {"VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    # Two starts in two processes, as a restarted server: the second must load, not lower.
    [first] = run_engines(
        model_dir("llama"), _compiled(MODE2), env=env, patches=("fail_on_recompile",)
    )
    [second] = run_engines(
        model_dir("llama"),
        _compiled(MODE2),
        env={**env, "XY_SECOND_START": "1"},
        patches=("fail_on_recompile",),
    )

    stats = _stats(first)
    assert first["tokens"] == eager_tokens
    assert stats["backend_compiles"] == 1  # one graph for every batch size, no recompile
    assert stats["graphs_loaded"] == 0
    assert first["compilation_counter"]["num_aot_artifacts_saved"] == 1
    # On the CPU platform vLLM's linear layers are oneDNN handles: counted by name, not lowered.
    assert stats["opaque_ops"]["_C.onednn_mm"] == LINEARS
    for op, n in VLLM_ATTENTION_OPS.items():
        assert stats["opaque_ops"][op] == n
    assert stats["sites_lowered"] == {}

    stats = _stats(second)
    assert second["tokens"] == eager_tokens
    assert stats["backend_compiles"] == 0
    assert stats["graphs_loaded"] == 1
    assert stats["opaque_ops"]["_C.onednn_mm"] == LINEARS  # counted in loaded graphs too
    assert second["compilation_counter"]["num_aot_artifacts_loaded"] == 1
    print(
        f"mode 2 engine start: {first['seconds']['start']:.1f} s lowering, "
        f"{second['seconds']['start']:.1f} s loading from the cache"
    )


def test_a_cache_written_with_other_options_is_not_loaded(
    model_dir, run_engines, tmp_path, eager_tokens
):
    env = {"VLLM_CACHE_ROOT": str(tmp_path / "cache")}
    [first] = run_engines(model_dir("llama"), _compiled(MODE2), env=env)
    changed = {**env, OPTIONS_ENV: json.dumps({"lower_attention": False})}
    [second] = run_engines(model_dir("llama"), _compiled(MODE2), env=changed)
    assert first["tokens"] == second["tokens"] == eager_tokens
    stats = _stats(second)
    assert stats["artifacts_refused"] == {"options": 1}
    assert stats["graphs_loaded"] == 0
    assert stats["backend_compiles"] == 1  # compiled again, with the new options


def test_mode2_lowers_every_linear_layer_vllm_runs_as_f_linear(
    model_dir, run_engines, eager_tokens
):
    [report] = run_engines(
        model_dir("llama"),
        _compiled(MODE2),
        env={"VLLM_DISABLE_COMPILE_CACHE": "1"},
        patches=("linear_as_f_linear", "fail_on_recompile"),
    )
    stats = _stats(report)
    assert report["tokens"] == eager_tokens
    assert stats["sites_lowered"].get("linear") == LINEARS
    assert stats["sites_unlowered"].get("linear", 0) == 0
    assert "_C.onednn_mm" not in stats["opaque_ops"]
    assert stats["calls"]["gemm"]["aten"] > 0  # the lowered GEMMs really ran


def test_piecewise_mode_compiles_through_the_platform_hook(
    model_dir, run_engines, tmp_path, eager_tokens
):
    # The mega AOT artifact keeps only Inductor's pieces (XyserveCompiler refuses it).
    env = {"VLLM_CACHE_ROOT": str(tmp_path / "cache"), "VLLM_USE_MEGA_AOT_ARTIFACT": "0"}
    patches = ("piecewise_xyserve", "linear_as_f_linear")
    [first] = run_engines(model_dir("llama"), _compiled(PIECEWISE), env=env, patches=patches)
    [second] = run_engines(
        model_dir("llama"),
        _compiled(PIECEWISE),
        env={**env, "XY_SECOND_START": "1"},
        patches=patches,
    )
    stats = _stats(first)
    assert first["tokens"] == eager_tokens
    # vLLM split the graph at its attention ops and handed every piece to XyserveCompiler.
    assert first["compilation_counter"]["num_piecewise_graphs_seen"] > 1
    # The pieces between attention ops are compiled; the attention ops themselves are not.
    counter = first["compilation_counter"]
    assert stats["backend_compiles"] == counter["num_backend_compilations"]
    assert counter["num_backend_compilations"] == counter["num_piecewise_capturable_graphs_seen"]
    assert stats["sites_lowered"].get("linear") == LINEARS
    assert "vllm.unified_attention_with_output" not in stats["opaque_ops"]  # split off

    stats = _stats(second)
    assert second["tokens"] == eager_tokens
    assert stats["backend_compiles"] == 0
    assert stats["graphs_loaded"] == first["compilation_counter"]["num_backend_compilations"]
    assert stats["calls"]["gemm"]["aten"] > 0
    print(
        f"mode 3 engine start: {first['seconds']['start']:.1f} s compiling, "
        f"{second['seconds']['start']:.1f} s loading the pieces"
    )


def test_the_piecewise_compiler_is_what_the_platform_hook_names(monkeypatch):
    from vllm.compilation.compiler_interface import CompilerInterface
    from vllm.utils.import_utils import resolve_obj_by_qualname

    from xy_inductor.vllm import COMPILER_CLASS

    monkeypatch.setenv("VLLM_USE_MEGA_AOT_ARTIFACT", "0")
    compiler = resolve_obj_by_qualname(COMPILER_CLASS)()
    assert isinstance(compiler, CompilerInterface)
    assert compiler.name == "xyserve"
    before = compiler.compute_hash(None)
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"lower_linear": False}))
    assert compiler.compute_hash(None) != before  # options are part of vLLM's cache key


def test_the_piecewise_compiler_refuses_the_mega_artifact_it_cannot_load(monkeypatch):
    from xy_inductor.vllm import XyserveCompiler

    monkeypatch.setenv("VLLM_USE_MEGA_AOT_ARTIFACT", "1")
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE", raising=False)
    with pytest.raises(RuntimeError, match="VLLM_USE_MEGA_AOT_ARTIFACT=0"):
        XyserveCompiler()
