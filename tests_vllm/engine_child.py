"""Run vLLM engines one after the other in this (child) process; report what each did, as JSON.

    python engine_child.py SPEC.json RESULT.json

The tests run engines in child processes (``conftest.run_engines``): in-process, vLLM replaces
``torch.set_num_threads`` and sets ``LD_PRELOAD``, which must not leak into pytest. One child
runs several engines of one model in turn (importing vLLM costs ~12 s a process), each torn
down before the next, with xyserve's counters reset in between.

SPEC: ``{"model": dir, "runs": [run, ...], "patches": [name, ...]}``; a run has ``backend``
(``"CUSTOM"``, or null for vLLM's default), ``prompts`` (texts, or lists of token ids),
``max_tokens``, ``dtype`` and ``engine`` (more ``LLM`` arguments), and may name another
``model``. ``patches`` name changes to vLLM made in this process before any engine starts
(``PATCHES``: how the compile tests reach paths the CPU platform does not take by itself).
RESULT: ``{"runs": [report, ...]}``, a report holding the tokens and text of each request, the
attention implementation class and window of every layer in every worker, each worker's
``xy_inductor.stats()``, the rows of every step the attention metadata builders saw (engine
core in this process), vLLM's prefix-cache hits; or ``error`` with the exception's text when
that engine failed.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
import traceback
from typing import Any


def _worker_report(worker: Any) -> dict:
    """Runs in every worker (``collective_rpc``): which attention classes the model's layers
    really run, and this process's xyserve counters."""
    import dataclasses

    import xy_inductor

    model = worker.model_runner.model
    layers = {
        name: type(module.impl).__name__
        for name, module in model.named_modules()
        if hasattr(module, "impl") and hasattr(module, "attn_backend")
    }
    windows = {
        name: module.sliding_window
        for name, module in model.named_modules()
        if hasattr(module, "impl") and hasattr(module, "attn_backend")
    }
    return {
        "layers": layers,
        "windows": windows,
        "stats": dataclasses.asdict(xy_inductor.stats()),
    }


def _linear_as_f_linear() -> None:
    """vLLM's linear layers call ``F.linear`` on their weight, as on CUDA, instead of the CPU
    platform's oneDNN handle (``dispatch_cpu_unquantized_gemm``), which hides the weight."""
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils

    def dispatch(layer: Any, remove_weight: bool) -> None:
        layer.cpu_linear = F.linear

    utils.dispatch_cpu_unquantized_gemm = dispatch


def _piecewise_xyserve() -> None:
    """The CPU platform names xyserve's ``CompilerInterface`` in ``get_compile_backend()`` and
    keeps piecewise mode 3 (it turns mode 3 into mode 2 with Inductor by itself), as a
    platform plugin for a device xyserve serves would."""
    from vllm.config import CompilationMode
    from vllm.platforms.cpu import CpuPlatform

    from xy_inductor.vllm import COMPILER_CLASS

    update = CpuPlatform.check_and_update_config.__func__

    def check_and_update_config(cls: Any, vllm_config: Any) -> None:
        piecewise = vllm_config.compilation_config.mode == CompilationMode.VLLM_COMPILE
        update(cls, vllm_config)
        if piecewise:
            vllm_config.compilation_config.mode = CompilationMode.VLLM_COMPILE
            vllm_config.compilation_config.backend = COMPILER_CLASS
            # vLLM's fusion passes exist only on CUDA/XPU (their classes are not even imported
            # on the CPU), and they are Inductor passes that XyserveCompiler does not run.
            # What post_init_cudagraph_sizes() computes with no CUDA graphs, which vLLM runs
            # only on platforms with graph capture; piecewise mode needs it.
            if vllm_config.compilation_config.compile_sizes is None:
                vllm_config.compilation_config.compile_sizes = []
            passes = vllm_config.compilation_config.pass_config
            for name, value in vars(passes).items():
                if name.startswith(("fuse_", "enable_")) and value is True:
                    setattr(passes, name, False)

    CpuPlatform.get_compile_backend = classmethod(lambda cls: COMPILER_CLASS)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def _fail_on_recompile() -> None:
    """A second graph for a model xyserve compiled is an error (vLLM drops Dynamo's guards:
    one graph must serve every batch)."""
    import torch

    torch._dynamo.config.error_on_recompile = True


