"""What the backend returns can be saved and loaded by compile caches (torch's AOT compile, which
vLLM's cache uses); options reach the backend through XYSERVE_OPTIONS; other libraries' ops are
counted by name."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import capture

import xy_inductor
import xy_inductor.lowering
from xy_inductor import backend, compiled_graph
from xy_inductor.compiled_graph import StaleArtifactError, XyserveGraph, artifact_key
from xy_inductor.config import BACKEND_OPTIONS, OPTIONS_ENV, XyConfig, backend_config
from xy_inductor.lowering import LinearToGemm
from xy_inductor.lowering.opaque_ops import KNOWN_OPAQUE


class Block(torch.nn.Module):
    """Two linear layers around causal attention: one attention and two linear sites."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.qkv(x).view(1, -1, 4, 16).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return self.out(a.transpose(1, 2).reshape(1, -1, 64))


def _aot_compile(model: torch.nn.Module, x: torch.Tensor):
    """torch's AOT compile with the xyserve backend, as vLLM's compile cache runs it."""
    with torch._dynamo.config.patch(enable_aot_compile=True):
        compiled = torch.compile(
            type(model).forward, backend="xyserve", fullgraph=True, dynamic=True
        )
        return compiled.aot_compile(((model, x), {}))


def _load(path):
    with open(path, "rb") as f:
        return torch.compiler.load_compiled_function(f, f_globals=Block.forward.__globals__)


def _save(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():
        fn = _aot_compile(model, torch.randn(1, 10, 64))
    assert isinstance(fn._artifacts.compiled_fn, XyserveGraph)
    path = tmp_path / "graph.bin"
    fn.save_compiled_function(str(path))
    assert xy_inductor.stats().sites_lowered == {"attention": 1, "linear": 2}
    return model, path


@pytest.fixture
def saved(tmp_path, monkeypatch):
    """A Block, and the path of its graph compiled by xyserve and saved by torch."""
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    return _save(tmp_path)


def test_saved_graph_loads_without_lowering_and_matches_eager(saved):
    model, path = saved
    xy_inductor.reset_stats()
    loaded = _load(path)
    x = torch.randn(1, 23, 64)  # another length: one graph for all
    with torch.no_grad():
        torch.testing.assert_close(loaded(model, x), model(x), rtol=1e-5, atol=1e-5)
    s = xy_inductor.stats()
    assert s.backend_compiles == 0  # nothing lowered again
    assert s.graphs_loaded == 1
    assert s.calls == {"attention": {"aten": 1}, "gemm": {"aten": 2}}


def test_options_changed_since_saving_refuse_the_artifact(saved, monkeypatch):
    _, path = saved
    xy_inductor.reset_stats()
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"lower_linear": False}))
    with pytest.raises(StaleArtifactError, match=r"compiled with options .*lower_linear"):
        _load(path)
    assert xy_inductor.stats().artifacts_refused == {"options": 1}
    assert xy_inductor.stats().graphs_loaded == 0


def test_another_xyserve_version_refuses_the_artifact(saved, monkeypatch):
    _, path = saved
    monkeypatch.setattr(compiled_graph, "VERSION", "0.0.0-other")
    with pytest.raises(
        StaleArtifactError, match=r"xyserve is '0\.1\.0', this process has '0\.0\.0-other'"
    ):
        _load(path)
    assert xy_inductor.stats().artifacts_refused == {"xyserve": 1}


def test_another_pass_list_refuses_the_artifact(saved, monkeypatch):
    _, path = saved
    monkeypatch.setattr(LinearToGemm, "uuid", lambda self: "changed")
    with pytest.raises(StaleArtifactError, match="passes"):
        _load(path)


class _Unpickled(Exception):
    pass


def _explode() -> None:
    raise _Unpickled("the payload was unpickled")


class _Payload:
    """Runs code when unpickled, as any pickle can."""

    def __reduce__(self):
        return _explode, ()


def _artifact(key: object, payload: bytes, digest_of: bytes | None = None) -> bytes:
    """Bytes in the saved layout: magic, one JSON line, the pickled graph."""
    digest = hashlib.sha256(payload if digest_of is None else digest_of).hexdigest()
    header = {"key": key, "graph": digest}
    return b"xyserve-graph\n" + json.dumps(header).encode() + b"\n" + payload


def _current_key() -> dict:
    return json.loads(json.dumps(artifact_key(backend_config())))


