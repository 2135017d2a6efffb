"""Imports run one way: front end (``xy_inductor/``) → ``lowering/`` → ``runtime/`` →
``kernels/``, and no provider imports another. Read from the source, so a new import that
breaks the order fails here, whether or not it would also make a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("xy_inductor", "lowering", "runtime", "kernels")
# The one options object is a leaf (it imports nothing of ours): every layer may read it.
SHARED = {"xy_inductor.config"}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "xy_inductor":
        return "outside"
    if len(parts) > 1 and parts[1] in ("lowering", "runtime", "kernels"):
        return parts[1]
    return "front end"


def _family(module: str) -> str:
    """A provider's modules share the name before the first underscore (triton, triton_gemm)."""
    return module.rsplit(".", 1)[-1].split("_")[0]


def _imports(path: Path) -> list[str]:
    """Modules of ours that ``path`` imports when it runs (``TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend(
                f"{node.module}.{a.name}" if node.module == "xy_inductor" else node.module
                for a in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [m for m in found if m.split(".")[0] == "xy_inductor"]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):  # subpackages too (xy_inductor.vllm)
            package = "xy_inductor" if folder == "xy_inductor" else f"xy_inductor.{folder}"
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), path))
    return out


ALLOWED = {
    "front end": {"front end", "lowering", "runtime", "kernels"},
    "lowering": {"lowering", "runtime"},
    "runtime": {"runtime", "kernels"},
    "kernels": {"kernels"},
}


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda x: str(x))
def test_imports_run_one_way(module, path):
    layer = _layer(module)
    for imported in _imports(path):
        if imported in SHARED:
            continue
        assert _layer(imported) in ALLOWED[layer], f"{module} ({layer}) imports {imported}"
        if layer == "kernels" and imported not in ("xy_inductor.kernels.contract",):
            assert _family(imported) == _family(module), (
                f"provider module {module} imports another provider's module {imported}"
            )


def test_the_check_sees_imports():
    # The scan itself must find what it polices, or every test above passes vacuously.
    assert "xy_inductor.kernels.contract" in _imports(ROOT / "kernels" / "aten.py")
    assert "xy_inductor.runtime.calls" not in _imports(ROOT / "kernels" / "aten.py")
    assert "xy_inductor.kernels.contract" in _imports(ROOT / "runtime" / "providers.py")
