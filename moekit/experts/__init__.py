"""Routed experts: stacked weights and interchangeable compute backends behind one signature.

Legend: N rows sorted by expert, D model dim, F expert hidden dim, H = 2F (GLU) or F, E experts.

The experts' side of the dispatch seam (``moekit.dispatch`` hands them rows already sorted
by expert)::

    compute(x_ND, tokens_per_expert_E, w_in_EHD, w_out_EDF, activation) -> y_ND

with rows ``[sum(counts[:e]), sum(counts[:e+1]))`` going to expert ``e`` and ``y_ND`` unweighted
(the dispatcher's combine applies the routing weights). One module per backend:

=============  ==========================================================================
``loop``       one matmul pair per expert under plain autograd: the reference
``cpu``        per-expert GEMMs on single-threaded workers / parallel GEMMs (CPU only)
``grouped_mm`` ``torch.nn.functional.grouped_mm`` over the ragged segments, no host sync
``triton``     fused Triton kernels (compiled on CUDA, interpreter on CPU)
=============  ==========================================================================

``auto`` picks ``triton`` on CUDA when triton is installed (else ``grouped_mm``), ``cpu`` on
CPU. A backend asked for by name that cannot run the input raises; nothing falls back silently.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import BACKEND_CHOICES, BACKENDS as BACKEND_NAMES, MoEConfig
from moekit.experts import grouped_mm as _grouped_mm
from moekit.experts import triton as _triton
from moekit.experts.cpu import cpu_compute
from moekit.experts.grouped_mm import grouped_mm_compute
from moekit.experts.loop import loop_compute
from moekit.experts.triton import triton_compute
from moekit.kernels.activations import activation_ref, check_activation

Compute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str], torch.Tensor]

# name (moekit.config.BACKENDS, the one list of names) -> compute function
BACKENDS: dict[str, Compute] = {
    "loop": loop_compute,
    "cpu": cpu_compute,
    "grouped_mm": grouped_mm_compute,
    "triton": triton_compute,
}
assert tuple(BACKENDS) == BACKEND_NAMES, "register every backend under its name in moekit.config.BACKENDS"

__all__ = ["BACKENDS", "BACKEND_CHOICES", "GroupedExperts", "DenseMLP", "resolve_backend"]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype = torch.float32,
                    widths: tuple[int, ...] = ()) -> str:
    """The backend ``name`` stands for on ``device``/``dtype`` (``auto``: the fastest measured
    that can run it; ``widths`` are the GEMM widths D, H, F, for grouped_mm's alignment)."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r} is not one of {BACKEND_CHOICES}")
        return name
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda" and _triton.importable():
        return "triton"
    if _grouped_mm.available() and _grouped_mm.supports(dtype, *widths):
        return "grouped_mm"
    return "loop"


class GroupedExperts(nn.Module):
    """E experts as stacked weights; ``forward(x_ND, tokens_per_expert_E) -> y_ND``.

    Parameters:
        w_in:  [E, H, D], H = 2F for GLU activations (rows [0, F) gate, [F, 2F) up), else F.
        w_out: [E, D, F].
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        E, D, Fh = config.num_experts, config.hidden_size, config.ffn_hidden_size
        H = 2 * Fh if config.is_glu else Fh
        self.w_in = nn.Parameter(torch.empty(E, H, D))
        self.w_out = nn.Parameter(torch.empty(E, D, Fh))
        nn.init.normal_(self.w_in, std=config.init_std)
        nn.init.normal_(self.w_out, std=config.init_std)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_in.dtype

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert's weights (what an offload cache or EP transfer moves)."""
        return (self.w_in[0].numel() + self.w_out[0].numel()) * self.w_in.element_size()

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
        """x_ND [N, D] sorted by expert, tokens_per_expert_E int [E] -> y_ND [N, D] (unweighted)."""
        name = resolve_backend(backend or self.config.backend, x_ND.device, x_ND.dtype,
                               (x_ND.shape[-1], *self.w_in.shape[1:2], self.w_out.shape[-1]))
        return BACKENDS[name](x_ND, tokens_per_expert_E, self.w_in, self.w_out, self.config.activation)

    def extra_repr(self) -> str:
        E, H, D = self.w_in.shape
        return f"E={E}, H={H}, D={D}, activation={self.config.activation}, backend={self.config.backend}"


class DenseMLP(nn.Module):
    """One dense expert (the shared expert): ``w_in [H, D]``, ``w_out [D, S]``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, init_std: float):
        super().__init__()
        H = 2 * ffn_hidden_size if check_activation(activation).glu else ffn_hidden_size
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(H, hidden_size))
        self.w_out = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """x_TD [T, D] -> [T, D]."""
        return F.linear(activation_ref(F.linear(x_TD, self.w_in), self.activation), self.w_out)
