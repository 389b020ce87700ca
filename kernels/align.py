"""Align / permute: group the (token, slot) assignments of ``topk_ids_TK`` by expert.

Legend: T tokens, K top-k, E experts, N = T*K flat slots (slot ``n = t*K + k``),
BM = ``block_m``, P = padded length, B = P / BM blocks.

Layout produced by :func:`moe_align` (and, identically, by :func:`moe_align_ref`):

* ``tokens_per_expert_E`` int32 [E]: assignments per expert (slots with id -1 excluded).
* ``expert_offsets_E1`` int32 [E+1]: exclusive prefix sum; expert e owns sorted
  positions ``[off[e], off[e+1])``; ``off[E]`` is the number of kept slots.
* ``sorted_slots_N`` int32 [N]: flat slot ids ordered by expert, **ascending slot id within
  an expert** (a stable counting sort, so exact and deterministic); positions past
  ``off[E]`` (as many as dropped slots) hold the sentinel ``N``.
* ``padded_offsets_E1`` int32 [E+1]: like ``expert_offsets_E1`` with each expert's segment
  padded to a multiple of BM (an expert with zero tokens gets an empty segment).
* ``padded_slots_P`` int32 [P]: vLLM ``moe_align_block_size`` layout: the sorted slot ids
  with each expert's segment padded by the sentinel ``N``; P = cdiv(N + E*(BM-1), BM)*BM is
  the static upper bound (a function of N, E, BM only, so shapes never depend on data);
  positions past ``padded_offsets_E1[E]`` hold the sentinel.
* ``block_expert_B`` int32 [B]: the expert of each BM-row block of ``padded_slots_P``, -1
  for blocks past the end (kernels return at once on those).
* ``slot_to_sorted_N`` / ``slot_to_padded_N`` int32 [N]: the inverse maps (position of slot
  n in ``sorted_slots_N`` / ``padded_slots_P``), -1 for a dropped slot (id -1).

Slots with id -1 (capacity overflow) appear nowhere. Ids must lie in [-1, E).

Kernels: ``_align_count_kernel`` (per chunk of CHUNK slots, per-expert counts),
``_align_scan_kernel`` (per expert, exclusive scan over chunks), ``_align_offsets_kernel``
(one program: expert offsets, padded offsets, block -> expert map), ``_align_scatter_kernel``
(per chunk: rank within chunk from a one-hot cumulative sum, writes both layouts and both
inverse maps).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from ._triton_compat import cdiv, check_runnable, next_pow2, tl, triton


class AlignedLayout(NamedTuple):
    tokens_per_expert_E: torch.Tensor
    expert_offsets_E1: torch.Tensor
    sorted_slots_N: torch.Tensor
    padded_offsets_E1: torch.Tensor
    padded_slots_P: torch.Tensor
    block_expert_B: torch.Tensor
    slot_to_sorted_N: torch.Tensor
    slot_to_padded_N: torch.Tensor


def padded_size(n_slots: int, num_experts: int, block_m: int) -> int:
    """P: static upper bound of the padded layout length (a multiple of ``block_m``)."""
    return cdiv(n_slots + num_experts * (block_m - 1), block_m) * block_m


@triton.jit(do_not_specialize=["N"])
def _align_count_kernel(ids_ptr, chunk_counts_ptr, N, E,
                        CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + offs, mask=offs < N, other=-1).to(tl.int32)
    offs_e = tl.arange(0, BLOCK_E)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
    cnt = tl.sum(onehot, axis=0)
    tl.store(chunk_counts_ptr + c * E + offs_e, cnt, mask=offs_e < E)


@triton.jit(do_not_specialize=["n_chunks"])
def _align_scan_kernel(chunk_counts_ptr, chunk_start_ptr, totals_ptr, n_chunks, E,
                       BLOCK_C: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m = (offs_c < n_chunks)[:, None] & e_ok[None, :]
        ptrs = offs_c[:, None] * E + offs_e[None, :]
        cnt = tl.load(chunk_counts_ptr + ptrs, mask=m, other=0)
        incl = tl.cumsum(cnt, axis=0)
        tl.store(chunk_start_ptr + ptrs, incl - cnt + carry[None, :], mask=m)
        carry += tl.sum(cnt, axis=0)
    tl.store(totals_ptr + offs_e, carry, mask=e_ok)


@triton.jit(do_not_specialize=["n_blocks"])
def _align_offsets_kernel(totals_ptr, off_ptr, poff_ptr, block_expert_ptr, E, n_blocks,
                          BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr):
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    cnt = tl.load(totals_ptr + offs_e, mask=e_ok, other=0)
    pcnt = (cnt + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(cnt, axis=0)
    pend = tl.cumsum(pcnt, axis=0)
    tl.store(off_ptr + offs_e + 1, end, mask=e_ok)
    tl.store(poff_ptr + offs_e + 1, pend, mask=e_ok)
    tl.store(off_ptr + offs_e, end * 0, mask=offs_e == 0)
    tl.store(poff_ptr + offs_e, pend * 0, mask=offs_e == 0)
    total_padded = tl.sum(pcnt, axis=0)
    pend_masked = tl.where(e_ok, pend, 2147483647)
    for b0 in range(0, n_blocks, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        row = offs_b * BLOCK_M
        # expert of a block = number of experts whose padded segment ends at or before it
        e_of_b = tl.sum((pend_masked[None, :] <= row[:, None]).to(tl.int32), axis=1)
        e_of_b = tl.where(row < total_padded, e_of_b, -1)
        tl.store(block_expert_ptr + offs_b, e_of_b, mask=offs_b < n_blocks)


@triton.jit(do_not_specialize=["N"])
def _align_scatter_kernel(ids_ptr, chunk_start_ptr, off_ptr, poff_ptr,
                          sorted_ptr, padded_ptr, inv_sorted_ptr, inv_padded_ptr, N, E,
                          CHUNK: tl.constexpr, BLOCK_E: tl.constexpr):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    in_range = offs < N
    ids = tl.load(ids_ptr + offs, mask=in_range, other=-1).to(tl.int32)
    offs_e = tl.arange(0, BLOCK_E)
    onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1  # earlier slots, same expert
    kept = in_range & (ids >= 0) & (ids < E)
    e = tl.where(kept, ids, 0)
    start = tl.load(chunk_start_ptr + c * E + e, mask=kept, other=0)
    off = tl.load(off_ptr + e, mask=kept, other=0)
    poff = tl.load(poff_ptr + e, mask=kept, other=0)
    pos = off + start + rank
    ppos = poff + start + rank
    tl.store(sorted_ptr + pos, offs, mask=kept)
    tl.store(padded_ptr + ppos, offs, mask=kept)
    tl.store(inv_sorted_ptr + offs, tl.where(kept, pos, -1), mask=in_range)
    tl.store(inv_padded_ptr + offs, tl.where(kept, ppos, -1), mask=in_range)


def _validate(topk_ids_TK, num_experts, block_m):
    if not isinstance(topk_ids_TK, torch.Tensor) or topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids_TK must be a 2-D tensor [T, K], got "
                         f"{getattr(topk_ids_TK, 'shape', type(topk_ids_TK))}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids_TK must be int32 or int64, got {topk_ids_TK.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a positive power of two, got {block_m!r}")
    if topk_ids_TK.numel() >= 2**31 - num_experts * block_m:
        raise ValueError(f"too many slots for int32 indices: {topk_ids_TK.numel()}")


def moe_align(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int = 16,
              *, check_ids: bool = False) -> AlignedLayout:
    """Triton counting sort of the assignments by expert; see the module docstring.
    Registered as the custom op ``moekit::moe_align`` (traceable by torch.compile).

    ``check_ids=True`` verifies ids lie in [-1, E) (one host sync); otherwise out-of-range
    ids are the caller's bug (they are treated as dropped)."""
    _validate(topk_ids_TK, num_experts, block_m)
    check_runnable(topk_ids_TK, op="moe_align")
    if check_ids and topk_ids_TK.numel():
        lo, hi = int(topk_ids_TK.min()), int(topk_ids_TK.max())
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_ids_TK values must lie in [-1, {num_experts}), got [{lo}, {hi}]")
    return AlignedLayout(*torch.ops.moekit.moe_align(topk_ids_TK, num_experts, block_m))


