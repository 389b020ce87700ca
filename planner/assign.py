"""Linear and bottleneck assignment in numpy (no scipy): used to map clusters to GPUs."""
from __future__ import annotations

import numpy as np

__all__ = ["linear_assignment", "bottleneck_assignment"]


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Min-cost perfect matching of a square cost matrix (shortest augmenting paths, O(n^3)).

    Returns col[i]: the column assigned to row i."""
    C = np.asarray(cost, dtype=np.float64)
    n = C.shape[0]
    if C.shape != (n, n):
        raise ValueError(f"cost must be square, got {C.shape}")
    INF = np.inf
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    p = np.zeros(n + 1, dtype=np.int64)     # p[j]: row (1-based) matched to column j
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(n + 1, INF)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = C[i0 - 1] - u[i0] - v[1:]
            upd = free & (cur < minv[1:])
            mv = minv[1:]
            mv[upd] = cur[upd]
            wy = way[1:]
            wy[upd] = j0
            cand = np.where(free, mv, INF)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            uj = np.nonzero(used)[0]
            u[p[uj]] += delta
            v[uj] -= delta
            mv[free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    col = np.empty(n, dtype=np.int64)
    for j in range(1, n + 1):
        col[p[j] - 1] = j - 1
    return col


def bottleneck_assignment(value: np.ndarray, cost: np.ndarray | None = None, slack: float = 0.0):
    """Matching minimising max value[i, col[i]]; among those (within ``slack`` relative), min sum cost.

    Returns (col, bottleneck value)."""
    V = np.asarray(value, dtype=np.float64)
    n = V.shape[0]
    C = np.zeros_like(V) if cost is None else np.asarray(cost, dtype=np.float64)
    vals = np.unique(V)
    lo, hi = 0, vals.size - 1
    # feasibility of threshold t: a perfect matching using entries <= t exists
    def feasible(t):
        col = linear_assignment((V > t).astype(np.float64))
        return (V[np.arange(n), col] <= t).all()
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(vals[mid]):
            hi = mid
        else:
            lo = mid + 1
    t = vals[lo] * (1 + slack) if vals[lo] > 0 else vals[lo]
    big = (np.abs(C).max() + 1.0) * n * 10 + 1.0
    col = linear_assignment(C + big * (V > t))
    return col, float(V[np.arange(n), col].max())
