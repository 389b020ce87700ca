"""Token scheduling (ExpertFlow): put requests whose predicted routes are alike in the same
batch, so that each batch activates fewer distinct experts.

Legend: R requests, L MoE layers, E experts per layer, K top-k, T tokens, B batch size.

A batch computes, in every MoE layer, the union of the experts its tokens route to; an
offloaded runner must have all of them in the fast tier (a hit, a read, or a streamed read).
Given each request's *predicted* expert set per layer, a signature ``sig_RLE`` (bool
``[R, L, E]``), :func:`schedule` forms batches of at most ``batch_size`` requests that minimise
the cost ``sum over batches of sum over layers of |union of its members' sets|`` (the distinct
(layer, expert) pairs each batch needs), then orders the batches so that consecutive ones
share experts (what the cache kept for one batch serves the next).

The choice (``method="similar"``), and why:

* **Greedy growth, oldest request first.** Each batch is seeded with the oldest request not yet
  scheduled (without ``refine`` and ``order``, request ``i`` is then in one of the first
  ``i + 1`` batches: nobody starves behind later arrivals), then grown one request at a time by the one that adds the
  fewest new (layer, expert) pairs to the batch's union, ties broken by the larger overlap with
  the union, then by arrival. Adding the fewest new experts is the cost itself; the usual
  proxy, Jaccard similarity ``|A & U| / |A | U|``, ranks candidates the same way when their
  signatures have equal sizes (every token has exactly K experts per layer) and otherwise
  prefers a big candidate that overlaps much to a small one that adds less, which raises the
  cost. Exact minimisation is a hypergraph partitioning problem (NP-hard); greedy is
  ``O(R^2 L E / 64)`` word operations.
* **Swap refinement** (``refine``): exchanges of two requests between batches that lower the
  cost, best exchange per request, until none does (at most ``max_passes`` sweeps).
* **Never worse than FIFO** on the predicted cost: when greedy + swaps end above it (possible:
  greedy is a heuristic), the FIFO batches are kept.
* **Batch order** (``order``): the batch holding the oldest request first, then each next the
  remaining batch with the largest overlap with the previous one (cache reuse).

``method="fifo"``: arrival order cut into consecutive batches (the baseline).

Everything is deterministic: no randomness, ties broken by index.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["route_sets", "schedule", "fifo_batches", "batch_costs", "batch_accesses", "METHODS"]

METHODS = ("similar", "fifo")


def route_sets(ids_TLK: np.ndarray, num_experts: int, top_n: Optional[int] = None) -> np.ndarray:
    """Bool ``[L, E]``: per layer, the experts a group of tokens routes to (``ids_TLK``: ``[T, L, K]``
    expert ids, ``-1`` ignored). ``top_n``: only the ``top_n`` experts most tokens chose per layer
    (ties by lower id) instead of the whole union."""
    ids_TLK = np.asarray(ids_TLK)
    if ids_TLK.ndim != 3:
        raise ValueError(f"ids_TLK must be [T, L, K], got shape {ids_TLK.shape}")
    T, L, _ = ids_TLK.shape
    counts_LE = np.zeros((L, num_experts), dtype=np.int64)
    for l in range(L):
        e = ids_TLK[:, l, :].ravel()
        e = e[e >= 0]
        if e.size and int(e.max()) >= num_experts:
            raise ValueError(f"expert id {int(e.max())} in layer {l} is outside [0, num_experts={num_experts})")
        counts_LE[l] = np.bincount(e, minlength=num_experts)
    if top_n is None:
        return counts_LE > 0
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    out = np.zeros((L, num_experts), dtype=bool)
    for l in range(L):
        order = np.lexsort((np.arange(num_experts), -counts_LE[l]))[:top_n]
        out[l, order[counts_LE[l, order] > 0]] = True
    return out


def _as_sig(sig_RLE) -> np.ndarray:
    """``[R, L, E]`` bool, a list of ``[L, E]`` bool arrays, or a list over requests of lists over
    layers of expert-id sets (then E is the largest id + 1)."""
    if isinstance(sig_RLE, np.ndarray):
        a = sig_RLE
    elif len(sig_RLE) and all(isinstance(r, np.ndarray) for r in sig_RLE):
        a = np.stack(sig_RLE)                          # a list of [L, E] arrays
    else:
        reqs = [list(r) for r in sig_RLE]
        if not reqs:
            return np.zeros((0, 0, 0), dtype=bool)
        L = len(reqs[0])
        if any(len(r) != L for r in reqs):
            raise ValueError("every request's signature must list the same number of layers")
        E = 1 + max((int(e) for r in reqs for s in r for e in s), default=0)
        a = np.zeros((len(reqs), L, E), dtype=bool)
        for i, r in enumerate(reqs):
            for l, s in enumerate(r):
                ex = [int(e) for e in s]
                if any(e < 0 for e in ex):
                    raise ValueError(f"request {i}, layer {l}: negative expert id in {ex}")
                a[i, l, ex] = True
    if a.ndim != 3:
        raise ValueError(f"sig_RLE must be [R, L, E], got shape {a.shape}")
    return a.astype(bool, copy=False)


def fifo_batches(num_requests: int, batch_size: int) -> list[list[int]]:
    """Arrival order cut into batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, num_requests))) for i in range(0, num_requests, batch_size)]


def batch_costs(sig_RLE, batches: Sequence[Sequence[int]]) -> np.ndarray:
    """``[n_batches]`` int: distinct (layer, expert) pairs each batch's union of signatures holds
    (divide by L for the mean distinct experts per layer)."""
    sig = _as_sig(sig_RLE)
    flat = sig.reshape(sig.shape[0], -1)
    return np.array([int(np.any(flat[list(b)], axis=0).sum()) if len(b) else 0 for b in batches], dtype=np.int64)


