"""Token dispatchers: the seam between routing and the experts (Megatron-Core's MoETokenDispatcher).

Legend: T tokens, D model dim, E experts, K top-k, N kept (token, slot) assignments (N <= T*K).

A dispatcher has two calls around the experts' compute::

    dispatch(x_TD, routing) -> (x_ND, tokens_per_expert_E, ctx)   # rows sorted by expert
    combine(y_ND, ctx)      -> y_TD                               # routing weights applied

:class:`LocalDispatcher` keeps every row on this process. An expert-parallel dispatcher
(all-to-all between ranks) implements the same two calls, so the layer, the experts and
their backends do not change.

Both directions are exact data movement. The gather's backward places each row's gradient
back in (token, slot) order and sums over K in a fixed order (no scatter-add, no atomics),
and the combine is a fixed-order weighted sum over K, so results are deterministic on every
device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.router import Routing


@dataclass
class DispatchContext:
    """What :meth:`LocalDispatcher.combine` needs from its :meth:`~LocalDispatcher.dispatch`.

    order_N: int64 [N] flat (token, slot) position ``t*K + k`` of each sorted row.
    topk_weights_TK: [T, K] combine weights (0 where dropped).
    num_dropped: assignments dropped by capacity (their slots stay zero).
    """

    order_N: torch.Tensor
    topk_weights_TK: torch.Tensor
    num_dropped: int

    @property
    def num_tokens(self) -> int:
        return self.topk_weights_TK.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_weights_TK.shape[1]


class LocalDispatcher:
    """Sorts the kept (token, slot) assignments by expert (stable: token order within an
    expert) and gathers their rows; ``combine`` puts the expert outputs back and weights them."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchContext]:
        """x_TD [T, D] -> (x_ND [N, D] sorted by expert, tokens_per_expert_E int64 [E], ctx)."""
        T, K = routing.topk_ids_TK.shape
        order_N = torch.sort(routing.topk_ids_TK.reshape(-1), stable=True).indices
        if routing.num_dropped:
            order_N = order_N[routing.num_dropped:]  # dropped slots (-1) sort first
        x_ND = gather_rows(x_TD, order_N, K)
        return x_ND, routing.tokens_per_expert_E, DispatchContext(order_N, routing.topk_weights_TK,
                                                                  routing.num_dropped)

    def combine(self, y_ND: torch.Tensor, ctx: DispatchContext) -> torch.Tensor:
        """y_ND [N, D] (unweighted expert outputs) -> y_TD [T, D] = sum_k w[t, k] * y[slot (t, k)]."""
        return weighted_combine(y_ND, ctx.order_N, ctx.topk_weights_TK, ctx.num_dropped)


def weighted_combine(y_ND: torch.Tensor, order_N: torch.Tensor, topk_weights_TK: torch.Tensor,
                     num_dropped: int) -> torch.Tensor:
    """Rows ``y_ND`` of (token, slot) positions ``order_N`` -> ``y_TD = sum_k w[t, k] * y[(t, k)]``
    (a fixed-order weighted sum; dropped slots count as zero rows). Shared by every dispatcher."""
    T, K = topk_weights_TK.shape
    D = y_ND.shape[-1]
    if num_dropped:  # dropped slots stay zero rows
        slots_TKD = y_ND.new_zeros(T * K, D).index_copy_(0, order_N, y_ND).view(T, K, D)
    else:  # a gather by the inverse permutation (measured faster than the scatter on CPU)
        inv_N = torch.empty_like(order_N)
        inv_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
        slots_TKD = permute_rows(y_ND, inv_N).view(T, K, D)
    w_T1K = topk_weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, slots_TKD).squeeze(1)


def gather_rows(x_TD: torch.Tensor, order_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """``x_TD[order_N // K]`` with an exact, deterministic backward (see :class:`_GatherRows`)."""
    return _GatherRows.apply(x_TD, order_N, top_k)


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[perm]`` for a permutation ``perm`` of the rows; its backward scatters back (exact)."""
    return _Permute.apply(x, perm)


def unpermute_rows(y: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`permute_rows`: ``out[perm] = y``."""
    return _Unpermute.apply(y, perm)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm):
        ctx.save_for_backward(perm)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        (perm,) = ctx.saved_tensors
        return _Unpermute.apply(g, perm), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, perm):
        ctx.save_for_backward(perm)
        return y.new_empty(y.shape).index_copy_(0, perm, y)

    @staticmethod
    def backward(ctx, g):
        (perm,) = ctx.saved_tensors
        return _Permute.apply(g, perm), None


class _GatherRows(torch.autograd.Function):
    """``x_ND = x_TD[order_N // K]`` whose backward sums each token's K slot gradients in slot
    order (exact and deterministic, unlike a scatter-add). The backward is itself made of
    differentiable ops, so higher-order gradients are exact too."""

    @staticmethod
    def forward(ctx, x_TD, order_N, K: int):
        ctx.save_for_backward(order_N)
        ctx.T, ctx.K = x_TD.shape[0], K
        return x_TD.index_select(0, torch.div(order_N, K, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_ND):
        (order_N,) = ctx.saved_tensors
        T, K = ctx.T, ctx.K
        slots = grad_ND.new_zeros(T * K, grad_ND.shape[-1]) if order_N.numel() < T * K else \
            grad_ND.new_empty(T * K, grad_ND.shape[-1])
        grad_TD = slots.index_copy_(0, order_N, grad_ND).view(T, K, grad_ND.shape[-1]).sum(1)
        return grad_TD, None, None
