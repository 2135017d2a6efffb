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


@pytest.fixture(autouse=True)
def _fresh_state():
    # Dynamo's cache and recompile limit are per function code, shared by every model of a
    # class: without a reset, one test's graphs would count against the next test.
    torch._dynamo.reset()
    xy_inductor.reset_stats()
    yield
    torch._dynamo.reset()
