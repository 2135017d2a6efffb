"""What a lowering pass is given and keyed by: ``LoweringOptions`` (never the front end's
config), the options it reads, and the ``uuid()`` a compile cache keys its graphs on."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

from xy_inductor.config import XyConfig
from xy_inductor.lowering import (
    PASSES,
    LinearToGemm,
    LoweringOptions,
    SdpaToAttention,
    lower_graph,
    pipeline_uuid,
)


def test_pass_uuid_is_stable_and_distinct():
    assert SdpaToAttention().uuid() == SdpaToAttention().uuid()
    assert LinearToGemm().uuid() != SdpaToAttention().uuid()
    assert len(SdpaToAttention().uuid()) == 64


def test_pass_uuid_changes_with_code_and_options(tmp_path, monkeypatch):
    source = (
        "import torch\n"
        "from xy_inductor.lowering.linear_to_gemm import LinearToGemm\n"
        "class Custom(LinearToGemm):\n"
        "    name = 'custom'\n"
        "    def why_not(self, node):\n"
        "        return None  # {comment}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def load(comment: str):
        import importlib
        import sys

        (tmp_path / "custom_pass.py").write_text(source.format(comment=comment))
        sys.modules.pop("custom_pass", None)
        importlib.invalidate_caches()
        return importlib.import_module("custom_pass").Custom

    first = load("v1")().uuid()
    assert load("v1")().uuid() == first  # same code, same uuid
    assert load("v2")().uuid() != first  # one comment changed

    class WithOptions(LinearToGemm):
        def __init__(self, limit: int) -> None:
            super().__init__()
            self.limit = limit

        def options(self) -> dict[str, object]:
            return {"limit": self.limit}

    assert WithOptions(1).uuid() == WithOptions(1).uuid() != WithOptions(2).uuid()


def test_pipeline_uuid_follows_the_enabled_passes():
    base = pipeline_uuid(LoweringOptions())
    assert pipeline_uuid(LoweringOptions()) == base
    assert pipeline_uuid(LoweringOptions(lower_linear=False)) != base
    assert pipeline_uuid(LoweringOptions(fuse_siblings=True)) != base
    assert pipeline_uuid(LoweringOptions(inductor=True)) != base


@pytest.mark.parametrize("pass_cls", [cls for _, cls in PASSES], ids=lambda c: c.__name__)
def test_pass_uuid_covers_every_option_it_reads(pass_cls):
    source = inspect.getsource(inspect.getmodule(pass_cls))
    assert set(re.findall(r"self\.settings\.(\w+)", source)) <= set(pass_cls.reads)
    for name in pass_cls.reads:
        value = getattr(LoweringOptions(), name)
        other = (not value) if isinstance(value, bool) else value // 2
        changed = dataclasses.replace(LoweringOptions(), **{name: other})
        assert pass_cls(changed).uuid() != pass_cls().uuid(), name


def test_lowering_takes_its_own_options_not_the_front_ends_config():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"takes LoweringOptions .*got XyConfig"):
        lower_graph(gm, XyConfig())
    with pytest.raises(TypeError, match=r"takes LoweringOptions .*got XyConfig"):
        LinearToGemm(XyConfig())
