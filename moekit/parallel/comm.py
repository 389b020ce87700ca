"""Collectives with autograd and failure handling, for the expert-parallel dispatcher.

Legend: M rows received, N rows sent, D model dim, W world size.

Every collective here runs ``async_op=True`` and waits with the dispatcher's timeout, so a
peer that died or stopped taking part fails this rank with a message naming the layer and
the timeout, instead of a hang or a bare backend error.
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class ExpertParallelError(RuntimeError):
    """A collective of the expert-parallel layer failed (a peer rank died, raised or timed out)."""


def wait(work, timeout: timedelta, what: str) -> None:
    """Wait for ``work`` at most ``timeout``; any failure becomes an :class:`ExpertParallelError`."""
    try:
        ok = work.wait(timeout)
    except Exception as exc:  # gloo/NCCL report a dead peer or a timeout as RuntimeError
        raise ExpertParallelError(
            f"moekit expert parallel: {what} failed: a peer rank died, raised or did not reach it "
            f"within {timeout.total_seconds():g} s ({type(exc).__name__}: {exc})") from exc
    if ok is False:
        raise ExpertParallelError(f"moekit expert parallel: {what} did not complete within "
                                  f"{timeout.total_seconds():g} s: a peer rank died, raised or fell behind")


def all_to_all_counts(send_P: torch.Tensor, group, timeout: timedelta, what: str) -> torch.Tensor:
    """Equal-split all-to-all of per-slot counts: rank r's chunk ``q`` goes to rank ``q``."""
    recv_P = torch.empty_like(send_P)
    wait(dist.all_to_all_single(recv_P, send_P, group=group, async_op=True), timeout, what)
    return recv_P


class _AllToAllRows(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x_ND, out_splits: list[int], in_splits: list[int], group, timeout, what: str):
        ctx.splits, ctx.group, ctx.timeout, ctx.what = (out_splits, in_splits), group, timeout, what
        return _exchange(x_ND, out_splits, in_splits, group, timeout, what)

    @staticmethod
    def backward(ctx, grad_MD):
        out_splits, in_splits = ctx.splits
        grad = _AllToAllRows.apply(grad_MD.contiguous(), in_splits, out_splits, ctx.group, ctx.timeout,
                                   ctx.what + " (backward)")
        return grad, None, None, None, None, None


def _exchange(x_ND, out_splits, in_splits, group, timeout, what):
    out = x_ND.new_empty(sum(out_splits), *x_ND.shape[1:])
    wait(dist.all_to_all_single(out, x_ND.contiguous(), out_splits, in_splits, group=group, async_op=True),
         timeout, what)
    return out


def all_to_all_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                    timeout: timedelta, what: str) -> torch.Tensor:
    """Send ``in_splits[q]`` consecutive rows of ``x_ND`` to rank q, receive ``out_splits[q]``
    rows from rank q (in rank order). Differentiable (also twice: the backward is the same
    collective under autograd)."""
    return _AllToAllRows.apply(x_ND, list(out_splits), list(in_splits), group, timeout, what)


# torch 2.13 renamed the *_tensor collectives; either name, resolved once
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGatherRows(torch.autograd.Function):
    """Rows of every rank, in rank order; the backward reduce-scatters (sums) the gradients."""

    @staticmethod
    def forward(ctx, x_ND, group, timeout, what: str):
        ctx.group, ctx.timeout, ctx.what = group, timeout, what
        W = dist.get_world_size(group)
        out = x_ND.new_empty(W * x_ND.shape[0], *x_ND.shape[1:])
        wait(all_gather_single(out, x_ND.contiguous(), group=group, async_op=True), timeout, what)
        return out

    @staticmethod
    def backward(ctx, grad_WND):
        return _ReduceScatterRows.apply(grad_WND.contiguous(), ctx.group, ctx.timeout, ctx.what + " (backward)"), \
            None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_WND, group, timeout, what: str):
        ctx.group, ctx.timeout, ctx.what = group, timeout, what
        W = dist.get_world_size(group)
        out = x_WND.new_empty(x_WND.shape[0] // W, *x_WND.shape[1:])
        wait(reduce_scatter_single(out, x_WND.contiguous(), group=group, async_op=True), timeout, what)
        return out

    @staticmethod
    def backward(ctx, grad_ND):
        return _AllGatherRows.apply(grad_ND.contiguous(), ctx.group, ctx.timeout, ctx.what + " (backward)"), \
            None, None, None


def all_gather_rows(x_ND: torch.Tensor, group, timeout: timedelta, what: str) -> torch.Tensor:
    """``cat([x_ND of rank 0, rank 1, ...])`` over ``group`` ([W*N, ...]); differentiable: the
    gradient of each rank's rows is the sum over ranks (a reduce-scatter). Identity for W = 1."""
    if dist.get_world_size(group) == 1:
        return x_ND
    return _AllGatherRows.apply(x_ND, group, timeout, what)
