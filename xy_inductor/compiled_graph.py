"""What the xyserve backend returns for a graph: ``XyserveGraph``, a compiled function that
compile caches can save and load.

torch's AOT compile (``torch.compile(...).aot_compile``, ``torch.compiler.save/
load_compiled_function``), which vLLM's compile cache is built on, accepts a backend's result
only if it implements ``SerializableCallable`` (``torch/_dynamo/aot_compile_types.py``):
``serialize_compile_artifacts(fn) -> bytes`` and ``deserialize_compile_artifacts(bytes) -> fn``.
A plain ``gm.forward`` fails there ("does not implement SerializableCallable").

What is saved is the lowered graph (xyserve ops in place of the sites it rewrote), pickled with
``torch.fx._graph_pickler.GraphPickler``, and a key: xyserve's version, torch's version, the pass
pipeline's ``uuid()`` and the xyserve op schemas, and the backend options. Loading refuses an
artifact whose key differs from what this process would compile with (options from
``XYSERVE_OPTIONS``, as the backend reads them): the caller then compiles again. A loaded graph
skips lowering and runs as traced, calling the xyserve implementations directly.

Not saved (serialising raises, and callers such as vLLM then compile again at the next start):
graphs compiled with ``inductor=True``, whose Inductor code is not part of the artifact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

from xy_inductor.config import BACKEND_OPTIONS, XyConfig, backend_config
from xy_inductor.lowering import pipeline_uuid
from xy_inductor.lowering.opaque_ops import opaque_ops
from xy_inductor.runtime import native
from xy_inductor.runtime import stats as _stats
from xy_inductor.runtime.ops import DIRECT_CALLS

try:  # torch >= 2.12 keeps the protocol here; 2.11 in aot_compile itself
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # pragma: no cover - depends on the torch version
    from torch._dynamo.aot_compile import SerializableCallable

__all__ = ["ARTIFACT_FORMAT", "StaleArtifactError", "XyserveGraph", "artifact_key", "call_directly"]

log = logging.getLogger("xy_inductor")

ARTIFACT_FORMAT = 1
"""Version of the saved layout below; part of the key."""

# The implementation each xyserve op runs, and back: a graph run as traced calls the
# implementations, a saved graph names the ops (functions are not stable across processes).
_OP_OF_IMPL: dict[object, object] = {impl: op for op, impl in DIRECT_CALLS.items()}

# Node metadata kept in a saved graph: a loaded graph only runs, it is never lowered again.
_KEPT_META = ("stack_trace",)


class StaleArtifactError(RuntimeError):
    """A saved xyserve graph was written by another xyserve, torch, pass list or options."""


def call_directly(gm: torch.fx.GraphModule) -> None:
    """Make the graph call the xyserve implementations without the dispatcher's custom-op
    layers. Only for graphs that run as traced: Inductor needs the ops themselves.

    Except ``gemm`` and ``attention`` on CPU tensors where the C++ CPU kernels load
    (``runtime/native.py``): through the dispatcher into C++ they cost less than the Python
    implementation called directly (``benchmarks/op_overhead.py``)."""
    in_cpp = () if native.load() is not None else native.ops()
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in DIRECT_CALLS:
            if node.target in in_cpp and _on_cpu(node):
                continue
            node.target = DIRECT_CALLS[node.target]
            changed = True
    if changed:
        gm.recompile()


def _on_cpu(node: torch.fx.Node) -> bool:
    """Whether the traced value of the op's first argument is a CPU tensor (False if unknown,
    as in a graph loaded from a cache, which keeps no values). Dynamo's graphs keep it as
    ``example_value``, graphs traced by make_fx as ``val``."""
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    if not isinstance(first, torch.fx.Node):
        return False
    value = first.meta.get("example_value", first.meta.get("val"))
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _op_schemas() -> str:
    """A digest of the xyserve ops' schemas: a saved graph calls them by name and position."""
    schemas = sorted(str(op._schema) for op in DIRECT_CALLS)
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()[:16]


