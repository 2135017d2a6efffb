"""Imports run one way: front end (``xy_inductor/``) → ``lowering/`` → ``runtime/`` →
``kernels/``; inside ``kernels/`` the contract (call objects, plans, tiles, decisions) is the
bottom and no provider imports another. Read from the source, every import statement alike
(module level, inside a function, under ``TYPE_CHECKING``), so a new import that breaks the order
fails here whether or not it would also make a cycle.

A function-level import of our own modules is allowed only where the imported module needs an
optional package (Triton, transformers, vLLM…) at its top: never to dodge a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"xy_inductor": "xy_inductor", "lowering": "xy_inductor.lowering"}
FOLDERS |= {"runtime": "xy_inductor.runtime", "kernels": "xy_inductor.kernels"}
RANK = {"kernels": 0, "runtime": 1, "lowering": 2, "front end": 3}
# The kernels' contract: what every provider consumes; it imports no provider.
CONTRACT = {
    f"xy_inductor.kernels.{m}"
    for m in ("contract", "calls", "attention_plan", "gemm_plan", "tree_masks")
}
# Packages a module may need that a user may not have: importing such a module inside a function
# keeps the package optional.
OPTIONAL = {"triton", "transformers", "vllm", "torch_npu", "matplotlib", "tqdm"}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("lowering", "runtime", "kernels"):
        return parts[1]
    return "front end"


def provider_of(module: str) -> str | None:
    """``aten`` for ``xy_inductor.kernels.aten.native``; None outside the providers."""
    parts = module.split(".")
    if parts[:2] != ["xy_inductor", "kernels"] or len(parts) < 3 or module in CONTRACT:
        return None
    return parts[2]


def imports(source: str) -> list[tuple[str, bool, int]]:
    """(module, inside a function, line) for every import statement of ``source``, ours and
    others'; ``from xy_inductor import x`` names ``xy_inductor.x``."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, in_function, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                name = f"{node.module}.{a.name}" if node.module in PACKAGES else node.module
                found.append((name, in_function, node.lineno))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = modules()
PACKAGES = {m for m, p in MODULES.items() if p.name == "__init__.py"}


def ours(name: str) -> str | None:
    """The module of ours that importing ``name`` runs last (``xy_inductor.hf.probe.decide`` is
    the module ``xy_inductor.hf.probe``), or None when it is not ours."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def violations(module: str, source: str) -> list[str]:
    """What ``source``, as the code of ``module``, imports against the rules."""
    out = []
    for name, in_function, line in imports(source):
        target = ours(name)
        if target is None or target == module:
            continue
        where = f"{module}:{line} imports {target}"
        if RANK[layer(target)] > RANK[layer(module)]:
            out.append(f"{where}: {layer(module)} may not import {layer(target)} (upward)")
        mine, theirs = provider_of(module), provider_of(target)
        if module in CONTRACT and theirs is not None:
            out.append(f"{where}: the kernels' contract may not import a provider")
        if mine is not None and theirs is not None and mine != theirs:
            out.append(f"{where}: a provider may not import another provider")
        if in_function and not _needs_optional(target):
            out.append(f"{where} inside a function: import it at the top of the module")
    return out


def _needs_optional(module: str) -> bool:
    top = imports(MODULES[module].read_text())
    return any(name.split(".")[0] in OPTIONAL for name, inside, _ in top if not inside)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    assert violations(module, MODULES[module].read_text()) == []


def test_no_import_cycle_among_our_modules():
    edges = {
        m: {t for n, inside, _ in imports(p.read_text()) if not inside and (t := ours(n)) != m}
        for m, p in MODULES.items()
    }
    edges = {m: {t for t in targets if t is not None} for m, targets in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " → ".join([*path[path.index(t) :], t]))
            if t not in state:
                walk(t, [*path, t])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            walk(m, [m])


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("xy_inductor.kernels.aten", "from xy_inductor.runtime import ops", "upward"),
        ("xy_inductor.runtime.ops", "from xy_inductor.lowering import pipeline", "upward"),
        ("xy_inductor.lowering.patterns", "from xy_inductor.config import XyConfig", "upward"),
        ("xy_inductor.kernels.ascend", "import xy_inductor.kernels.aten.menus", "another"),
        ("xy_inductor.kernels.calls", "from xy_inductor.kernels.aten import menus", "contract"),
        ("xy_inductor.runtime.ops", "def f():\n    from xy_inductor.runtime import stats", "top"),
        ("xy_inductor.kernels.aten", "if TYPE_CHECKING:\n    import xy_inductor.backend", "up"),
    ],
)
def test_a_planted_import_against_the_rules_fails(module, source, broken):
    # The check must catch what it polices, or every test above passes vacuously.
    found = violations(module, MODULES[module].read_text() + "\n" + source + "\n")
    assert len(found) == 1 and broken in found[0], found


def test_importing_a_lower_layer_leaves_the_front_end_alone():
    code = (
        "import sys, xy_inductor.kernels.aten, xy_inductor.lowering; "
        "print(' '.join(m for m in sys.modules if m.startswith('xy_inductor')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "xy_inductor.kernels.aten.native" in loaded  # the scan sees what was imported
    front_end = [m for m in loaded if layer(m) == "front end" and m != "xy_inductor"]
    assert front_end == []


def test_every_native_source_is_installed_with_its_package():
    """The C++ sources are compiled on the user's machine from the installed package: a source
    or header missing from ``package-data`` builds here (a source checkout) and fails there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data = config["tool"]["setuptools"]["package-data"]
    for folder, package in (("kernels/aten", "xy_inductor.kernels.aten"),
                            ("kernels/cpu", "xy_inductor.kernels.cpu")):  # fmt: skip
        sources = {p.name for p in (ROOT / folder).iterdir() if p.suffix in (".cpp", ".h")}
        assert sources and sources <= set(data[package]), (package, sources - set(data[package]))
