"""tests/kernels: Triton kernels against their pure-torch references (see _kernel_testutil)."""
from __future__ import annotations

import pytest

from _kernel_testutil import DEVICE, INTERPRET  # sets TRITON_INTERPRET=1 without CUDA


@pytest.fixture
def device() -> str:
    if DEVICE == "cpu" and not INTERPRET:
        pytest.skip("no CUDA and TRITON_INTERPRET is off: Triton kernels cannot run")
    return DEVICE
