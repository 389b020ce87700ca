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

import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import GLU_ACTIVATIONS, MoEConfig
from moekit.workspace import POOL, Lease

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
    """Grouped GEMMs over ragged expert segments, no padding.

    On CPU: :class:`_CPUGroupedExperts` (per-expert GEMMs on single-threaded workers, gather,
    activation, routing weight and scatter fused per segment; any float dtype). Elsewhere:
    ``torch.nn.functional.grouped_mm`` (torch >= 2.9), falling back to :func:`loop_backend`
    where the installed torch lacks it or for dtypes grouped_mm does not take."""
    if x_TD.device.type == "cpu":
        return _CPUGroupedExperts.apply(x_TD, topk_weights_TK, w_in_EHD, w_out_EDF,
                                        Dispatch(topk_ids_TK, w_in_EHD.shape[0]), activation)
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


# ---- CPU: grouped GEMMs on single-threaded workers ------------------------------------------------
#
# torch's CPU grouped_mm is a loop of one ``mm`` per expert, each an OpenMP fork/join over all
# intra-op threads: 2E barriers per forward (4E more in backward) on skinny GEMMs, which costs
# little on an idle machine but up to a scheduler time slice per barrier when other processes
# share the cores (measured on 2 busy cores: 64 x [256,1024]@[1024,1024] took 2.3x the time of
# the one dense GEMM with the same FLOPs; the same GEMMs split over two single-threaded workers
# took 1.0x). So on CPU the expert-sorted rows are cut into one contiguous, equal-sized range per
# intra-op thread, and each worker runs its range expert by expert with single-threaded BLAS:
# gather rows -> up GEMM -> activation -> down GEMM -> scatter to (token, slot); the weighted
# sum over K follows on the calling thread. Everything between the two GEMMs stays in cache,
# and neither the gathered input nor the activation output is materialised for all N rows.
# Few large experts (Mixtral-like: ~512 rows x 1024 x 4096 per expert) are the exception: there
# one barrier per GEMM is cheap next to the GEMM, and running the experts one after another on
# the calling thread, each GEMM over all intra-op threads, measured 3.5 % faster in forward and
# 11 % in forward+backward (benchmarks/bench_cpu_reuse.py); :func:`_plan_parts` picks.

_WORKER_POOLS: dict[int, ThreadPoolExecutor] = {}
_WORKER_POOLS_LOCK = threading.Lock()


