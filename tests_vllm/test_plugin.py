"""The plugin itself, without an engine: entry point, registration, CPU backend selection."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.attention.selector import AttentionSelectorConfig

from xy_inductor.vllm import BACKEND_CLASS, plugin

CPU_ATTN = AttentionBackendEnum.CPU_ATTN.get_path()
CUSTOM = AttentionBackendEnum.CUSTOM
CONFIG = AttentionSelectorConfig(
    head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=None
)


@pytest.fixture
def registered():
    """The plugin registered, as vLLM does at start; the registry restored afterwards."""
    from vllm.v1.attention.backends.registry import _ATTN_OVERRIDES

    before = dict(_ATTN_OVERRIDES)
    plugin.register()
    yield
    _ATTN_OVERRIDES.clear()
    _ATTN_OVERRIDES.update(before)


def test_vllm_finds_the_plugin_by_its_entry_point():
    found = entry_points(group="vllm.general_plugins")
    assert found["xyserve"].value == "xy_inductor.vllm.plugin:register"
    assert found["xyserve"].load() is plugin.register


def test_importing_the_package_imports_no_vllm():
    code = "import sys, xy_inductor.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cpu_platform_honours_custom_only_when_it_is_xyserve(registered):
    assert plugin.selected()
    assert CpuPlatform.get_attn_backend_cls(CUSTOM, CONFIG) == BACKEND_CLASS
    # Not selected: vLLM's own choice, unchanged.
    assert CpuPlatform.get_attn_backend_cls(None, CONFIG) == CPU_ATTN
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, CONFIG) == CPU_ATTN
    # CUSTOM registered to another backend: vLLM's CPU platform decides, as without xyserve.
    register_backend(CUSTOM, "somebody.else.Backend")
    assert not plugin.selected()
    assert CpuPlatform.get_attn_backend_cls(CUSTOM, CONFIG) == CPU_ATTN


def test_another_plugins_custom_backend_is_left_alone(registered):
    register_backend(CUSTOM, "somebody.else.Backend")
    plugin.register()  # a second load, after another plugin took CUSTOM
    assert CUSTOM.get_path() == "somebody.else.Backend"


def test_registering_twice_wraps_the_platform_once(registered):
    wrapper = CpuPlatform.__dict__["get_attn_backend_cls"]
    plugin.register()
    assert CpuPlatform.__dict__["get_attn_backend_cls"] is wrapper


@pytest.mark.parametrize(
    ("setting", "feature"),
    [
        ({"use_mla": True}, "MLA"),
        ({"use_sparse": True}, "sparse attention"),
        ({"use_non_causal": True}, "non-causal decoder attention"),
    ],
)
def test_settings_it_cannot_serve_are_refused_when_selected(registered, setting, feature):
    config = CONFIG._replace(**setting)
    with pytest.raises(
        ValueError, match=f"xyserve attention backend \\(CUSTOM\\) cannot serve {feature}"
    ):
        CpuPlatform.get_attn_backend_cls(CUSTOM, config)
    # Not selected, vLLM's own handling of the setting is untouched.
    assert CpuPlatform.get_attn_backend_cls(None, CONFIG) == CPU_ATTN
