"""From a trace to the planner's inputs: expert loads P[l, e] and cross-layer transitions R[l, e1, e2].

Legend: L layers, E experts, T tokens, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .traces import RoutingTrace, concat_traces

__all__ = ["TraceStats", "expert_loads", "transitions", "trace_stats"]


def expert_loads(trace: RoutingTrace) -> np.ndarray:
    """[L, E] float64: tokens routed to expert e of layer l (empty slots -1 ignored)."""
    E = trace.num_experts
    out = np.zeros((trace.num_layers, E))
    for l, ids in enumerate(trace.topk_ids):
        v = ids[ids >= 0]
        out[l] = np.bincount(v, minlength=E)[:E]
    return out


def transitions(trace: RoutingTrace) -> np.ndarray:
    """[L-1, E, E] float64: R[l, e1, e2] = number of (token, e1 in its top-k at l, e2 in its top-k at l+1).

    Every pair of the two top-k sets counts (K*K pairs per token). Needs an aligned trace."""
    if not trace.aligned:
        raise ValueError("cross-layer transitions need a token-aligned trace (same tokens in every layer)")
    E, L = trace.num_experts, trace.num_layers
    out = np.zeros((max(L - 1, 0), E, E))
    for l in range(L - 1):
        a, b = trace.topk_ids[l], trace.topk_ids[l + 1]
        K1, K2 = a.shape[1], b.shape[1]
        aa = np.repeat(a, K2, axis=1).ravel()
        bb = np.tile(b, (1, K1)).ravel()
        ok = (aa >= 0) & (bb >= 0)
        out[l] = np.bincount(aa[ok].astype(np.int64) * E + bb[ok], minlength=E * E)[: E * E].reshape(E, E)
    return out


@dataclass
class TraceStats:
    """Planner inputs: loads [L, E] and (optionally) transitions [L-1, E, E]. ``trace``, when the
    stats came from one, is kept for the metrics that need token order (per-batch load)."""

    loads: np.ndarray
    trans: np.ndarray | None = None
    expert_bytes: list | None = None
    trace: RoutingTrace | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.loads = np.asarray(self.loads, dtype=np.float64)
        if self.loads.ndim == 1:
            self.loads = self.loads[None]
        if self.loads.ndim != 2:
            raise ValueError(f"loads must be [L, E], got shape {self.loads.shape}")
        if np.any(self.loads < 0) or not np.all(np.isfinite(self.loads)):
            raise ValueError("loads must be finite and non-negative")
        if self.trans is not None:
            self.trans = np.asarray(self.trans, dtype=np.float64)
            L, E = self.loads.shape
            if self.trans.shape != (L - 1, E, E):
                raise ValueError(f"transitions must be [{L - 1}, {E}, {E}], got {self.trans.shape}")

    @property
    def num_layers(self) -> int:
        return self.loads.shape[0]

    @property
    def num_experts(self) -> int:
        return self.loads.shape[1]


def trace_stats(src) -> TraceStats:
    """TraceStats from a RoutingTrace (or a list of them, concatenated), a TraceStats (returned
    as is), or a loads array [L, E] / [E]. The planner normalises its input here once: loads and
    transitions cost a pass over every token."""
    if isinstance(src, TraceStats):
        return src
    if isinstance(src, (list, tuple)) and src and all(isinstance(t, RoutingTrace) for t in src):
        src = concat_traces(list(src))
    if isinstance(src, RoutingTrace):
        eb = src.meta.get("expert_bytes")
        return TraceStats(expert_loads(src), transitions(src) if src.aligned and src.num_layers > 1 else None,
                          list(eb) if isinstance(eb, (list, tuple)) and len(eb) == src.num_layers else None,
                          trace=src)
    return TraceStats(np.asarray(src, dtype=np.float64))
