"""``cpu``: grouped expert GEMMs on CPU, scheduled for few cores.

Legend: N rows sorted by expert, D model dim, F expert hidden dim, H = 2F (GLU) or F, E experts.

torch's CPU grouped_mm is a loop of one ``mm`` per expert, each an OpenMP fork/join over all
intra-op threads: 2E barriers per forward (4E more in backward) on skinny GEMMs, which costs
little on an idle machine but up to a scheduler time slice per barrier when other processes
share the cores. So the expert-sorted rows are cut into one contiguous, equal-sized range per
intra-op thread, and each worker thread runs its range expert by expert with single-threaded
BLAS: up GEMM -> activation -> down GEMM, with everything between the two GEMMs in cache.
Few large experts (Mixtral-like, ~512 rows x 1024 x 4096 per expert) are the exception: there
one barrier per GEMM is cheap next to the GEMM, and the experts run one after another on the
calling thread, each GEMM over all intra-op threads (:func:`plan_parts` picks; the choice is
measured in ``benchmarks/bench_layer.py``'s schedule section).

Memory comes from torch's allocator like any other op: nothing is kept between calls. On
glibc, large blocks are ``mmap``-ed fresh each step and paid for in page faults; that cost is
the allocator's, hits every variant alike, and is removed by allocator settings (README,
"CPU allocator"), not here.
"""
from __future__ import annotations

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from moekit.kernels.activations import ACTIVATIONS, base_activation, base_activation_grad_into

_WORKER_POOLS: dict[int, ThreadPoolExecutor] = {}
_WORKER_POOLS_LOCK = threading.Lock()


def _worker_pool(num_workers: int) -> ThreadPoolExecutor:
    """``num_workers`` threads whose torch ops run single-threaded (one pool per intra-op
    thread count; an execution resource like OpenMP's own threads, holding no tensors)."""
    with _WORKER_POOLS_LOCK:
        pool = _WORKER_POOLS.get(num_workers)
        if pool is None:
            callers_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(num_workers, thread_name_prefix="moekit-experts",
                                      initializer=torch.set_num_threads, initargs=(1,))
            started = threading.Barrier(num_workers)
            list(pool.map(lambda _: started.wait(), range(num_workers)))  # start (and init) them all now
            # set_num_threads(1) also changed the default that threads created later start with:
            # restore the caller's (the workers keep 1: it is thread-local in OpenMP and MKL)
            torch.set_num_threads(callers_threads)
            _WORKER_POOLS[num_workers] = pool
    return pool


if hasattr(os, "register_at_fork"):  # a forked child has the dict but not the threads
    os.register_at_fork(after_in_child=_WORKER_POOLS.clear)


def _run_on_workers(fn: Callable, parts: list) -> None:
    """``fn(part)`` for each part, one part per worker thread (inline for one part), without
    autograd (grad mode is thread-local, hence the ``no_grad`` inside the workers)."""
    def call(part):
        with torch.no_grad():
            fn(part)

    if len(parts) == 1:
        call(parts[0])
    else:
        list(_worker_pool(torch.get_num_threads()).map(call, parts))


Pieces = list[tuple[int, int, int]]  # (expert, first row, end row)