def _options(config: XyConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in BACKEND_OPTIONS}


def artifact_key(config: XyConfig) -> dict[str, object]:
    """What a saved graph must have been compiled with to be loaded in this process."""
    import xy_inductor

    return {
        "format": ARTIFACT_FORMAT,
        "xyserve": xy_inductor.__version__,
        "torch": torch.__version__,
        "op_schemas": _op_schemas(),
        "options": _options(config),  # before passes, which follow from it: the clearer reason
        "passes": pipeline_uuid(config),
    }


def _stale_field(saved: dict[str, object], current: dict[str, object]) -> tuple[str, str] | None:
    """The first part of the key that differs, and how, or None."""
    for field in current:
        if saved.get(field) != current[field]:
            if field == "options":
                return field, (
                    f"it was compiled with options {json.dumps(saved.get(field), sort_keys=True)}"
                    f", this process uses {json.dumps(current[field], sort_keys=True)}"
                )
            saved_value, current_value = saved.get(field), current[field]
            return field, f"its {field} is {saved_value!r}, this process has {current_value!r}"
    return None


def _saveable_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` naming xyserve ops instead of their implementations, with only the
    attributes its graph reads and no trace-time metadata (fake tensors, module stacks)."""
    graph = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    out = graph.graph_copy(gm.graph, values)
    graph.output(out)
    for node in graph.nodes:
        node.meta = {k: v for k, v in node.meta.items() if k in _KEPT_META}
        if node.op == "call_function" and node.target in _OP_OF_IMPL:
            node.target = _OP_OF_IMPL[node.target]
    return torch.fx.GraphModule(gm, graph)


class XyserveGraph(SerializableCallable):
    """A graph as the xyserve backend compiled it: call it like the graph; save and load it
    through torch's compiled-function serialisation."""

    def __init__(
        self,
        run: Callable[..., Any],
        *,
        graph: torch.fx.GraphModule,
        config: XyConfig,
        not_saved: str | None = None,
        loaded: bool = False,
    ) -> None:
        self._run = run
        self.graph_module = graph
        """The graph after lowering (what runs, unless Inductor compiled it)."""
        self.config = config
        self.not_saved = not_saved
        """Why this graph cannot be saved, or None."""
        self.loaded = loaded
        """Whether it was loaded from a saved artifact rather than lowered in this process."""

    def __call__(self, *args: Any) -> Any:
        return self._run(*args)

    @classmethod
    def serialize_compile_artifacts(cls, fn: XyserveGraph) -> bytes:
        if fn.not_saved is not None:
            raise RuntimeError(f"xyserve: this compiled graph is not saved: {fn.not_saved}")
        from torch.fx._graph_pickler import GraphPickler, Options

        graph = GraphPickler.dumps(_saveable_copy(fn.graph_module), Options(ops_filter=None))
        return pickle.dumps({"key": artifact_key(fn.config), "graph": graph})

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> XyserveGraph:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        state = pickle.loads(data)
        saved_key = state.get("key", {}) if isinstance(state, dict) else {}
        config = backend_config()
        stale = _stale_field(saved_key, artifact_key(config))
        if stale is not None:
            field, how = stale
            _stats.record_artifact_refused(field)
            raise StaleArtifactError(f"xyserve: saved graph not loaded: {how}")
        gm = GraphPickler.loads(state["graph"], FakeTensorMode(shape_env=ShapeEnv()))
        gm.recompile()
        runnable = _saveable_copy(gm)  # its own nodes: call_directly rewrites them
        call_directly(runnable)
        _stats.record_graph_loaded(opaque_ops(gm))
        log.info("xyserve: loaded a lowered graph from a compile cache")
        return cls(runnable.forward, graph=gm, config=config, loaded=True)

    def finalize_loading(self, vllm_config: object = None) -> None:
        """vLLM calls this on a graph loaded from its compile cache; nothing is deferred."""
