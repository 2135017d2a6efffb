"""docs/extending.md's toy provider, done as a newcomer would from the page alone: the files the
example names (the provider module, the line in the provider list, its test), written from the
page's own code blocks, and the test run. If the page and the code drift apart, this fails."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from xy_inductor.runtime import providers

PAGE = Path(__file__).resolve().parent.parent / "docs" / "extending.md"


def _example_files() -> dict[str, str]:
    """File path -> code, for each code block of the toy-provider example introduced by its
    path (`` `kernels/counting.py`: ``)."""
    text = PAGE.read_text()
    example = text[text.index("### Example: a toy provider") :]
    example = example[: example.find("\n## ")] if "\n## " in example else example
    blocks = re.findall(r"^`([^`]+)`(?:, [^\n]*)?:\n\n```python\n(.*?)```", example, re.M | re.S)
    return dict(blocks)


def test_the_example_touches_three_files():
    files = _example_files()
    assert sorted(files) == [
        "kernels/counting.py",
        "runtime/providers.py",
        "tests/test_counting_provider.py",
    ]


def test_the_toy_provider_works_as_the_page_says(tmp_path, monkeypatch):
    files = _example_files()
    # 1. the module, installed where the page puts it (as xy_inductor.kernels.counting)
    path = tmp_path / "counting.py"
    path.write_text(files["kernels/counting.py"])
    spec = importlib.util.spec_from_file_location("xy_inductor.kernels.counting", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "xy_inductor.kernels.counting", module)
    spec.loader.exec_module(module)
    monkeypatch.setattr("xy_inductor.kernels.counting", module, raising=False)
    # 2. the provider list, as the page's block has it
    listed = re.search(r"PROVIDER_MODULES[^=]*=\s*\((.*?)\)", files["runtime/providers.py"], re.S)
    names = tuple(re.findall(r'"([\w.]+)"', listed.group(1)))
    assert set(names) - {"xy_inductor.kernels.counting"} == set(providers.PROVIDER_MODULES)
    monkeypatch.setattr(providers, "PROVIDER_MODULES", names)
    providers.default.cache_clear()
    try:
        assert providers.default()[0].name == "counting"
        # 3. the page's test, run as written
        namespace: dict[str, object] = {}
        exec(compile(files["tests/test_counting_provider.py"], "test_counting", "exec"), namespace)
        tests = [f for name, f in namespace.items() if name.startswith("test_")]
        assert tests
        for test in tests:
            test()
    finally:
        providers.default.cache_clear()


@pytest.mark.parametrize("name", ["aten", "triton", "ascend"])
def test_every_provider_module_is_in_the_list(name):
    assert f"xy_inductor.kernels.{name}" in providers.PROVIDER_MODULES