def _worker_pool(num_workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``num_workers`` threads whose torch ops run single-threaded
    (one pool per intra-op thread count; an execution resource, not model state)."""
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


def _run_on_workers(fn: Callable, parts: list) -> list:
    """``[fn(part) for part in parts]`` without autograd, one part per worker thread (inline
    for one part). Grad mode is thread-local, hence the ``no_grad`` inside the workers."""
    def call(part):
        with torch.no_grad():
            return fn(part)

    if len(parts) == 1:
        return [call(parts[0])]
    return list(_worker_pool(torch.get_num_threads()).map(call, parts))


def _split_rows(counts_E: list[int], num_parts: int) -> list[list[tuple[int, int, int]]]:
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


def _plan_parts(counts_E: list[int], D: int, H: int) -> list[list[tuple[int, int, int]]]:
    """The schedule: one part per worker thread, or a single part run on the calling thread."""
    busy = [n for n in counts_E if n]
    threads = torch.get_num_threads()
    if threads == 1 or (busy and sum(busy) / len(busy) * D * H >= INLINE_MIN_MACS):
        return _split_rows(counts_E, 1)
    return _split_rows(counts_E, threads)


def _gate_activation(gate_NF: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate_NF) if activation in ("swiglu", "silu") else F.gelu(gate_NF) if activation in (
        "geglu", "gelu") else F.relu(gate_NF)


def _activation_grad_into(out: torch.Tensor, grad: torch.Tensor, z: torch.Tensor, activation: str) -> None:
    """``out = grad * act'(z)`` with the aten backward kernel of the (gate) activation."""
    aten = torch.ops.aten
    if activation in ("swiglu", "silu"):
        aten.silu_backward.grad_input(grad, z, grad_input=out)
    elif activation in ("geglu", "gelu"):
        aten.gelu_backward.grad_input(grad, z, grad_input=out)
    else:  # relu
        aten.threshold_backward.grad_input(grad, z, 0, grad_input=out)


def _activate_and_grad(h_nH: torch.Tensor, grad_nF: torch.Tensor, activation: str):
    """(activate(h), d activate(h)/dh applied to ``grad_nF``) for one segment, without autograd;
    the same elementwise products autograd forms for :func:`activate`. Consumes ``grad_nF``."""
    g_nH = torch.empty_like(h_nH)
    if activation in GLU_ACTIVATIONS:
        gate_nF, up_nF = h_nH.chunk(2, dim=-1)
        Fh = gate_nF.shape[-1]
        act_nF = _gate_activation(gate_nF, activation)
        torch.mul(grad_nF, act_nF, out=g_nH[:, Fh:])  # d up
        _activation_grad_into(g_nH[:, :Fh], grad_nF.mul_(up_nF), gate_nF, activation)  # d gate
        return act_nF.mul_(up_nF), g_nH
    _activation_grad_into(g_nH, grad_nF, h_nH, activation)
    return _gate_activation(h_nH, activation), g_nH


def _activate_no_grad(h_nH: torch.Tensor, activation: str) -> torch.Tensor:
    """:func:`activate` with one temporary fewer (the product is formed in place)."""
    if activation in GLU_ACTIVATIONS:
        gate_nF, up_nF = h_nH.chunk(2, dim=-1)
        return _gate_activation(gate_nF, activation).mul_(up_nF)
    return _gate_activation(h_nH, activation)


class _CPUGroupedExperts(torch.autograd.Function):
    """``y[t] = sum_k w[t,k] * down_e(act(up_e(x[t])))``, ``e = ids[t,k]``, on CPU workers.

    The same arithmetic, in the same association, as :func:`loop_backend` under autograd
    (unweighted expert outputs placed in (token, slot) order, then a weighted sum over K);
    only the blocking of each expert's rows over the workers differs. Saves
    ``h_NH = x_ND @ w_in[e]^T`` (expert-sorted) and the unweighted output slots for
    backward; input rows, activations and output-gradient rows are re-gathered or
    recomputed per segment.
    """

    @staticmethod
    def forward(ctx, x_TD, topk_weights_TK, w_in_EHD, w_out_EDF, d: Dispatch, activation: str):
        T, K, D = d.num_tokens, d.top_k, x_TD.shape[-1]
        x_TD = x_TD.contiguous()
        pos_N, token_N = d.order_N, d.token_N
        counts = d.tokens_per_expert_E.tolist()
        N, H = pos_N.numel(), w_in_EHD.shape[1]
        save = any(ctx.needs_input_grad)
        h_NH = POOL.take((N, H), x_TD.dtype) if save else None
        slots_TKD = POOL.take((T * K, D), x_TD.dtype)
        if N < T * K:  # dropped (token, slot) pairs keep a zero row: weight 0 times garbage may be NaN
            slots_TKD.zero_()

        def run(pieces):
            for e, a, b in pieces:
                x_nD = x_TD.index_select(0, token_N[a:b])
                h_nH = torch.mm(x_nD, w_in_EHD[e].t(), out=h_NH[a:b]) if save else torch.mm(x_nD, w_in_EHD[e].t())
                y_nD = torch.mm(_activate_no_grad(h_nH, activation), w_out_EDF[e].t())
                slots_TKD.index_copy_(0, pos_N[a:b], y_nD)

        parts = _plan_parts(counts, D, H)
        _run_on_workers(run, parts)
        w_T1K = topk_weights_TK.to(x_TD.dtype).unsqueeze(1)
        if save:
            ctx.save_for_backward(x_TD, w_T1K, w_in_EHD, w_out_EDF, h_NH, slots_TKD)
            ctx.d, ctx.counts, ctx.activation, ctx.parts = d, counts, activation, parts
            ctx.weights_dtype = topk_weights_TK.dtype
        y_TD = torch.bmm(w_T1K, slots_TKD.view(T, K, D)).squeeze(1)
        if save:
            ctx.lease = Lease(POOL, h_NH, slots_TKD)  # back to the pool when the graph is freed
        else:
            POOL.give(slots_TKD)
        return y_TD

    @staticmethod
    def backward(ctx, grad_TD):
        x_TD, w_T1K, w_in_EHD, w_out_EDF, h_NH, slots_TKD = ctx.saved_tensors
        d, activation, counts = ctx.d, ctx.activation, ctx.counts
        T, K, D = d.num_tokens, d.top_k, x_TD.shape[-1]
        pos_N, token_N = d.order_N, d.token_N
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        grad_TD = grad_TD.contiguous()
        grad_weights = grad_x = grad_in = grad_out = None
        if need_w:  # the bmm's own backward, as autograd computes it for the loop backend
            grad_weights = torch.bmm(grad_TD.unsqueeze(1), slots_TKD.view(T, K, D).transpose(1, 2))
            grad_weights = grad_weights.view(T, K).to(ctx.weights_dtype)
        if not (need_x or need_in or need_out):
            return grad_x, grad_weights, grad_in, grad_out, None, None
        w_N = w_T1K.view(-1).index_select(0, pos_N)
        if need_x:
            # pooled unless it becomes grad_x itself (K == 1)
            gslots_TKD = POOL.take((T * K, D), x_TD.dtype) if K > 1 else x_TD.new_empty(T, D)
            if pos_N.numel() < T * K:
                gslots_TKD.zero_()
        # lent: back in the pool when autograd's consumer (usually .grad) frees them
        grad_in = POOL.lend(w_in_EHD.shape, w_in_EHD.dtype) if need_in else None
        grad_out = POOL.lend(w_out_EDF.shape, w_out_EDF.dtype) if need_out else None
        starts = [0]
        for n in counts:
            starts.append(starts[-1] + n)
        parts = ctx.parts
        # An expert whose rows two workers share gets its weight grads in a second pass, from
        # GEMMs over all its rows split by output rows (two partial sums over the rows would
        # round differently from the loop backend); the first pass leaves that expert's
        # output-grad and activation-grad rows in side buffers.
        pieces_per_expert = Counter(e for pieces in parts for e, _, _ in pieces)
        side = {e: (POOL.take((counts[e], D), x_TD.dtype), POOL.take((counts[e], h_NH.shape[1]), x_TD.dtype))
                for e, c in pieces_per_expert.items() if c > 1 and (need_in or need_out)}

        def run(pieces):
            for e, a, b in pieces:
                tok = token_N[a:b]
                g_nD = grad_TD.index_select(0, tok).mul_(w_N[a:b, None])  # grad of the unweighted rows
                act_nF, g_nH = _activate_and_grad(h_NH[a:b], torch.mm(g_nD, w_out_EDF[e]), activation)
                if e in side:
                    side[e][0][a - starts[e]:b - starts[e]] = g_nD
                    side[e][1][a - starts[e]:b - starts[e]] = g_nH
                else:
                    if need_out:
                        torch.mm(g_nD.t(), act_nF, out=grad_out[e])
                    if need_in:
                        torch.mm(g_nH.t(), x_TD.index_select(0, tok), out=grad_in[e])
                if need_x:
                    gslots_TKD.index_copy_(0, pos_N[a:b], torch.mm(g_nH, w_in_EHD[e]))

        def run_shared(pieces):
            # each worker computes the output rows of a shared expert's weight grads in proportion
            # to the rows of it that it held in the first pass, which balances the two passes
            for e, a, b in pieces:
                if e not in side:
                    continue
                g_nD, g_nH = side[e]
                rows, n = slice(starts[e], starts[e + 1]), counts[e]
                a, b = a - starts[e], b - starts[e]
                if need_out:
                    lo, hi = D * a // n, D * b // n
                    torch.mm(g_nD.t()[lo:hi], _activate_no_grad(h_NH[rows], activation), out=grad_out[e][lo:hi])
                if need_in:
                    H = h_NH.shape[1]
                    lo, hi = H * a // n, H * b // n
                    torch.mm(g_nH.t()[lo:hi], x_TD.index_select(0, token_N[rows]), out=grad_in[e][lo:hi])

        _run_on_workers(run, parts)
        if side:
            _run_on_workers(run_shared, parts)
            POOL.give(*(buf for bufs in side.values() for buf in bufs))
        for buf in (grad_in, grad_out):
            if buf is not None:
                for e, n in enumerate(counts):
                    if n == 0:
                        buf[e].zero_()
        if need_x:
            grad_x = gslots_TKD
            if K > 1:
                grad_x = gslots_TKD.view(T, K, D).sum(1)
                POOL.give(gslots_TKD)
        return grad_x, grad_weights, grad_in, grad_out, None, None


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
