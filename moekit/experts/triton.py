"""``triton``: the fused Triton kernels on rows sorted by expert (``moekit.kernels.moe_mlp_sorted``).

Compiled on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (otherwise the launcher raises).
"""
from __future__ import annotations

import torch


def triton_compute(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_in_EHD: torch.Tensor,
                   w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    from moekit.kernels import moe_mlp_sorted  # lazy: triton is optional

    return moe_mlp_sorted(x_ND, tokens_per_expert_E, w_in_EHD, w_out_EDF, activation)


def importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
