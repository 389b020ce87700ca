"""``grouped_mm``: ``torch.nn.functional.grouped_mm`` over the ragged expert segments.

Legend: N rows sorted by expert, I/O a GEMM's input/output width, E experts.

No padding and no host sync (the segment offsets stay on the device). The GPU path when
Triton is absent, and available on CPU for comparison (the ``cpu`` backend is faster there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.kernels.activations import activation_ref

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def available() -> bool:
    return hasattr(F, "grouped_mm")


def supports(dtype: torch.dtype, *widths: int) -> bool:
    """grouped_mm takes these dtypes and needs every row stride a multiple of 16 bytes."""
    return dtype in DTYPES and all(w * dtype.itemsize % 16 == 0 for w in widths)


def grouped_mm_compute(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_in_EHD: torch.Tensor,
                       w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    if not available():
        raise RuntimeError(f"backend='grouped_mm' needs torch.nn.functional.grouped_mm (torch >= 2.9); "
                           f"this torch is {torch.__version__}: use backend='loop' or 'auto'")
    if x_ND.dtype not in DTYPES:
        raise TypeError(f"backend='grouped_mm' takes {', '.join(map(str, DTYPES))}, got {x_ND.dtype}; "
                        f"use backend='loop' (any dtype) or 'cpu' on CPU")
    D, H, F = x_ND.shape[1], w_in_EHD.shape[1], w_out_EDF.shape[2]
    if not supports(x_ND.dtype, D, H, F):
        raise ValueError(f"backend='grouped_mm' needs D, H and F to be multiples of {16 // x_ND.dtype.itemsize} "
                         f"elements for {x_ND.dtype} (16-byte row strides), got D={D}, H={H}, F={F}; "
                         f"use backend='loop' or 'auto'")
    offs_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    h_NH = _GroupedMM.apply(x_ND, w_in_EHD, offs_E)
    a_NF = activation_ref(h_NH, activation).contiguous()
    return _GroupedMM.apply(a_NF, w_out_EDF, offs_E)


class _GroupedMM(torch.autograd.Function):
    """``y_NO = x_NI @ w_EOI[e]^T`` per segment, with a backward that keeps every operand
    contiguous (torch's own grouped_mm backward is slow on CPU with strided views). The
    backward is made of differentiable grouped_mm calls, so double backward is exact."""

    @staticmethod
    def forward(ctx, x_NI, w_EOI, offs_E):
        ctx.save_for_backward(x_NI, w_EOI, offs_E)
        return F.grouped_mm(x_NI, w_EOI.transpose(-2, -1), offs=offs_E)

    @staticmethod
    def backward(ctx, grad_NO):
        x_NI, w_EOI, offs_E = ctx.saved_tensors
        grad_NO = grad_NO.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_NO, w_EOI, offs=offs_E)
        if ctx.needs_input_grad[1]:
            # 2D x 2D grouped form: [O, N] x [N, I] partitioned along N -> [E, O, I]
            grad_w = F.grouped_mm(grad_NO.t(), x_NI, offs=offs_E)
        return grad_x, grad_w, None
