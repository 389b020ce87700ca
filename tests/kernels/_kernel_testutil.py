"""Shared by tests/kernels: interpreter switch, device choice, a scale-aware comparison.

Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set when this
module is imported (by conftest.py, at collection time, before any kernel module is
imported: triton reads the variable when a kernel is decorated). With CUDA and
TRITON_INTERPRET unset, the same tests run the compiled kernels on the GPU.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# interpreter: kernels take CPU tensors; compiled: they need CUDA
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|) (a scale-aware allclose)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:.1e} * {scale:.3g}"