def schedule(sig_RLE, batch_size: int, method: str = "similar", refine: bool = True, order: bool = True,
             max_passes: int = 8) -> list[list[int]]:
    """Batches (lists of request indices into ``sig_RLE``, arrival order = index order) of at most
    ``batch_size`` requests; every request in exactly one batch; ``ceil(R / batch_size)`` batches,
    all full but one (as FIFO; with ``order`` the smaller one need not be last). ``sig_RLE``: bool ``[R, L, E]`` predicted expert sets, or
    per-request lists of per-layer expert-id sets. See the module docstring for the method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sig = _as_sig(sig_RLE)
    R = sig.shape[0]
    if method == "fifo" or R <= batch_size or batch_size == 1 and not order:
        return fifo_batches(R, batch_size)
    S = sig.reshape(R, -1)
    batches = fifo_batches(R, batch_size)
    if batch_size > 1:
        greedy = _greedy(S, batch_size)
        if refine:
            greedy = _refine(S, greedy, max_passes)
        if batch_costs(sig, greedy).sum() <= batch_costs(sig, batches).sum():
            batches = greedy
    if order:
        batches = _order(S, batches)
    return batches


def _greedy(S: np.ndarray, B: int) -> list[list[int]]:
    R = S.shape[0]
    left = np.ones(R, dtype=bool)
    batches = []
    for seed in range(R):
        if not left[seed]:
            continue
        left[seed] = False
        batch, U = [seed], S[seed].copy()
        while len(batch) < B and left.any():
            cand = np.flatnonzero(left)
            C = S[cand]
            new = (C & ~U).sum(axis=1)
            overlap = (C & U).sum(axis=1)
            best = cand[np.lexsort((cand, -overlap, new))[0]]
            left[best] = False
            batch.append(int(best))
            U |= S[best]
        batches.append(sorted(batch))
    return batches


def _refine(S: np.ndarray, batches: list[list[int]], max_passes: int) -> list[list[int]]:
    """Swap two requests of different batches while that lowers the total cost (best swap of each
    request in turn, first-improvement sweeps)."""
    batches = [list(b) for b in batches]
    counts = [S[b].sum(axis=0, dtype=np.int32) for b in batches]   # members holding each pair
    where = {r: i for i, b in enumerate(batches) for r in b}
    R = S.shape[0]
    Si = S.astype(np.int32)
    for _ in range(max_passes):
        improved = False
        for r in range(R):
            a = where[r]
            ca = counts[a] - Si[r]                                  # batch a without r
            cost_a_now = int((counts[a] > 0).sum())
            best = (0, None)
            for b, cb in enumerate(counts):
                if b == a:
                    continue
                members = batches[b]
                cost_b_now = int((cb > 0).sum())
                # a without r, with s; b without s, with r; for every s in b at once
                Sm = Si[members]
                new_a = ((ca[None, :] + Sm) > 0).sum(axis=1)
                new_b = ((cb[None, :] - Sm + Si[r][None, :]) > 0).sum(axis=1)
                gain = cost_a_now + cost_b_now - (new_a + new_b)
                j = int(np.argmax(gain))
                if gain[j] > best[0]:
                    best = (int(gain[j]), (b, members[j]))
            if best[1] is not None:
                b, s = best[1]
                batches[a][batches[a].index(r)] = s
                batches[b][batches[b].index(s)] = r
                counts[a] += Si[s] - Si[r]
                counts[b] += Si[r] - Si[s]
                where[r], where[s] = b, a
                improved = True
        if not improved:
            break
    return [sorted(b) for b in batches]


def _order(S: np.ndarray, batches: list[list[int]]) -> list[list[int]]:
    """The batch with the oldest request first, then greedily the one sharing most with the last."""
    unions = [np.any(S[b], axis=0) for b in batches]
    left = sorted(range(len(batches)), key=lambda i: min(batches[i]))
    out = [left.pop(0)]
    while left:
        prev = unions[out[-1]]
        j = max(left, key=lambda i: (int((unions[i] & prev).sum()), -min(batches[i])))
        left.remove(j)
        out.append(j)
    return [batches[i] for i in out]


def batch_accesses(paths_R: Sequence[np.ndarray], work: Sequence[tuple[str, Sequence[tuple[int, int]]]]) -> list:
    """Cache accesses of a batched run, for :func:`moekit.offload.simulate.replay_accesses`.

    ``paths_R``: per request, its tokens' expert ids ``[T_r, L, K]`` (``-1`` ignored). ``work``:
    forward passes in order, each ``(phase, [(request, token index), ...])`` (phase ``prefill`` or
    ``decode``; a prefill pass lists every prompt token of its batch, a decode pass one token per
    member). Each pass is one access per layer (0 .. L-1) of the distinct experts its tokens
    route to there (in first-seen order); ``Access.token`` is the pass's index."""
    from moekit.offload.simulate import Access

    if not len(paths_R):
        return []
    L = np.asarray(paths_R[0]).shape[1]
    out = []
    for i, (phase, toks) in enumerate(work):
        if phase not in ("prefill", "decode"):
            raise ValueError(f"work[{i}]: phase must be 'prefill' or 'decode', got {phase!r}")
        rows = np.stack([np.asarray(paths_R[r])[t] for r, t in toks]) if len(toks) else np.zeros((0, L, 1), int)
        for l in range(L):
            seen = dict.fromkeys(int(e) for e in rows[:, l].ravel() if e >= 0)
            out.append(Access(phase, l, tuple(seen), i))
    return out
