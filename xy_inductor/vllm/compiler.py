"""xyserve as the compiler of vLLM's piecewise mode (``CompilationMode.VLLM_COMPILE``, mode 3).

Mode 3 splits vLLM's graph at its attention ops and hands every piece to a ``CompilerInterface``
(``vllm/compilation/compiler_interface.py``): Inductor's, eager's, or for any other backend the
class named by the platform's ``get_compile_backend()``. It does not take a backend name such as
``"xyserve"``: a platform plugin returns ``"xy_inductor.vllm.XyserveCompiler"`` from
``get_compile_backend()`` and the user leaves ``compilation_config["backend"]`` empty. vLLM's
Inductor passes (its fusion ``pass_config``) do not run: they are Inductor post-grad passes.

With vLLM's compile cache on, it needs ``VLLM_USE_MEGA_AOT_ARTIFACT=0``: the mega artifact
(default on torch >= 2.12) stores only Inductor-compiled pieces; the compiler refuses to start
under it rather than fail at the next start. (Mode 2,
``{"mode": 2, "backend": "xyserve"}``, needs none of this: vLLM calls the ``xyserve`` backend
through ``torch.compile``.)

Each piece is lowered by the xyserve backend (``backend.compile_graph``) with the options in
``XYSERVE_OPTIONS``. Its handle in vLLM's cache is ``(key, path)``, the path of the piece saved as
an ``XyserveGraph`` artifact in vLLM's cache directory; ``load`` refuses an artifact written by
another xyserve, torch, pass list, options or sources (``StaleArtifactError``), and vLLM compiles
again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from typing import Any

import torch.fx
from vllm.compilation.compiler_interface import CompilerInterface

from xy_inductor.backend import compile_graph
from xy_inductor.compiled_graph import XyserveGraph, artifact_key
from xy_inductor.config import backend_config

__all__ = ["XyserveCompiler"]


class XyserveCompiler(CompilerInterface):
    """vLLM's ``CompilerInterface`` for xyserve (see the module docstring)."""

    name = "xyserve"

    def __init__(self) -> None:
        import vllm.envs as envs

        if envs.VLLM_USE_MEGA_AOT_ARTIFACT and not envs.VLLM_DISABLE_COMPILE_CACHE:
            # vLLM's mega AOT artifact (the default on torch >= 2.12) keeps only pieces that
            # Inductor compiled (caching.StandaloneCompiledArtifacts): a warm start would run
            # None in place of every xyserve piece. Refused here, at engine start.
            raise RuntimeError(
                "xyserve's piecewise compiler needs VLLM_USE_MEGA_AOT_ARTIFACT=0: vLLM's mega "
                "AOT artifact stores only Inductor-compiled pieces, so a second start would "
                "fail to load xyserve's (or set VLLM_DISABLE_COMPILE_CACHE=1)"
            )
        self.cache_dir: str | None = None
        self.disable_cache = True

    def initialize_cache(
        self, cache_dir: str, disable_cache: bool = False, prefix: str = ""
    ) -> None:
        self.cache_dir = cache_dir
        self.disable_cache = disable_cache

    def compute_hash(self, vllm_config: Any) -> str:
        """Part of vLLM's cache directory name: the saved-graph key (xyserve's version, the
        pass pipeline, the op schemas, the options and the sources' digest), so that a change
        of any starts a new cache."""
        key = json.dumps(artifact_key(backend_config()), sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:10]

    def compile(
        self,
        graph: torch.fx.GraphModule,
        example_inputs: list[Any],
        compiler_config: dict[str, Any],
        compile_range: Any,
        key: str | None = None,
    ) -> tuple[Callable[..., Any] | None, Any | None]:
        compiled = compile_graph(graph, example_inputs, backend_config())
        if self.disable_cache or self.cache_dir is None or key is None:
            return compiled, None
        if compiled.not_saved is not None:
            return compiled, None
        path = os.path.join(self.cache_dir, f"{key}.xyserve")
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(XyserveGraph.serialize_compile_artifacts(compiled))
        os.replace(tmp, path)
        return compiled, (key, path)

    def load(
        self,
        handle: Any,
        graph: torch.fx.GraphModule,
        example_inputs: list[Any],
        graph_index: int,
        compile_range: Any,
    ) -> Callable[..., Any]:
        _, path = handle
        with open(path, "rb") as f:
            return XyserveGraph.deserialize_compile_artifacts(f.read())
