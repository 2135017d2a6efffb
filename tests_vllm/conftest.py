"""Shared fixtures of the vLLM tests: tiny model dirs, and engines run in child processes.

Run with ``make test-vllm`` (the ``.venv-vllm`` environment has vLLM's CPU build and this
package installed, so vLLM finds the plugin through its entry point).

- ``model_dir(family)``: a tiny random model of that family, saved once per session.
- ``run_engines(model, engine_run(backend, prompts, **engine_args), ...)``: ``vllm.LLM``
  engines one after the other in one fresh child process (``engine_child.py``); returns their
  reports. Memoised per session, so a test comparing against a run another test made (the
  server against the offline engine, tensor parallel against one worker) reuses it.

vLLM is not optional here: without it these tests fail at collection, they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    raise ImportError("tests_vllm needs vLLM: run them with `make test-vllm` (builds .venv-vllm)")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tiny_models import make_model  # noqa: E402

# A child's engines, one at a time, on the 2-core machine.
ENGINE_TIMEOUT_S = 420


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an engine's child process: the engine core in-process (2 s start
    instead of 17 s) and no usage reporting; ``extra`` on top."""
    env = dict(os.environ)
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_NO_USAGE_STATS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Callable[[str], str]:
    made: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in made:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            made[family] = str(make_model(family, out))
        return made[family]

    return get


@pytest.fixture(scope="session")
def run_engines(tmp_path_factory) -> Callable[..., list[dict[str, Any]]]:
    """``run_engines(model_dir, *engine_runs, env=None, patches=())``: the runs' reports, in
    order, from one child process (memoised per session on the arguments); ``patches`` names
    ``engine_child.PATCHES`` to apply in the child first."""
    reports: dict[str, list[dict[str, Any]]] = {}

    def run(
        model: str,
        *runs: dict[str, Any],
        env: dict[str, str] | None = None,
        patches: tuple[str, ...] = (),
    ):
        spec = {"model": model, "runs": list(runs), "patches": list(patches)}
        key = json.dumps([spec, env], sort_keys=True)
        if key in reports:
            return reports[key]
        folder = tmp_path_factory.mktemp("engine")
        spec_path, result_path = folder / "spec.json", folder / "result.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run(
            [sys.executable, str(HERE / "engine_child.py"), str(spec_path), str(result_path)],
            env=child_env(env),
            capture_output=True,
            text=True,
            timeout=ENGINE_TIMEOUT_S,
        )
        done = json.loads(result_path.read_text())["runs"] if result_path.exists() else []
        if len(done) != len(runs):
            raise AssertionError(
                f"engine child exited {proc.returncode} after {len(done)} of {len(runs)} "
                f"engines:\n{proc.stderr[-6000:]}"
            )
        reports[key] = done
        return done

    return run
