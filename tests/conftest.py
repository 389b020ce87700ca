"""Shared test fixtures: the `gpu` marker skips without CUDA; `shared_traces` finds ../shared/traces."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "traces"


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:  # planner tests run without torch
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_traces() -> Path:
    """../shared/traces beside the checkout; tests using it skip cleanly in a user's clone."""
    if not SHARED_TRACES.is_dir():
        pytest.skip("../shared/traces is absent (only CI and developers have it)")
    return SHARED_TRACES
