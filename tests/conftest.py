"""Fixtures for every test: a clean Dynamo and clean xyserve counters."""

from __future__ import annotations

import pytest
import torch

import xy_inductor


@pytest.fixture(autouse=True)
def _fresh_state():
    # Dynamo's cache and recompile limit are per function code, shared by every model of a
    # class: without a reset, one test's graphs would count against the next test.
    torch._dynamo.reset()
    xy_inductor.reset_stats()
    yield
    torch._dynamo.reset()