def split_rows(counts_E: list[int], num_parts: int) -> list[Pieces]:
    """Cut the N expert-sorted rows into ``num_parts`` contiguous ranges of equal size; each
    range is a list of ``(expert, start, end)`` pieces (an expert may span two ranges)."""
    N = sum(counts_E)
    bounds = [N * j // num_parts for j in range(num_parts + 1)]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces, start = [], 0
        for e, n in enumerate(counts_E):
            a, b = max(start, lo), min(start + n, hi)
            if a < b:
                pieces.append((e, a, b))
            start += n
        parts.append(pieces)
    return [p for p in parts if p] or [[]]


# Multiply-adds of one up-projection per busy expert from which the experts run one after
# another with intra-op parallel GEMMs instead of on single-threaded workers (between the
# OLMoE-like 256 x 1024 x 1024 = 0.27 G, where workers win, and the Mixtral-like
# 512 x 1024 x 4096 = 2.1 G, where parallel GEMMs win).
INLINE_MIN_MACS = 1 << 30


def plan_parts(counts_E: list[int], D: int, H: int) -> list[Pieces]:
    """The schedule: one part per worker thread, or a single part run on the calling thread."""
    busy = [n for n in counts_E if n]
    threads = torch.get_num_threads()
    if threads == 1 or (busy and sum(busy) / len(busy) * D * H >= INLINE_MIN_MACS):
        return split_rows(counts_E, 1)
    return split_rows(counts_E, threads)


def _activate(h_nH: torch.Tensor, activation: str) -> torch.Tensor:
    """activation_ref without autograd and with one temporary fewer (the product is formed in
    place in f(gate)'s fresh output; ``h_nH`` is not modified)."""
    spec = ACTIVATIONS[activation]
    if spec.glu:
        gate_nF, up_nF = h_nH.chunk(2, dim=-1)
        return base_activation(gate_nF, spec.base).mul_(up_nF)
    return base_activation(h_nH, spec.base)


def _activate_and_grad(h_nH: torch.Tensor, grad_nF: torch.Tensor, activation: str):
    """(act(h), d act(h)/dh applied to ``grad_nF``) for one segment, without autograd: the
    same elementwise products autograd forms for ``activation_ref``. Consumes ``grad_nF``."""
    spec = ACTIVATIONS[activation]
    g_nH = torch.empty_like(h_nH)
    if spec.glu:
        gate_nF, up_nF = h_nH.chunk(2, dim=-1)
        Fh = gate_nF.shape[-1]
        act_nF = base_activation(gate_nF, spec.base)
        torch.mul(grad_nF, act_nF, out=g_nH[:, Fh:])  # d up
        base_activation_grad_into(g_nH[:, :Fh], grad_nF.mul_(up_nF), gate_nF, spec.base)  # d gate
        return act_nF.mul_(up_nF), g_nH
    base_activation_grad_into(g_nH, grad_nF, h_nH, spec.base)
    return base_activation(h_nH, spec.base), g_nH


def cpu_compute(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_in_EHD: torch.Tensor,
                w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    if x_ND.device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, got {x_ND.device}; use backend='auto'")
    return _CPUExperts.apply(x_ND, w_in_EHD, w_out_EDF, tokens_per_expert_E.tolist(), activation)


class _CPUExperts(torch.autograd.Function):
    """``y_ND[rows of e] = act(x_ND[rows of e] @ w_in[e]^T) @ w_out[e]^T`` on CPU workers.

    The same arithmetic, in the same association, as the ``loop`` backend under autograd;
    only the blocking of each expert's rows over the workers differs. Saves the
    up-projection ``h_NH`` for backward (the activation is recomputed per segment).
    First-order only: a double backward raises (``once_differentiable``).
    """

    @staticmethod
    def forward(ctx, x_ND, w_in_EHD, w_out_EDF, counts_E: list[int], activation: str):
        x_ND = x_ND.contiguous()
        N, D, H = x_ND.shape[0], x_ND.shape[1], w_in_EHD.shape[1]
        save = any(ctx.needs_input_grad)
        h_NH = x_ND.new_empty(N, H) if save else None
        y_ND = x_ND.new_empty(N, D)

        def run(pieces):
            for e, a, b in pieces:
                up = torch.mm(x_ND[a:b], w_in_EHD[e].t(), out=h_NH[a:b]) if save else torch.mm(x_ND[a:b], w_in_EHD[e].t())
                torch.mm(_activate(up, activation), w_out_EDF[e].t(), out=y_ND[a:b])

        parts = plan_parts(counts_E, D, H)
        _run_on_workers(run, parts)
        if save:
            ctx.save_for_backward(x_ND, w_in_EHD, w_out_EDF, h_NH)
            ctx.counts, ctx.activation, ctx.parts = counts_E, activation, parts
        return y_ND

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ND):
        x_ND, w_in_EHD, w_out_EDF, h_NH = ctx.saved_tensors
        counts, activation, parts = ctx.counts, ctx.activation, ctx.parts
        need_x, need_in, need_out = ctx.needs_input_grad[:3]
        grad_ND = grad_ND.contiguous()
        grad_x = x_ND.new_empty(x_ND.shape) if need_x else None
        grad_in = torch.empty_like(w_in_EHD) if need_in else None
        grad_out = torch.empty_like(w_out_EDF) if need_out else None
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        # An expert whose rows two workers share gets its weight grads in a second pass, from
        # GEMMs over all its rows split by output rows (two partial sums over the rows would
        # round differently from the loop backend); the first pass leaves that expert's
        # activation-grad rows in a side buffer.
        pieces_per_expert = Counter(e for pieces in parts for e, _, _ in pieces)
        side = {e: x_ND.new_empty(counts[e], h_NH.shape[1])
                for e, c in pieces_per_expert.items() if c > 1 and (need_in or need_out)}

        def run(pieces):
            for e, a, b in pieces:
                g_nD = grad_ND[a:b]
                act_nF, g_nH = _activate_and_grad(h_NH[a:b], torch.mm(g_nD, w_out_EDF[e]), activation)
                if e in side:
                    side[e][a - starts[e]:b - starts[e]] = g_nH
                else:
                    if need_out:
                        torch.mm(g_nD.t(), act_nF, out=grad_out[e])
                    if need_in:
                        torch.mm(g_nH.t(), x_ND[a:b], out=grad_in[e])
                if need_x:
                    torch.mm(g_nH, w_in_EHD[e], out=grad_x[a:b])

        def run_shared(pieces):
            # each worker computes the output rows of a shared expert's weight grads in proportion
            # to the rows of it that it held in the first pass, which balances the two passes
            for e, a, b in pieces:
                if e not in side:
                    continue
                rows, n = slice(starts[e], starts[e + 1]), counts[e]
                a, b = a - starts[e], b - starts[e]
                if need_out:
                    D = grad_ND.shape[1]
                    lo, hi = D * a // n, D * b // n
                    torch.mm(grad_ND[rows].t()[lo:hi], _activate(h_NH[rows], activation),
                             out=grad_out[e][lo:hi])
                if need_in:
                    H = h_NH.shape[1]
                    lo, hi = H * a // n, H * b // n
                    torch.mm(side[e].t()[lo:hi], x_ND[rows], out=grad_in[e][lo:hi])

        _run_on_workers(run, parts)
        if side:
            _run_on_workers(run_shared, parts)
        for buf in (grad_in, grad_out):
            if buf is not None:
                for e, n in enumerate(counts):
                    if n == 0:
                        buf[e].zero_()
        return grad_x, grad_in, grad_out, None, None
