"""Installation: the backend is found by name, one import namespace, the console script."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from importlib.metadata import entry_points

import torch

import xy_inductor
from xy_inductor.backend import xyserve_backend


def test_backend_is_found_by_name_after_install():
    eps = entry_points(group="torch_dynamo_backends")
    assert "xyserve" in eps.names
    assert eps["xyserve"].value == "xy_inductor.backend:xyserve_backend"
    assert "xyserve" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("xyserve") is xyserve_backend


def test_one_namespace_and_no_top_level_folders(tmp_path):
    # Run from an empty folder: `python -m pytest` puts the repository root on sys.path, which
    # would make the source folders importable whatever the installation does.
    code = (
        "import importlib, importlib.util, pathlib, xy_inductor\n"
        "root = pathlib.Path(xy_inductor.__file__).resolve().parent.parent\n"
        "for name in ('lowering', 'runtime', 'kernels'):\n"
        "    module = importlib.import_module('xy_inductor.' + name)\n"
        "    assert pathlib.Path(module.__file__).parent.name == name, module.__file__\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    # `kernels` may be Hugging Face's kernel hub if installed, but never our folder.\n"
        "    origin = pathlib.Path(spec.origin or '').resolve() if spec else None\n"
        "    assert origin is None or not origin.is_relative_to(root), spec\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stderr


def test_import_is_cheap_and_registers_the_ops():
    code = (
        "import sys, torch, xy_inductor; "
        "print(hasattr(torch.ops.xyserve, 'gemm'), hasattr(torch.ops.xyserve, 'attention'), "
        "'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "False"]


def test_console_script_lists_its_commands():
    script = pathlib.Path(sys.executable).with_name("xyserve")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "bench", "explain"):
        assert command in out.stdout


def test_public_names():
    for name in (
        "compile",
        "explain",
        "stats",
        "reset_stats",
        "hf",
        "XyConfig",
        "ExplainReport",
        "CompileOptions",
        "AccelerateOptions",
    ):
        assert hasattr(xy_inductor, name), name
    assert callable(xy_inductor.hf.accelerate)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [ROOT / d for d in ("xy_inductor", "lowering", "runtime", "kernels")]


def test_no_submodule_imports_the_package_root():
    # The package root registers the ops and loads the front end: a submodule reading a name
    # of the root (its __version__, say) would import the front end. Submodules by name.
    submodules = {p.stem for d in SOURCES for p in d.glob("*.py")}
    submodules |= {p.name for d in SOURCES for p in d.iterdir() if (p / "__init__.py").exists()}
    submodules |= {d.name for d in SOURCES}
    for path in (p for d in SOURCES for p in d.rglob("*.py")):
        if path == ROOT / "xy_inductor" / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                assert "xy_inductor" not in [a.name for a in node.names], path
            elif isinstance(node, ast.ImportFrom) and node.module == "xy_inductor":
                for alias in node.names:
                    assert alias.name in submodules, f"{path}: from xy_inductor import {alias.name}"


def test_the_package_never_imports_what_is_not_installed():
    # tools/ (the fuzzer), tests/ and benchmarks/ stay in the repository: an import of them
    # from the package works in a checkout and fails for every user of the installed package.
    root = pathlib.Path(__file__).resolve().parent.parent
    outside = {"tools", "tests", "benchmarks", "helpers", "zoo", "torch_npu_standin"}
    found = []
    for folder in ("xy_inductor", "lowering", "runtime", "kernels"):
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [
                    f"{path.relative_to(root)}: {n}" for n in names if n.split(".")[0] in outside
                ]
    assert not found, found