@pytest.mark.parametrize(
    "data",
    [
        # format 1: one pickle, key inside
        pickle.dumps({"key": {"format": 1}, "graph": b"", "payload": _Payload()}),
        _artifact({"format": 1}, pickle.dumps(_Payload())),
    ],
    ids=["old-layout", "stale-key"],
)
def test_a_stale_artifact_is_refused_before_any_of_it_is_unpickled(data):
    with pytest.raises(StaleArtifactError, match="format"):
        XyserveGraph.deserialize_compile_artifacts(data)
    assert xy_inductor.stats().artifacts_refused == {"format": 1}


def test_a_current_key_over_other_bytes_is_refused_before_they_are_unpickled():
    data = _artifact(_current_key(), pickle.dumps(_Payload()), digest_of=b"another graph")
    with pytest.raises(StaleArtifactError, match="differ from its header's digest"):
        XyserveGraph.deserialize_compile_artifacts(data)
    assert xy_inductor.stats().artifacts_refused == {"graph": 1}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        bytes(range(256)) * 4,
        pickle.dumps({"key": "not a dict", "graph": b""}),
        pickle.dumps(["not", "a", "dict"]),
        b"xyserve-graph\n",  # no header line
        b"xyserve-graph\n\xff\xfe\n",  # not UTF-8
        b"xyserve-graph\n{not json\n",
        b"xyserve-graph\n[1, 2]\n",
        b'xyserve-graph\n{"key": "not a dict", "graph": "00"}\n',
        b'xyserve-graph\n{"key": {}}\n',  # no graph digest
    ],
    ids=[
        "empty",
        "garbage",
        "binary",
        "old-layout-key-not-a-dict",
        "old-layout-not-a-dict",
        "no-header",
        "not-utf8",
        "not-json",
        "header-not-a-dict",
        "key-not-a-dict",
        "no-graph-digest",
    ],
)
def test_bytes_that_are_no_artifact_are_refused_as_stale(data):
    with pytest.raises(StaleArtifactError, match="saved graph not loaded"):
        XyserveGraph.deserialize_compile_artifacts(data)
    assert xy_inductor.stats().artifacts_refused == {"format": 1}


def test_a_key_missing_a_field_or_with_an_unknown_one_is_refused():
    key = _current_key()
    del key["sources"]
    with pytest.raises(StaleArtifactError, match="no sources in its key"):
        XyserveGraph.deserialize_compile_artifacts(_artifact(key, b""))
    key = {**_current_key(), "kernels": "abc"}
    with pytest.raises(StaleArtifactError, match="'kernels', which this xyserve does not know"):
        XyserveGraph.deserialize_compile_artifacts(_artifact(key, b""))
    assert xy_inductor.stats().artifacts_refused == {"sources": 1, "kernels": 1}


def test_a_cut_off_artifact_is_refused(saved):
    model, _ = saved
    gm, inputs = capture(model, torch.randn(1, 10, 64))
    with torch.no_grad():
        data = XyserveGraph.serialize_compile_artifacts(
            backend.compile_graph(gm, inputs, backend_config())
        )
    xy_inductor.reset_stats()
    with pytest.raises(StaleArtifactError, match="cut off"):
        XyserveGraph.deserialize_compile_artifacts(data[:-100])
    assert xy_inductor.stats().artifacts_refused == {"graph": 1}
    assert XyserveGraph.deserialize_compile_artifacts(data).loaded


def test_the_key_hashes_the_backend_options_only():
    # Options of other scopes (torch.compile's dynamic/fullgraph, hf.accelerate's pack_prefill)
    # change nothing in a compiled graph: a key holding them would refuse graphs for nothing.
    options = artifact_key(XyConfig(max_tokens=512))["options"]
    assert tuple(options) == BACKEND_OPTIONS and options["max_tokens"] == 512
    assert artifact_key(XyConfig())["xyserve"] == compiled_graph.VERSION == xy_inductor.__version__


def test_the_key_covers_every_lowering_source_and_the_op_definitions():
    sources = artifact_key(XyConfig())["sources"]
    lowering = Path(xy_inductor.lowering.__file__).parent
    expected = {f"lowering/{f.name}" for f in lowering.glob("*.py")}
    assert {"lowering/pipeline.py", "lowering/trace_flags.py"} <= expected
    definitions = {"runtime/ops.py", "runtime/arguments.py", "kernels/calls.py"}
    assert expected | definitions <= sources.keys()
    assert "absent" not in sources.values()