PATCHES = {
    "linear_as_f_linear": _linear_as_f_linear,
    "piecewise_xyserve": _piecewise_xyserve,
    "fail_on_recompile": _fail_on_recompile,
}


STEPS: list[dict] = []
"""Rows of every step the attention metadata builders saw since the current engine started."""


def _record_steps() -> None:
    """Wrap both metadata builders' ``build`` (once) to record each step's rows in ``STEPS``."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadataBuilder

    from xy_inductor.vllm.attention import XyserveMetadataBuilder

    for cls in (CPUAttentionMetadataBuilder, XyserveMetadataBuilder):
        build = cls.build

        # The draft model's runner passes the metadata by keyword.
        def recording(
            self, common_prefix_len, common_attn_metadata, fast_build=False, _build=build
        ):
            cm = common_attn_metadata
            cu = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
            STEPS.append(
                {
                    "q": [b - a for a, b in itertools.pairwise(cu)],
                    "kv": cm.seq_lens[: cm.num_reqs].tolist(),
                }
            )
            return _build(self, common_prefix_len, cm, fast_build)

        cls.build = recording


def run(model: str, spec: dict) -> dict:
    import dataclasses
    import gc

    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    import xy_inductor

    STEPS.clear()
    xy_inductor.reset_stats()
    engine: dict[str, Any] = {
        "model": spec.get("model", model),
        "dtype": spec.get("dtype", "float32"),
        "seed": 0,
        "enforce_eager": True,
        "max_model_len": 1024,
        "kv_cache_memory_bytes": 32 << 20,
        "disable_log_stats": False,  # get_metrics() reads the prefix-cache hits
        **spec.get("engine", {}),
    }
    if spec.get("backend"):
        engine["attention_config"] = {"backend": spec["backend"]}
    started = time.monotonic()
    llm = LLM(**engine)
    try:
        ready = time.monotonic()
        params = SamplingParams(
            max_tokens=spec.get("max_tokens", 8), temperature=0, ignore_eos=True
        )
        # Texts go through the model's tokenizer; lists of ids are the prompts as they are.
        prompts = [
            p if isinstance(p, str) else TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]
        ]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        done = time.monotonic()
        workers = llm.collective_rpc(_worker_report)
        metrics = llm.get_metrics()
        hits = sum(int(m.value) for m in metrics if m.name == "vllm:prefix_cache_hits")
        # Speculative decoding's counters (drafts proposed, draft tokens, accepted tokens).
        spec_decode = {
            m.name: int(m.value)
            for m in metrics
            if m.name.startswith("vllm:spec_decode")
            and isinstance(getattr(m, "value", None), int | float)
        }
        from vllm.compilation.counter import compilation_counter

        return {
            "compilation_counter": dataclasses.asdict(compilation_counter),
            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
            "texts": [o.outputs[0].text for o in outputs],
            "workers": workers,
            "steps": list(STEPS),
            "prefix_cache_hits": hits,
            "spec_decode": spec_decode,
            "seconds": {"start": ready - started, "generate": done - ready},
        }
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    started = time.monotonic()
    import vllm  # noqa: F401  (timed on its own: most of a child's start)

    for name in spec.get("patches", []):
        PATCHES[name]()
    _record_steps()
    reports = {"import_seconds": time.monotonic() - started, "runs": []}
    for one in spec["runs"]:
        try:
            report = run(spec["model"], one)
        except Exception as exc:
            report = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        reports["runs"].append(report)
        # Written after every run: a child that dies later still reports the runs it finished.
        with open(result_path, "w") as f:
            json.dump(reports, f)


if __name__ == "__main__":
    main()
