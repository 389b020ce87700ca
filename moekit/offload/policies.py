"""Eviction policies of :class:`~moekit.offload.cache.ExpertCache`.

Legend: L MoE layers, E experts per layer.

A policy only ranks: ``priority(layer, expert)`` is how much an expert is worth keeping
(the cache evicts the lowest first) and ``admit`` says whether a missed expert is worth a
slot at all (``False``: it is streamed: loaded, used, freed). The cache owns residency and
the byte budget; policies never touch either, so every policy obeys the same invariants.

Policies: ``lru``, ``lfu``, ``static`` (hot set pinned from a profile), ``predictive``
(protects predicted experts, else a frequency/recency blend) and ``belady`` (offline MIN:
needs the future access sequence; simulation only).
"""
from __future__ import annotations

import bisect
from typing import Optional, Sequence

import numpy as np

__all__ = ["Policy", "LRU", "LFU", "Static", "Predictive", "Belady", "POLICIES", "make_policy"]

NEVER = float("inf")


class Policy:
    """Ranks experts of one layer for eviction; the cache calls the hooks in access order."""

    name = "base"

    def __init__(self, num_layers: int, num_experts: int):
        self.L, self.E = num_layers, num_experts
        self.clock = 0                                   # global access counter (all layers)
        self.last_use_LE = np.full((num_layers, num_experts), -1, dtype=np.int64)
        self.count_LE = np.zeros((num_layers, num_experts), dtype=np.float64)

    # --- hooks ------------------------------------------------------------------------
    def begin_access(self, layer: int, experts: Sequence[int]) -> None:
        """Called once per :meth:`ExpertCache.access`, before any decision."""
        self.clock += 1
        for e in experts:
            self.count_LE[layer, e] += 1

    def end_access(self, layer: int, experts: Sequence[int]) -> None:
        """Called once per access after residency changed: the experts were used now."""
        for e in experts:
            self.last_use_LE[layer, e] = self.clock

    def on_prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Experts admitted ahead of use."""

    def observe_prediction(self, layer: int, predicted: Sequence[int]) -> None:
        """Predicted experts of the next access of ``layer`` (only ``predictive`` uses it)."""

    # --- ranking ----------------------------------------------------------------------
    def priority(self, layer: int, expert: int) -> float:
        """Worth of keeping ``expert`` resident; the cache evicts the lowest first."""
        return float(self.last_use_LE[layer, expert])

    def admit(self, layer: int, expert: int, worst_resident: Optional[float]) -> bool:
        """Whether a miss takes a slot (``worst_resident``: priority of the best victim, or None
        when a slot is free). Default: always (demand caching)."""
        return True

    def pinned(self, layer: int) -> Optional[set]:
        """Experts that may never be evicted (``static``); None for no pinning."""
        return None


class LRU(Policy):
    """Least recently used within the layer's quota (mixtral-offloading's per-layer LRU)."""

    name = "lru"


class LFU(Policy):
    """Least frequently used (counts since start, warm-started from a profile); ties by recency."""

    name = "lfu"

    def __init__(self, num_layers: int, num_experts: int, profile_LE: Optional[np.ndarray] = None):
        super().__init__(num_layers, num_experts)
        if profile_LE is not None:
            self.count_LE += np.asarray(profile_LE, dtype=np.float64)

    def priority(self, layer: int, expert: int) -> float:
        return float(self.count_LE[layer, expert]) + 1e-9 * float(self.last_use_LE[layer, expert])


class Static(Policy):
    """The hottest experts of each layer (from a routing profile; without one, the first seen)
    stay resident, as many as the cache lets a policy pin (its quota less the slot that streamed
    experts pass through); every other expert is streamed."""

    name = "static"

    def __init__(self, num_layers: int, num_experts: int, profile_LE: Optional[np.ndarray] = None):
        super().__init__(num_layers, num_experts)
        self.profile_LE = None if profile_LE is None else np.asarray(profile_LE, dtype=np.float64)
        self.hot: list[set] = [set() for _ in range(num_layers)]
        self.pin_slots = [num_experts] * num_layers

    def set_quotas(self, pin_slots: Sequence[int]) -> None:
        self.pin_slots = list(pin_slots)
        if self.profile_LE is None:
            return
        for l, q in enumerate(pin_slots):
            order = np.argsort(-self.profile_LE[l], kind="stable")
            self.hot[l] = {int(e) for e in order[:q] if self.profile_LE[l, e] > 0}

    def priority(self, layer: int, expert: int) -> float:
        return (1e18 if expert in self.hot[layer] else 0.0) + float(self.last_use_LE[layer, expert])

    def admit(self, layer: int, expert: int, worst_resident: Optional[float]) -> bool:
        if self.profile_LE is None and expert not in self.hot[layer] and len(self.hot[layer]) < self.pin_slots[layer]:
            self.hot[layer].add(expert)  # the first experts seen are pinned, then never replaced
        return expert in self.hot[layer]

    def pinned(self, layer: int) -> Optional[set]:
        return self.hot[layer]


class Predictive(Policy):
    """Keeps what the predictor says the next access of the layer needs; otherwise evicts by a
    decayed frequency (recent use counts more; a one-off expert ages out) with recency as a tie
    break. Without predictions it is a decayed LFU, which beats LRU on real traces."""

    name = "predictive"

    def __init__(self, num_layers: int, num_experts: int, profile_LE: Optional[np.ndarray] = None,
                 decay: float = 0.97, predicted_bonus: float = 1e6):
        super().__init__(num_layers, num_experts)
        self.decay, self.bonus = decay, predicted_bonus
        self.score_LE = np.zeros((num_layers, num_experts), dtype=np.float64)
        if profile_LE is not None:
            p = np.asarray(profile_LE, dtype=np.float64)
            self.score_LE += p / max(1.0, float(p.sum(axis=1).max())) * num_experts
        self.layer_clock = np.zeros(num_layers, dtype=np.int64)
        self.predicted: list[set] = [set() for _ in range(num_layers)]

    def begin_access(self, layer: int, experts: Sequence[int]) -> None:
        super().begin_access(layer, experts)
        self.score_LE[layer] *= self.decay
        for e in experts:
            self.score_LE[layer, e] += 1.0

    def observe_prediction(self, layer: int, predicted: Sequence[int]) -> None:
        self.predicted[layer] = {int(e) for e in predicted}     # holds until the next prediction

    def priority(self, layer: int, expert: int) -> float:
        bonus = self.bonus if expert in self.predicted[layer] else 0.0
        return bonus + float(self.score_LE[layer, expert]) + 1e-9 * float(self.last_use_LE[layer, expert])


class Belady(Policy):
    """Belady's MIN: evict the expert whose next use is farthest (never: first); a miss used later
    than every resident is streamed, not admitted (MIN with bypass, optimal for one layer's slots).

    ``future[l]`` is the sequence of expert lists the accesses of layer ``l`` will ask for, in
    order; the cache must then be driven with exactly that sequence.
    """

    name = "belady"
    offline = True  # an oracle for simulation: needs the future; its bypasses use a scratch slot

    def __init__(self, num_layers: int, num_experts: int, future: Sequence[Sequence[Sequence[int]]]):
        super().__init__(num_layers, num_experts)
        if future is None or len(future) != num_layers:
            raise ValueError("policy 'belady' needs future= (one access sequence per layer)")
        self.uses: list[dict[int, list[int]]] = []
        for seq in future:
            d: dict[int, list[int]] = {}
            for i, experts in enumerate(seq):
                for e in set(int(x) for x in experts):
                    d.setdefault(e, []).append(i)
            self.uses.append(d)
        self.cursor = np.zeros(num_layers, dtype=np.int64)   # index of the current access per layer

    def next_use(self, layer: int, expert: int) -> float:
        """Index of the first access of ``layer`` after the current one that needs ``expert``."""
        u = self.uses[layer].get(expert)
        if not u:
            return NEVER
        i = bisect.bisect_right(u, int(self.cursor[layer]))
        return float(u[i]) if i < len(u) else NEVER

    def priority(self, layer: int, expert: int) -> float:
        return -self.next_use(layer, expert)

    def admit(self, layer: int, expert: int, worst_resident: Optional[float]) -> bool:
        if worst_resident is None:
            return self.next_use(layer, expert) != NEVER
        return self.priority(layer, expert) > worst_resident

    def end_access(self, layer: int, experts: Sequence[int]) -> None:
        super().end_access(layer, experts)
        self.cursor[layer] += 1


POLICIES = ("lru", "lfu", "static", "predictive", "belady")


def make_policy(name: str, num_layers: int, num_experts: int, profile_LE: Optional[np.ndarray] = None,
                future=None) -> Policy:
    """The policy called ``name`` (one of :data:`POLICIES`)."""
    if name == "lru":
        return LRU(num_layers, num_experts)
    if name == "lfu":
        return LFU(num_layers, num_experts, profile_LE)
    if name == "static":
        return Static(num_layers, num_experts, profile_LE)
    if name == "predictive":
        return Predictive(num_layers, num_experts, profile_LE)
    if name == "belady":
        return Belady(num_layers, num_experts, future)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {name!r}")