@torch.library.custom_op("moekit::moe_align", mutates_args=())
def _moe_align_op(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int) -> Tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor]:
    dev = topk_ids_TK.device
    E, N = num_experts, topk_ids_TK.numel()
    P = padded_size(N, E, block_m)
    B = P // block_m
    i32 = dict(dtype=torch.int32, device=dev)
    tpe = torch.empty(E, **i32)
    off = torch.empty(E + 1, **i32)
    poff = torch.empty(E + 1, **i32)
    sorted_slots = torch.full((N,), N, **i32)
    padded_slots = torch.full((P,), N, **i32)
    block_expert = torch.empty(B, **i32)
    inv_sorted = torch.empty(N, **i32)
    inv_padded = torch.empty(N, **i32)
    ids = topk_ids_TK.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    BLOCK_E = next_pow2(E)
    CHUNK = max(16, min(1024, 4096 // BLOCK_E))
    n_chunks = max(1, cdiv(N, CHUNK))
    chunk_counts = torch.empty(n_chunks, E, **i32)
    chunk_start = torch.empty(n_chunks, E, **i32)
    _align_count_kernel[(n_chunks,)](ids, chunk_counts, N, E, CHUNK=CHUNK, BLOCK_E=BLOCK_E)
    BLOCK_ES = min(BLOCK_E, 64)
    _align_scan_kernel[(cdiv(E, BLOCK_ES),)](chunk_counts, chunk_start, tpe, n_chunks, E,
                                             BLOCK_C=64, BLOCK_E=BLOCK_ES)
    _align_offsets_kernel[(1,)](tpe, off, poff, block_expert, E, B, BLOCK_M=block_m,
                                BLOCK_E=BLOCK_E, BLOCK_B=max(1, min(256, 8192 // BLOCK_E)))
    if N:
        _align_scatter_kernel[(n_chunks,)](ids, chunk_start, off, poff, sorted_slots, padded_slots,
                                           inv_sorted, inv_padded, N, E, CHUNK=CHUNK, BLOCK_E=BLOCK_E)
    return tpe, off, sorted_slots, poff, padded_slots, block_expert, inv_sorted, inv_padded


@_moe_align_op.register_fake
def _(topk_ids_TK, num_experts, block_m):
    dev = topk_ids_TK.device
    E, N = num_experts, topk_ids_TK.numel()
    P = padded_size(N, E, block_m)
    i32 = dict(dtype=torch.int32, device=dev)
    return (torch.empty(E, **i32), torch.empty(E + 1, **i32), torch.empty(N, **i32), torch.empty(E + 1, **i32),
            torch.empty(P, **i32), torch.empty(P // block_m, **i32), torch.empty(N, **i32), torch.empty(N, **i32))


def moe_align_ref(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int = 16,
                  *, check_ids: bool = False) -> AlignedLayout:
    """Pure-torch reference of :func:`moe_align` (bit-identical outputs)."""
    _validate(topk_ids_TK, num_experts, block_m)
    dev = topk_ids_TK.device
    E, N = num_experts, topk_ids_TK.numel()
    ids = topk_ids_TK.reshape(-1).long()
    if check_ids and N and (int(ids.min()) < -1 or int(ids.max()) >= E):
        raise ValueError(f"topk_ids_TK values must lie in [-1, {E}), got [{int(ids.min())}, {int(ids.max())}]")
    keep = (ids >= 0) & (ids < E)
    key = torch.where(keep, ids, torch.full_like(ids, E))  # dropped sort last
    order = torch.sort(key, stable=True).indices
    n_kept = int(keep.sum())
    tpe = torch.bincount(ids[keep], minlength=E)
    off = torch.zeros(E + 1, dtype=torch.long, device=dev)
    off[1:] = torch.cumsum(tpe, 0)
    pcnt = (tpe + block_m - 1) // block_m * block_m
    poff = torch.zeros(E + 1, dtype=torch.long, device=dev)
    poff[1:] = torch.cumsum(pcnt, 0)
    P = padded_size(N, E, block_m)
    sorted_slots = torch.full((N,), N, dtype=torch.long, device=dev)
    sorted_slots[:n_kept] = order[:n_kept]
    kept_slots = order[:n_kept]
    e_of = ids[kept_slots]
    pos = torch.arange(n_kept, device=dev)
    ppos = poff[e_of] + (pos - off[e_of])
    padded_slots = torch.full((P,), N, dtype=torch.long, device=dev)
    padded_slots[ppos] = kept_slots
    rows = torch.arange(0, P, block_m, device=dev)
    block_expert = torch.searchsorted(poff[1:], rows, right=True)
    block_expert = torch.where(rows < poff[E], block_expert, torch.full_like(block_expert, -1))
    inv_sorted = torch.full((N,), -1, dtype=torch.long, device=dev)
    inv_sorted[kept_slots] = pos
    inv_padded = torch.full((N,), -1, dtype=torch.long, device=dev)
    inv_padded[kept_slots] = ppos
    i32 = torch.int32
    return AlignedLayout(tpe.to(i32), off.to(i32), sorted_slots.to(i32), poff.to(i32),
                         padded_slots.to(i32), block_expert.to(i32), inv_sorted.to(i32), inv_padded.to(i32))
