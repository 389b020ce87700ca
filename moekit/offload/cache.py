"""ExpertCache: which experts live in the fast tier, under a hard byte budget.

Legend: L MoE layers, E experts per layer, K top-k.

Bookkeeping only: the cache holds no tensors. The runner asks :meth:`ExpertCache.access`
what to do for the experts a layer needs now and loads/frees exactly what it is told, so
the same object drives a real run and a trace replay (:mod:`moekit.offload.simulate`).

Each layer owns a fixed number of slots (its quota): a global LRU over all layers hits 0%
below one token's working set because layers are visited cyclically; per-layer quotas
cannot fall off that cliff. Budget: ``sum_l quota[l] * expert_bytes[l] <= budget_bytes``,
checked after every change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from moekit.offload.policies import POLICIES, Policy, make_policy

__all__ = ["ExpertCache", "AccessResult", "PhaseStats", "split_quotas"]

MiB = 1 << 20


@dataclass
class AccessResult:
    """What the runner must do for one access or prefetch of one layer.

    ``hits``: resident, use them. ``misses``: admitted, load them (they stay resident).
    ``streamed``: needed now but not kept (more distinct experts than the layer's quota, or the
    policy declined them): load, use, free each, one at a time, through the layer's last slot
    (a resident expert may appear here: use it, then free it). ``evicted``: (layer, expert)
    pairs to free *before* loading the misses.
    """

    hits: list[int] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)
    evicted: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class PhaseStats:
    """Counts of one phase (``prefill`` / ``decode``); one expert needed by one access is one
    request (hit, miss or streamed)."""

    hits: int = 0
    misses: int = 0
    streamed: int = 0
    bytes_loaded: int = 0          # demand loads (misses + streamed that were not resident)
    prefetched: int = 0            # experts admitted by prefetch
    prefetch_bytes: int = 0
    prefetch_hits: int = 0         # hits on an expert a prefetch admitted and no access used yet
    accesses: int = 0

    @property
    def requests(self) -> int:
        return self.hits + self.misses + self.streamed

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def total_bytes(self) -> int:
        return self.bytes_loaded + self.prefetch_bytes


def split_quotas(budget_bytes: int, expert_bytes: Sequence[int], num_experts: int, top_k: int,
                 need: Optional[Sequence[float]] = None, start: Optional[int] = None) -> list[int]:
    """Slots per layer: ``start`` (default ``top_k``) each, then one slot at a time to the layer
    with the fewest slots per unit of ``need`` (default: equal) that still fits, up to ``num_experts``."""
    L = len(expert_bytes)
    need_L = np.ones(L) if need is None else np.maximum(np.asarray(need, dtype=np.float64), 1e-9)
    quotas = [min(top_k if start is None else start, num_experts)] * L
    left = budget_bytes - sum(q * b for q, b in zip(quotas, expert_bytes))
    while True:
        best, best_key = -1, None
        for l in range(L):
            if quotas[l] < num_experts and expert_bytes[l] <= left:
                key = (quotas[l] / need_L[l], l)
                if best_key is None or key < best_key:
                    best, best_key = l, key
        if best < 0:
            return quotas
        quotas[best] += 1
        left -= expert_bytes[best]


class ExpertCache:
    """Which (layer, expert) are resident in the fast tier under a hard byte budget. Bookkeeping
    only: it holds no tensors; the runner loads/frees the weights it is told to.

    ``expert_bytes``: bytes of one expert, per layer. ``quotas``: slots per layer (default: the
    budget split evenly, or by per-layer need when ``profile`` is given). ``profile``: ``[L, E]``
    routing counts (pins the ``static`` hot set, warm-starts ``lfu``/``predictive``). ``future``:
    per layer, the expert lists its accesses will ask for (``belady`` only). ``streaming``: allow
    budgets below one token's working set, down to one slot per layer; experts beyond a layer's
    quota then pass through one scratch expert the budget does not count (trace replay of small
    caches; a runner keeps the default, where the scratch is the layer's last slot).
    """

    def __init__(self, budget_bytes: int, expert_bytes: Sequence[int], num_experts: int, top_k: int,
                 policy: str = "predictive", quotas: Optional[Sequence[int]] = None,
                 profile: Optional[np.ndarray] = None, future=None, streaming: bool = False):
        expert_bytes = [int(b) for b in expert_bytes]
        if not expert_bytes or any(b <= 0 for b in expert_bytes):
            raise ValueError(f"expert_bytes must be a non-empty list of positive sizes, got {expert_bytes[:4]}...")
        if num_experts <= 0 or not 0 < top_k <= num_experts:
            raise ValueError(f"need 0 < top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
        budget_bytes = int(budget_bytes)
        minimum = self.min_budget(expert_bytes, 1 if streaming else top_k)
        if budget_bytes < minimum and streaming:
            raise ValueError(f"budget {budget_bytes} bytes ({budget_bytes / MiB:.1f} MiB) is below one expert per "
                             f"layer: the minimum is {minimum} bytes ({minimum / MiB:.1f} MiB)")
        if budget_bytes < minimum:
            raise ValueError(f"budget {budget_bytes} bytes ({budget_bytes / MiB:.1f} MiB) is below one token's "
                             f"working set: the minimum is {minimum} bytes ({minimum / MiB:.1f} MiB) = "
                             f"sum over {len(expert_bytes)} layers of top_k={top_k} x expert bytes")
        L = len(expert_bytes)
        if profile is not None:
            profile = np.asarray(profile, dtype=np.float64)
            if profile.shape != (L, num_experts):
                raise ValueError(f"profile must be [L={L}, E={num_experts}], got {profile.shape}")
        if quotas is None:
            need = None
            if profile is not None:   # distinct experts a layer really uses (perplexity of its load)
                p = profile / np.maximum(profile.sum(axis=1, keepdims=True), 1e-12)
                ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
                need = np.exp(ent)
            quotas = split_quotas(budget_bytes, expert_bytes, num_experts, top_k, need,
                                  start=1 if streaming else None)
        quotas = [int(q) for q in quotas]
        lo = 1 if streaming else top_k
        if len(quotas) != L or any(not lo <= q <= num_experts for q in quotas):
            raise ValueError(f"quotas must give each of the {L} layers between {lo} and "
                             f"num_experts={num_experts} slots, got {quotas}")
        used = sum(q * b for q, b in zip(quotas, expert_bytes))
        if used > budget_bytes:
            raise ValueError(f"quotas need {used} bytes, over the budget of {budget_bytes} bytes")
        self.budget_bytes, self.expert_bytes = budget_bytes, expert_bytes
        self.num_layers, self.num_experts, self.top_k = L, int(num_experts), int(top_k)
        self.quotas = quotas
        self.streaming = bool(streaming)
        self.policy_name = policy
        self.policy: Policy = make_policy(policy, L, num_experts, profile, future)
        if hasattr(self.policy, "set_quotas"):  # what a policy may pin: a slot stays free for streaming
            self.policy.set_quotas(quotas if streaming else [max(q - 1, 0) for q in quotas])
        self._resident: list[set[int]] = [set() for _ in range(L)]
        self._unused_prefetch: list[set[int]] = [set() for _ in range(L)]
        self._in_use: tuple[int, set[int]] = (-1, set())
        self._bytes_used = 0
        self.phase = "decode"
        self.stats: dict[str, PhaseStats] = {"prefill": PhaseStats(), "decode": PhaseStats()}

    # --- sizes ------------------------------------------------------------------------
    @staticmethod
    def min_budget(expert_bytes: Sequence[int], top_k: int) -> int:
        """One token's working set: ``sum_l top_k * expert_bytes[l]``."""
        return int(sum(top_k * int(b) for b in expert_bytes))

    @property
    def bytes_used(self) -> int:
        """Bytes of the resident experts (a streamed expert passes through a reserved slot)."""
        return self._bytes_used

    def resident(self, layer: int) -> set[int]:
        return set(self._resident[layer])

    def set_phase(self, phase: str) -> None:
        """Count the next accesses under ``prefill`` or ``decode``."""
        if phase not in self.stats:
            raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
        self.phase = phase

    # --- decisions --------------------------------------------------------------------
    def access(self, layer: int, experts: Sequence[int]) -> AccessResult:
        """Experts ``layer`` needs now (duplicates allowed). Never evicts one of them."""
        need = self._check(layer, experts)
        st = self.stats[self.phase]
        pol, res, quota = self.policy, self._resident[layer], self.quotas[layer]
        self._in_use = (layer, set(need))
        pol.begin_access(layer, need)
        out = AccessResult()
        hits = [e for e in need if e in res]
        missing = [e for e in need if e not in res]
        if len(need) > quota:
            # keep `keep` (the best hits, then misses by policy), stream the rest through the scratch
            keep = quota if self.streaming else quota - 1
            ranked_hits = sorted(hits, key=lambda e: -pol.priority(layer, e))
            demoted = ranked_hits[keep:]
            hits = ranked_hits[:keep]
            for e in demoted:                       # resident but no longer kept: used, then freed
                res.discard(e)
                self._unused_prefetch[layer].discard(e)
                self._bytes_used -= self.expert_bytes[layer]
            room = keep - len(hits)
            missing.sort(key=lambda e: -pol.priority(layer, e))
            admit_now, stream = missing[:room], missing[room:]
            out.streamed = demoted + stream
        else:
            admit_now, stream = missing, []
        for e in admit_now:
            full = len(res) >= quota
            worst = self._victim(layer, protect=set(need)) if full else None
            worst_p = None if not full else pol.priority(layer, worst)
            if not pol.admit(layer, e, worst_p):
                # a streamed expert needs memory while it is used: a free slot, else the policy's
                # victim goes (simulation modes, `streaming` and offline oracles, use a scratch slot)
                if full and not self.streaming and not getattr(pol, "offline", False):
                    self._evict(layer, worst, out)
                out.streamed.append(e)
                continue
            if full:
                self._evict(layer, worst, out)
            res.add(e)
            self._bytes_used += self.expert_bytes[layer]
            out.misses.append(e)
        if len(need) > quota and not self.streaming:
            # the streamed experts pass through the layer's last slot: free it of residents this access
            # does not use (several tokens' experts, e.g. a batch, after other experts were kept)
            while len(res) > quota - 1:
                worst = self._victim(layer, protect=set(need))
                if worst is None:
                    break
                self._evict(layer, worst, out)
        out.hits = hits
        was = self._was_resident
        loaded_stream = [e for e in out.streamed if e not in was]
        st.accesses += 1
        st.hits += len(need) - len(out.misses) - len(loaded_stream)
        st.misses += len(out.misses)
        st.streamed += len(loaded_stream)
        st.bytes_loaded += (len(out.misses) + len(loaded_stream)) * self.expert_bytes[layer]
        for e in hits:
            if e in self._unused_prefetch[layer]:
                st.prefetch_hits += 1
        self._unused_prefetch[layer] -= set(need)
        pol.end_access(layer, need)
        self._assert_budget()
        return out

    def prefetch(self, layer: int, experts: Sequence[int]) -> AccessResult:
        """Admit ``experts`` of ``layer`` ahead of use, best first; never evicts the experts of the
        access in flight, nor another expert of this prefetch (victims: the policy's lowest first).
        Returns the admitted ones in ``misses`` (possibly fewer than asked) and what to free."""
        want = self._check(layer, experts)
        st = self.stats[self.phase]
        pol, res, quota = self.policy, self._resident[layer], self.quotas[layer]
        in_layer, in_use = self._in_use
        protect = set(want) | (in_use if in_layer == layer else set())
        out = AccessResult()
        for e in want:
            if e in res:
                continue
            if len(res) >= quota:
                worst = self._victim(layer, protect)
                if worst is None:
                    break
                if pol.pinned(layer) and worst in pol.pinned(layer):
                    break
                self._evict(layer, worst, out)
            res.add(e)
            self._bytes_used += self.expert_bytes[layer]
            self._unused_prefetch[layer].add(e)
            out.misses.append(e)
        st.prefetched += len(out.misses)
        st.prefetch_bytes += len(out.misses) * self.expert_bytes[layer]
        pol.on_prefetch(layer, out.misses)
        self._assert_budget()
        return out

    def observe_prediction(self, layer: int, predicted: Sequence[int]) -> None:
        """The experts the next access of ``layer`` is predicted to need (``predictive`` keeps them)."""
        self.policy.observe_prediction(layer, self._check(layer, predicted))

    # --- internals --------------------------------------------------------------------
    def _check(self, layer: int, experts: Sequence[int]) -> list[int]:
        if not 0 <= int(layer) < self.num_layers:
            raise ValueError(f"layer {layer} outside [0, {self.num_layers})")
        out, seen = [], set()
        for e in experts:
            e = int(e)
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert {e} outside [0, {self.num_experts}) in layer {layer}")
            if e not in seen:
                seen.add(e)
                out.append(e)
        self._was_resident = set(self._resident[int(layer)])
        return out

    def _victim(self, layer: int, protect: set[int]) -> Optional[int]:
        pinned = self.policy.pinned(layer) or set()
        cands = [e for e in self._resident[layer] if e not in protect]
        if not cands:
            return None
        free = [e for e in cands if e not in pinned]
        pool = free or cands
        return min(pool, key=lambda e: (self.policy.priority(layer, e), e))

    def _evict(self, layer: int, expert: int, out: AccessResult) -> None:
        self._resident[layer].discard(expert)
        self._unused_prefetch[layer].discard(expert)
        self._bytes_used -= self.expert_bytes[layer]
        out.evicted.append((layer, expert))

    def _assert_budget(self) -> None:
        assert self._bytes_used == sum(len(r) * b for r, b in zip(self._resident, self.expert_bytes))
        assert all(len(r) <= q for r, q in zip(self._resident, self.quotas)), "quota exceeded"
        assert self._bytes_used <= self.budget_bytes, "budget exceeded"
