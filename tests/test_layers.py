"""Imports run one way: front end (``xy_inductor/``) → ``lowering/`` → ``runtime/`` →
``kernels/``, and no provider imports another. Read from the source, so a new import that
breaks the order fails here, whether or not it would also make a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("xy_inductor", "lowering", "runtime", "kernels")


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


# Stricter for lowering/ (the passes get LoweringOptions, never the front end's config): its
# type-only and function-level imports count too, and the latter are refused outright.
LOWERING = ROOT / "lowering"


def _xy_imports(path: Path) -> list[tuple[str, bool]]:
    """Every xy_inductor module a file imports, at any depth (type-only imports too), and
    whether the import sits inside a function."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, inside) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module == "xy_inductor":
                    found.extend((f"xy_inductor.{a.name}", inside) for a in child.names)
                else:
                    found.append((child.module, inside))
            visit(child, inside)

    visit(tree, False)
    return [(name, inside) for name, inside in found if name.split(".")[0] == "xy_inductor"]


@pytest.mark.parametrize("path", sorted(LOWERING.glob("*.py")), ids=lambda p: p.name)
def test_lowering_imports_nothing_of_the_front_end(path):
    # Lowering may use the runtime below it, at module level only: a function-level import
    # would hide a cycle.
    for name, in_function in _xy_imports(path):
        layer = name.split(".")[1] if "." in name else "<package root>"
        assert layer in ALLOWED["lowering"], f"{path.name} imports {name}"
        assert not in_function, f"{path.name} imports {name} inside a function"
    assert "import_module" not in path.read_text(), f"{path.name} imports by name"
