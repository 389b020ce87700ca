"""Triton import guard shared by the kernel files, and the device policy of the launchers.

Kernel files do ``from ._triton_compat import triton, tl`` so that they import (and their
pure-torch ``*_ref`` functions work) without triton installed: the stand-ins below only
let the ``@triton.jit`` / ``@triton.autotune`` decorators and ``tl.constexpr`` annotations
evaluate; calling a kernel without triton raises :class:`TritonUnavailableError`.

Triton decides at *decoration* time (when a kernel file is first imported) whether a
kernel is compiled or interpreted: ``TRITON_INTERPRET=1`` must be set before the first
use of a kernel launcher. ``moekit.kernels`` imports the kernel files lazily, on first
attribute access, so setting it any time before the first call is enough.
"""
from __future__ import annotations

import os

import torch


class TritonUnavailableError(RuntimeError):
    """Raised when a Triton launcher cannot run on the given tensors (see check_runnable)."""


try:  # pragma: no cover - which branch runs depends on the environment
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

    class _Unavailable:
        def __init__(self, fn=None):
            self.fn = fn

        def __getitem__(self, grid):
            raise TritonUnavailableError(
                "triton is not installed: install it (`pip install 'moekit[triton]'`) or use the "
                "pure-torch reference (moe_mlp_ref / backend='loop')")

        def __call__(self, *a, **k):
            self.__getitem__(None)

    class _TritonStandIn:
        @staticmethod
        def jit(fn=None, **_kw):
            if fn is None:
                return lambda f: _Unavailable(f)
            return _Unavailable(fn)

        @staticmethod
        def autotune(*_a, **_k):
            return lambda f: f

        @staticmethod
        def Config(*a, **k):  # noqa: N802 - mirrors triton.Config
            return None

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

        @staticmethod
        def next_power_of_2(n):
            return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()

    class _TLStandIn:
        constexpr = object()

        def __getattr__(self, name):
            return None

    triton = _TritonStandIn()
    tl = _TLStandIn()

# Whether the kernels of this process are interpreted: fixed when the kernel files were
# imported (that is when triton reads TRITON_INTERPRET).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_runnable(*tensors: torch.Tensor, op: str) -> None:
    """The device policy of every launcher.

    CUDA tensors run the compiled kernels. CPU tensors run the same kernels in Triton's
    interpreter when ``TRITON_INTERPRET=1`` was set before the kernels were first used;
    otherwise this raises (no silent fallback: the pure-torch reference is a separate,
    explicit function).
    """
    if not HAS_TRITON:
        raise TritonUnavailableError(
            f"{op}: triton is not installed; install triton>=3.8 or call {op}_ref "
            "(the pure-torch reference; for the MoE layer: MoEConfig(backend='loop'))")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type == "cuda":
        return
    if dev.type == "cpu":
        if INTERPRET:
            return
        raise TritonUnavailableError(
            f"{op}: got CPU tensors, but Triton kernels run on CPU only in the interpreter. "
            f"Set TRITON_INTERPRET=1 in the environment before the first call (slow; for tests), "
            f"move the tensors to CUDA, or call {op}_ref (pure torch; for the MoE layer use "
            "MoEConfig(backend='loop') or 'grouped_mm').")
    raise TritonUnavailableError(f"{op}: unsupported device {dev}; Triton kernels need CUDA "
                                 f"(or CPU with TRITON_INTERPRET=1); call {op}_ref instead")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs use exact IEEE products unless torch allows TF32."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def interpreter_bf16_fix(dtype: torch.dtype) -> bool:
    """Work around two bf16 bugs of Triton 3.9's interpreter (never active when compiled):
    it multiplies bf16 ``tl.dot`` operands as raw uint16 bits (the kernels cast bf16 tiles to
    fp32 first: exact, bf16 products fit fp32) and it truncates fp32 -> bf16 casts (the
    kernels round to nearest even by hand)."""
    return INTERPRET and dtype == torch.bfloat16
