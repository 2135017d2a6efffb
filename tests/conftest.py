"""Fixtures for every test: a clean Dynamo and clean xyserve counters."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads this when a kernel is defined: without CUDA its kernels run on CPU tensors in the
# interpreter. It does not put the Triton provider in the default list (that needs CUDA).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xy_inductor
from xy_inductor.runtime import providers

# The default provider list is read once per process, at its first use. Read it now, before a
# test installs the stand-in torch_npu (test_ascend.py), which would otherwise put the Ascend
# provider in every later test's default list, and keep the C++ CPU kernels from loading.
providers.active_providers()


@pytest.fixture(autouse=True)
def _fresh_state():
    # Dynamo's cache and recompile limit are per function code, shared by every model of a
    # class: without a reset, one test's graphs would count against the next test.
    torch._dynamo.reset()
    xy_inductor.reset_stats()
    yield
    torch._dynamo.reset()
