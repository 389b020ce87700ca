"""Routed experts: stacked weights and interchangeable compute backends.

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (GLU) or F, E experts,
K top-k, N kept (token, slot) assignments (N <= T*K).

Every backend has one signature, the one ``moekit.kernels.moe_mlp`` has::

    backend(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation) -> y_TD

with ``y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])`` and ids of -1 skipped. The torch
backends share the dispatch (sort assignments by expert, gather rows) and the combine
(place rows back in (token, slot) order, weighted sum over K: deterministic, no atomics).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import GLU_ACTIVATIONS, MoEConfig

Backend = Callable[..., torch.Tensor]


def activate(h_NH: torch.Tensor, activation: str) -> torch.Tensor:
    """Expert activation: GLU forms split ``[gate; up]`` (gate first, HF v5 layout)."""
    if activation in GLU_ACTIVATIONS:
        gate_NF, up_NF = h_NH.chunk(2, dim=-1)
        act = F.silu(gate_NF) if activation == "swiglu" else F.gelu(gate_NF)
        return act * up_NF
    if activation == "gelu":
        return F.gelu(h_NH)
    if activation == "relu":
        return F.relu(h_NH)
    return F.silu(h_NH)


class Dispatch:
    """Assignments sorted by expert (stable, so token order is kept within an expert).

    order_N: positions in the flattened [T*K] assignment list, grouped by expert.
    token_N: token index of each sorted assignment (order_N // K).
    tokens_per_expert_E: int64 [E] segment lengths.
    """

    def __init__(self, topk_ids_TK: torch.Tensor, num_experts: int):
        T, K = topk_ids_TK.shape
        flat = topk_ids_TK.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        num_dropped = int((flat < 0).sum()) if flat.numel() else 0
        self.order_N = order[num_dropped:]  # -1 (dropped) sorts first
        self.token_N = torch.div(self.order_N, K, rounding_mode="floor")
        self.tokens_per_expert_E = torch.bincount(flat[self.order_N], minlength=num_experts)
        self.num_tokens, self.top_k = T, K

    def gather(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [N, D] rows in expert order."""
        return x_TD.index_select(0, self.token_N)

    def combine(self, y_ND: torch.Tensor, topk_weights_TK: torch.Tensor) -> torch.Tensor:
        """[N, D] expert outputs -> [T, D]: place in (token, slot) order, weight, sum over K."""
        T, K, D = self.num_tokens, self.top_k, y_ND.shape[-1]
        if self.order_N.numel() == T * K:
            slots_TKD = y_ND.new_empty(T * K, D).index_copy(0, self.order_N, y_ND)
        else:
            slots_TKD = y_ND.new_zeros(T * K, D).index_copy(0, self.order_N, y_ND)
        w_T1K = topk_weights_TK.to(y_ND.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, slots_TKD.view(T, K, D)).squeeze(1)


def loop_backend(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation):
    """Readable reference: one matmul pair per expert over its contiguous segment."""
    d = Dispatch(topk_ids_TK, w_in_EHD.shape[0])
    x_ND = d.gather(x_TD)
    outs = []
    start = 0
    for e, n in enumerate(d.tokens_per_expert_E.tolist()):
        if n == 0:
            continue
        h = activate(x_ND[start:start + n] @ w_in_EHD[e].t(), activation)
        outs.append(h @ w_out_EDF[e].t())
        start += n
    y_ND = torch.cat(outs) if outs else x_ND.new_zeros(0, w_out_EDF.shape[1])
    return d.combine(y_ND, topk_weights_TK)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


def grouped_mm_backend(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation):
    """``torch.nn.functional.grouped_mm`` over ragged expert segments (torch >= 2.9);
    falls back to :func:`loop_backend` where the installed torch lacks it or for dtypes
    grouped_mm does not take (float64, used by exact tests)."""
    if not _grouped_mm_available() or x_TD.dtype not in _GROUPED_MM_DTYPES:
        return loop_backend(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation)
    d = Dispatch(topk_ids_TK, w_in_EHD.shape[0])
    x_ND = d.gather(x_TD)
    offs_E = torch.cumsum(d.tokens_per_expert_E, 0).to(torch.int32)
    h_NH = _GroupedMM.apply(x_ND, w_in_EHD, offs_E)
    a_NF = activate(h_NH, activation).contiguous()
    y_ND = _GroupedMM.apply(a_NF, w_out_EDF, offs_E)
    return d.combine(y_ND, topk_weights_TK)


class _GroupedMM(torch.autograd.Function):
    """y_NO = x_NI @ w_EOI[e]^T per segment, with a backward that keeps every operand
    contiguous (torch's own grouped_mm backward is slow on CPU with strided views)."""

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


def triton_backend(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation):
    """Fused Triton kernels (gather, grouped GEMMs, GLU, weighted combine)."""
    from moekit.kernels import moe_mlp  # lazy: triton is optional

    return moe_mlp(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation)


BACKENDS: dict[str, Backend] = {
    "loop": loop_backend,
    "grouped_mm": grouped_mm_backend,
    "triton": triton_backend,
}


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """``auto``: the fused Triton kernels on CUDA when triton is installed, else
    grouped_mm (the fastest CPU path measured in benchmarks/bench_layer.py)."""
    if name != "auto":
        return name
    if device.type == "cuda" and _triton_importable():
        return "triton"
    return "grouped_mm" if _grouped_mm_available() else "loop"


class GroupedExperts(nn.Module):
    """E experts as stacked weights.

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

    def forward(self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                backend: str | None = None) -> torch.Tensor:
        """x_TD [T, D], ids/weights [T, K] -> [T, D] (ids of -1 contribute nothing)."""
        name = resolve_backend(backend or self.config.backend, x_TD.device)
        return BACKENDS[name](x_TD, topk_ids_TK, topk_weights_TK, self.w_in, self.w_out,
                              self.config.activation)


class DenseMLP(nn.Module):
    """One dense expert (the shared expert): ``w_in [H, D]``, ``w_out [D, S]``."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, init_std: float):
        super().__init__()
        H = 2 * ffn_hidden_size if activation in GLU_ACTIVATIONS else ffn_hidden_size
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(H, hidden_size))
        self.w_out = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size))
        nn.init.normal_(self.w_in, std=init_std)
        nn.init.normal_(self.w_out, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return F.linear(activate(F.linear(x_TD, self.w_in), self.activation), self.w_out)