def test_editing_a_lowering_source_refuses_graphs_saved_before(tmp_path, monkeypatch):
    """The version does not change when a checkout is edited: the sources' digest does."""
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    copy = tmp_path / "lowering"
    lowering = Path(xy_inductor.lowering.__file__).parent
    shutil.copytree(lowering, copy, ignore=shutil.ignore_patterns("__pycache__"))
    digests = compiled_graph._file_digests
    monkeypatch.setattr(compiled_graph, "_source_digests", lambda: digests(copy, "lowering", None))
    _, path = _save(tmp_path)
    _load(path)
    assert xy_inductor.stats().graphs_loaded == 1
    with open(copy / "trace_flags.py", "a") as f:
        f.write("# edited\n")
    xy_inductor.reset_stats()
    with pytest.raises(
        StaleArtifactError, match=r"sources changed since it was saved: lowering/trace_flags\.py$"
    ):
        _load(path)
    assert xy_inductor.stats().artifacts_refused == {"sources": 1}


def test_a_loaded_graph_saves_again(saved, tmp_path):
    model, path = saved
    loaded = _load(path)
    again = tmp_path / "again.bin"
    loaded.save_compiled_function(str(again))
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        torch.testing.assert_close(_load(again)(model, x), model(x), rtol=1e-5, atol=1e-5)


def test_inductor_true_graphs_run_as_traced_are_saved(monkeypatch):
    """With inductor=True, a graph Inductor did not compile (here: Inductor failed) runs lowered
    as traced, and is saved like any other (a bound ``gm.forward`` is a new object on every
    access, so the backend must not compare against it)."""
    monkeypatch.setattr(backend, "_inductor", lambda gm, inputs, regional: None)
    model = Block().eval()
    gm, inputs = capture(model, torch.randn(1, 10, 64))
    with torch.no_grad():
        compiled = backend.compile_graph(gm, inputs, XyConfig(inductor=True))
    assert compiled.not_saved is None
    assert XyserveGraph.serialize_compile_artifacts(compiled)


def test_inductor_graphs_say_why_they_are_not_saved():
    graph = XyserveGraph(lambda: None, graph=None, config=XyConfig(), not_saved="because")
    with pytest.raises(RuntimeError, match="not saved: because"):
        XyserveGraph.serialize_compile_artifacts(graph)


def test_backend_reads_options_from_the_environment(monkeypatch):
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"lower_linear": False}))
    model = Block().eval()
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        out = torch.compile(model, backend="xyserve", dynamic=True)(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    s = xy_inductor.stats()
    assert s.sites_lowered == {"attention": 1}
    assert s.sites_unlowered == {"linear": 2}


def test_options_passed_in_code_win_over_the_environment(monkeypatch):
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"lower_linear": False}))
    model = Block().eval()
    with torch.no_grad():
        torch.compile(model, backend="xyserve", options={"lower_attention": False})(
            torch.randn(1, 9, 64)
        )
    assert xy_inductor.stats().sites_lowered == {"linear": 2}


@pytest.mark.parametrize(
    "value, expected",
    [("inductor=1", "must be a JSON object"), ('{"no_such": 1}', "unknown xyserve option")],
)
def test_bad_environment_options_fail_the_compile_clearly(monkeypatch, value, expected):
    monkeypatch.setenv(OPTIONS_ENV, value)
    with pytest.raises(Exception, match=expected), torch.no_grad():
        torch.compile(Block().eval(), backend="xyserve")(torch.randn(1, 9, 64))


# A stand-in for an op of another library (vLLM's _C.onednn_mm holds its weight in a handle).
_LIB = torch.library.Library("xytest_opaque", "DEF")
_LIB.define("packed_mm(Tensor x, int handle) -> Tensor")


@torch.library.impl(_LIB, "packed_mm", "CompositeExplicitAutograd")
def _packed_mm(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x * 2


@torch.library.register_fake("xytest_opaque::packed_mm", lib=_LIB)
def _packed_mm_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(x)


def _with_opaque_op(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(torch.ops.xytest_opaque.packed_mm(x, 7), w)


def test_other_libraries_ops_are_counted_by_name_in_explain_and_stats():
    x, w = torch.randn(5, 16), torch.randn(8, 16)
    report = xy_inductor.explain(_with_opaque_op, x, w)
    assert report.opaque_ops == {"xytest_opaque.packed_mm": 1}
    assert report.linear_lowered == 1
    assert "xytest_opaque.packed_mm" in str(report)
    with torch.no_grad():
        out = torch.compile(_with_opaque_op, backend="xyserve")(x, w)
    torch.testing.assert_close(out, _with_opaque_op(x, w))
    assert xy_inductor.stats().opaque_ops == {"xytest_opaque.packed_mm": 1}
    assert "xytest_opaque.packed_mm: 1 calls, left alone" in str(xy_inductor.stats())


def test_vllm_ops_are_named_with_what_they_are():
    assert "oneDNN handle" in KNOWN_OPAQUE["_C.onednn_mm"]
    assert "attention backend" in KNOWN_OPAQUE["vllm.unified_attention_with_output"]
