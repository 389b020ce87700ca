"""``loop``: the readable reference backend, one matmul pair per expert segment.

Legend: N rows sorted by expert, D model dim, H = 2F (GLU) or F, F expert hidden dim, E experts.
"""
from __future__ import annotations

import torch

from moekit.kernels.activations import activation_ref


def loop_compute(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_in_EHD: torch.Tensor,
                 w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    """``y_ND[rows of e] = act(x_ND[rows of e] @ w_in[e]^T) @ w_out[e]^T`` under plain autograd
    (so it also has correct higher-order gradients)."""
    outs = []
    start = 0
    for e, n in enumerate(tokens_per_expert_E.tolist()):
        if n == 0:
            continue
        h_nH = x_ND[start:start + n] @ w_in_EHD[e].t()
        outs.append(activation_ref(h_nH, activation) @ w_out_EDF[e].t())
        start += n
    if not outs:  # no rows: an empty product that still belongs to the graph
        return activation_ref(x_ND @ w_in_EHD[0].t(), activation) @ w_out_EDF[0].t()
    return torch.cat(outs)
