"""What the xyserve backend returns for a graph: ``XyserveGraph``, a compiled function that
compile caches can save and load.

torch's AOT compile (``torch.compile(...).aot_compile``, ``torch.compiler.save/
load_compiled_function``), which vLLM's compile cache is built on, accepts a backend's result
only if it implements ``SerializableCallable`` (``torch/_dynamo/aot_compile_types.py``):
``serialize_compile_artifacts(fn) -> bytes`` and ``deserialize_compile_artifacts(bytes) -> fn``.
A plain ``gm.forward`` fails there ("does not implement SerializableCallable").

What is saved is the lowered graph (xyserve ops in place of the sites it rewrote), pickled with
``torch.fx._graph_pickler.GraphPickler``, behind a header line of JSON holding the key: xyserve's
version, torch's version, the xyserve op schemas, the backend options, the pass pipeline's
``uuid()``, and a digest of each source file that decides what a saved graph computes (see
``_SOURCES``), so that an edited checkout with an unchanged version refuses its old graphs.
Loading reads and checks the header before anything is unpickled, and refuses an artifact whose
key differs from what this process would compile with (options from ``XYSERVE_OPTIONS``, as the
backend reads them), or that is no xyserve artifact at all: ``StaleArtifactError``, and the
caller compiles again. A loaded graph skips lowering and runs as traced, calling the xyserve
implementations directly.

The check is against staleness, not tampering: what passes it is unpickled, so a compile-cache
directory must be as trusted as the code that loads from it (as torch's own AOT artifact,
Inductor's and vLLM's caches, which are pickles too).

Not saved (serialising raises, and callers such as vLLM then compile again at the next start):
graphs compiled with ``inductor=True``, whose Inductor code is not part of the artifact.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.resources
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from xy_inductor.config import BACKEND_OPTIONS, XyConfig, backend_config
from xy_inductor.kernels.aten import native
from xy_inductor.lowering import pipeline_uuid
from xy_inductor.lowering.opaque_ops import opaque_ops
from xy_inductor.runtime import counters
from xy_inductor.runtime.ops import DIRECT_CALLS, load_native

try:  # torch >= 2.12 keeps the protocol here; 2.11 in aot_compile itself
    from torch._dynamo.aot_compile_types import SerializableCallable
except ImportError:  # pragma: no cover - depends on the torch version
    from torch._dynamo.aot_compile import SerializableCallable

if TYPE_CHECKING:  # Python 3.10 has it elsewhere, and annotations are only read by checkers
    from importlib.resources.abc import Traversable

__all__ = [
    "ARTIFACT_FORMAT",
    "VERSION",
    "StaleArtifactError",
    "XyserveGraph",
    "artifact_key",
    "call_directly",
]

log = logging.getLogger("xy_inductor")


def _installed_version() -> str:
    """xy-inductor's version as installed (its package metadata): read here rather than from
    ``xy_inductor.__version__``, whose module imports the backend, which imports this one."""
    try:
        return importlib.metadata.version("xy-inductor")
    except importlib.metadata.PackageNotFoundError:  # sources on sys.path, never installed
        return "unknown"


VERSION = _installed_version()
"""xyserve's version in a saved graph's key."""

ARTIFACT_FORMAT = 2
"""Version of the saved layout: ``_MAGIC``, one line of JSON (the key and the graph's digest),
then the pickled graph. Part of the key."""

_MAGIC = b"xyserve-graph\n"

# Reading stops here: a header is a few KiB, and garbage must not be scanned to its end.
_MAX_HEADER = 1 << 20

# The sources that decide what a saved graph computes, by package: None for every ``.py`` file.
# The lowering made the graph (its passes, the pipeline ordering them, the flags Dynamo traced
# with); the op definitions give its calls their meaning (schemas, checks, fake and real
# implementations, the call objects they build); backend.py and this module turned Dynamo's
# graph into the saved bytes. Providers and kernels (Python, Triton, native.cpp) are left out:
# a loaded graph runs this process's, exactly as a graph lowered again would.
_SOURCES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("xy_inductor.lowering", None),
    ("xy_inductor.runtime", ("ops.py", "arguments.py")),
    ("xy_inductor.kernels", ("calls.py",)),
    ("xy_inductor", ("backend.py", "compiled_graph.py")),
)

# The implementation each xyserve op runs, and back: a graph run as traced calls the
# implementations, a saved graph names the ops (functions are not stable across processes).
_OP_OF_IMPL: dict[object, object] = {impl: op for op, impl in DIRECT_CALLS.items()}

# Node metadata kept in a saved graph: a loaded graph only runs, it is never lowered again.
_KEPT_META = ("stack_trace",)


class StaleArtifactError(RuntimeError):
    """A saved xyserve graph was written by another xyserve, torch, pass list, options or
    sources, or the bytes are no xyserve graph: nothing of it was unpickled."""


def call_directly(gm: torch.fx.GraphModule) -> None:
    """Make the graph call the xyserve implementations without the dispatcher's custom-op
    layers. Only for graphs that run as traced: Inductor needs the ops themselves.

    Except ``gemm`` and ``attention`` on CPU tensors where the C++ CPU kernels load
    (``kernels/aten/native.py``): through the dispatcher into C++ they cost less than the Python
    implementation called directly (``benchmarks/op_overhead.py``)."""
    in_cpp = () if load_native() is not None else native.ops()
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


def _file_digests(
    folder: Traversable, prefix: str, names: tuple[str, ...] | None
) -> dict[str, str]:
    """``prefix/name`` -> a digest of that file of ``folder``, for ``names`` or, if None, every
    ``.py`` file there. A missing file is ``absent``: an install without sources has none to
    edit."""
    if names is None:
        names = tuple(sorted(f.name for f in folder.iterdir() if f.name.endswith(".py")))
    digests = {}
    for name in names:
        file = folder.joinpath(name)
        digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16] if file.is_file() else "absent"
        digests[f"{prefix}/{name}"] = digest
    return digests


@functools.cache
def _source_digests() -> dict[str, str]:
    """The digests of ``_SOURCES``, read once per process through the packages' own locations
    (an editable checkout's folders, or site-packages)."""
    digests = {}
    for package, names in _SOURCES:
        folder = importlib.resources.files(package)
        digests.update(_file_digests(folder, package.rpartition(".")[2], names))
    return digests


def artifact_key(config: XyConfig) -> dict[str, object]:
    """What a saved graph must have been compiled with to be loaded in this process (JSON)."""
    return {
        "format": ARTIFACT_FORMAT,
        "xyserve": VERSION,
        "torch": torch.__version__,
        "op_schemas": _op_schemas(),
        "options": _options(config),  # before passes, which follow from it: the clearer reason
        "passes": pipeline_uuid(config.lowering_options()),
        "sources": dict(_source_digests()),  # last: any reason above says more
    }


def _stale_field(saved: dict[str, object], current: dict[str, object]) -> tuple[str, str] | None:
    """The first part of the key that differs, and how, or None."""
    for field in current:
        saved_value, current_value = saved.get(field), current[field]
        if field not in saved:
            return field, f"it has no {field} in its key"
        if saved_value == current_value:
            continue
        if field == "options":
            return field, (
                f"it was compiled with options {json.dumps(saved_value, sort_keys=True)}"
                f", this process uses {json.dumps(current_value, sort_keys=True)}"
            )
        if field == "sources" and isinstance(saved_value, dict) and isinstance(current_value, dict):
            files = saved_value.keys() | current_value.keys()
            edited = sorted(f for f in files if saved_value.get(f) != current_value.get(f))
            return field, f"xyserve's sources changed since it was saved: {', '.join(edited)}"
        return field, f"its {field} is {saved_value!r}, this process has {current_value!r}"
    extra = sorted(saved.keys() - current.keys())
    if extra:
        return extra[0], f"its key has {extra[0]!r}, which this xyserve does not know"
    return None


def _refused(reason: str, how: str) -> StaleArtifactError:
    counters.record_artifact_refused(reason)
    return StaleArtifactError(f"xyserve: saved graph not loaded: {how}")


def _checked_graph(data: bytes, current: dict[str, object]) -> bytes:
    """The pickled graph of ``data``, once its header shows it was saved by this xyserve with
    ``current`` as its key. Nothing is unpickled here: any other bytes raise
    ``StaleArtifactError``."""
    if not data.startswith(_MAGIC):
        raise _refused(
            "format",
            f"it is no xyserve graph of format {ARTIFACT_FORMAT} (an older xyserve wrote it, "
            "or it is another file)",
        )
    end = data.find(b"\n", len(_MAGIC), len(_MAGIC) + _MAX_HEADER)
    if end < 0:
        raise _refused("format", "its header is cut off")
    try:
        header = json.loads(data[len(_MAGIC) : end])
    except ValueError:  # not UTF-8, or not JSON
        raise _refused("format", "its header is not JSON") from None
    key = header.get("key") if isinstance(header, dict) else None
    digest = header.get("graph") if isinstance(header, dict) else None
    if not isinstance(key, dict) or not isinstance(digest, str):
        raise _refused("format", "its header has no key or no graph digest")
    stale = _stale_field(key, current)
    if stale is not None:
        raise _refused(*stale)
    graph = data[end + 1 :]
    if hashlib.sha256(graph).hexdigest() != digest:
        raise _refused("graph", "its graph's bytes differ from its header's digest (cut off?)")
    return graph


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
        header = {"key": artifact_key(fn.config), "graph": hashlib.sha256(graph).hexdigest()}
        return _MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + graph

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> XyserveGraph:
        from torch._subclasses import FakeTensorMode
        from torch.fx._graph_pickler import GraphPickler
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        config = backend_config()
        # As it reads back from JSON (a tuple option would come back a list).
        current = json.loads(json.dumps(artifact_key(config)))
        graph = _checked_graph(bytes(data), current)
        gm = GraphPickler.loads(graph, FakeTensorMode(shape_env=ShapeEnv()))
        gm.recompile()
        runnable = _saveable_copy(gm)  # its own nodes: call_directly rewrites them
        call_directly(runnable)
        counters.record_graph_loaded(opaque_ops(gm))
        log.info("xyserve: loaded a lowered graph from a compile cache")
        return cls(runnable.forward, graph=gm, config=config, loaded=True)

    def finalize_loading(self, vllm_config: object = None) -> None:
        """vLLM calls this on a graph loaded from its compile cache; nothing is deferred."""
