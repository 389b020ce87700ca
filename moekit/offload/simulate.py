"""Replay a routing trace through :class:`ExpertCache` and report hit rates per phase.

Legend: L MoE layers, E experts, K top-k, T tokens.

Access order (what a llama.cpp-style runtime does, and what the route_trace recorder logged):
prefill is one batched access per layer (the distinct experts of all prompt tokens, layer 0
to L-1); decode is one access per (token, layer) in (step, layer) order. A request is one
expert needed by one access.

Check of the replay itself: the recording device's cache is a *global* LRU over all layers
under one byte budget (:func:`replay_global_lru`). At 4000 MiB on ``qwen.route.csv`` it agrees
with the file's ``residency`` column on 99.99% of decode rows, and its cumulative hit rate
(prefill + decode requests) is the published 74.9% (76.8% on gemma).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from moekit.offload.cache import ExpertCache, PhaseStats
from moekit.planner.traces import RoutingTrace, read_trace

__all__ = ["Access", "SimResult", "accesses", "expert_bytes_of", "simulate", "replay_accesses", "replay_global_lru",
           "replay_global_belady", "load_trace", "parse_bytes", "format_table"]

MiB = 1 << 20


@dataclass(frozen=True)
class Access:
    phase: str           # "prefill" | "decode"
    layer: int
    experts: tuple       # distinct expert ids, in routing order
    token: int           # decode token index (row of the trace); -1 for a prefill batch


@dataclass
class SimResult:
    policy: str
    budget_bytes: int
    hit_rate_prefill: float
    hit_rate_decode: float
    bytes_per_decode_token: float     # demand loads + prefetches, per decode token
    hit_rate_cumulative: float        # all requests, prefill + decode
    decode_tokens: int
    prefetch_bytes_per_decode_token: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def load_trace(path) -> RoutingTrace:
    """A trace through the planner's reader (``TraceFormatError`` names the file and line)."""
    return read_trace(path)


def parse_bytes(text: str) -> int:
    """'2000MiB', '2GiB', '500MB', '1.5GB', '123456' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
             "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = str(text).strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"cannot read a byte size from {text!r} (examples: 2000MiB, 2GiB, 500MB)") from None
    if unit not in units or value <= 0:
        raise ValueError(f"cannot read a byte size from {text!r} (examples: 2000MiB, 2GiB, 500MB)")
    return int(value * units[unit])


def expert_bytes_of(trace: RoutingTrace) -> list[int]:
    eb = trace.meta.get("expert_bytes")
    if not eb or any(int(b) <= 0 for b in eb):
        raise ValueError(f"trace {trace.meta.get('source')} has no per-layer expert_bytes; pass expert_bytes=")
    return [int(b) for b in eb]


def accesses(trace: RoutingTrace) -> list[Access]:
    """The trace as cache accesses: prefill batched per layer, then decode per (token, layer).
    A trace without ``meta['phase']`` (moekit's .npz) is all decode."""
    if not trace.aligned:
        raise ValueError("cache replay needs an aligned trace (the same row is the same token in every layer)")
    T = trace.num_tokens[0]
    phase = np.asarray(trace.meta.get("phase") or [1] * T)
    ids_LTK = np.stack(trace.topk_ids)
    out: list[Access] = []
    pre = np.nonzero(phase == 0)[0]
    if pre.size:
        for l in range(trace.num_layers):
            seen = dict.fromkeys(int(e) for e in ids_LTK[l, pre].ravel() if e >= 0)
            out.append(Access("prefill", l, tuple(seen), -1))
    for t in np.nonzero(phase != 0)[0]:
        for l in range(trace.num_layers):
            seen = dict.fromkeys(int(e) for e in ids_LTK[l, t] if e >= 0)
            out.append(Access("decode", l, tuple(seen), int(t)))
    return out


def _future(acc: list[Access], L: int) -> list[list[tuple]]:
    fut: list[list[tuple]] = [[] for _ in range(L)]
    for a in acc:
        fut[a.layer].append(a.experts)
    return fut


def _profile(acc: list[Access], L: int, E: int) -> np.ndarray:
    p = np.zeros((L, E))
    for a in acc:
        p[a.layer, list(a.experts)] += 1
    return p


def _result(policy: str, budget: int, stats: dict[str, PhaseStats], n_decode: int) -> SimResult:
    pre, dec = stats["prefill"], stats["decode"]
    req = pre.requests + dec.requests
    return SimResult(policy, int(budget), pre.hit_rate, dec.hit_rate,
                     dec.total_bytes / max(n_decode, 1), (pre.hits + dec.hits) / req if req else 0.0,
                     n_decode, dec.prefetch_bytes / max(n_decode, 1))


def simulate(trace: RoutingTrace, budget_bytes: int, policy: str = "predictive", *,
             expert_bytes: Optional[Sequence[int]] = None, profile: Optional[np.ndarray] = None,
             predictor=None, streaming: bool = True, prefetch: int = 0, prefetch_threshold: float = 0.0,
             path_predictor=None, train: Optional[np.ndarray] = None) -> SimResult:
    """Replay ``trace`` through an :class:`ExpertCache` with per-layer quotas.

    ``profile``: ``[L, E]`` counts for ``static``/``lfu`` (default for ``static``: the trace's
    own counts, i.e. a hindsight pin). ``streaming``: allow budgets below one token's working set
    (extra experts streamed).

    ``predictive`` only. Eviction: ``predictor`` (default: a
    :class:`~moekit.offload.predict.PathPredictor` learned online from the replay so far) names
    the experts the next token is expected to need in a layer, which the cache keeps.
    Prefetch (``prefetch`` > 0): after each decode access of layer l, up to ``prefetch`` experts
    of layer l+1 that ``path_predictor`` (default: a new
    :class:`~moekit.offload.predict.WholePathPredictor`) predicts for the token in flight with an
    estimated probability of at least ``prefetch_threshold`` are admitted ahead of use; their
    reads count in ``bytes_per_decode_token`` (a wrong guess costs a read, and maybe a later
    miss). The whole-path predictor records ``train`` (``[L, T, K]`` routes recorded elsewhere,
    never this replay's decode tokens) first, the prompt's per-token paths once the prefill is
    done, and each decode token once all its layers were routed: nothing of a token is known
    before it is routed. A :class:`~moekit.offload.predict.PathPredictor` passed as
    ``path_predictor`` prefetches its top ``prefetch`` from co-activation counts instead.
    """
    from moekit.offload.predict import PathPredictor, WholePathPredictor

    eb = list(expert_bytes) if expert_bytes is not None else expert_bytes_of(trace)
    L, E, K = trace.num_layers, trace.num_experts, trace.top_k
    acc = accesses(trace)
    if policy == "static" and profile is None:
        profile = _profile(acc, L, E)
    cache = ExpertCache(budget_bytes, eb, E, K, policy=policy, profile=profile,
                        future=_future(acc, L) if policy == "belady" else None, streaming=streaming)
    predictive = policy == "predictive"
    if predictive and predictor is None:
        predictor = PathPredictor(L, E, K)
    pf = path_predictor
    if predictive and prefetch and pf is None:
        pf = WholePathPredictor(L, E, K)
    whole = isinstance(pf, WholePathPredictor) and predictive and prefetch > 0
    if whole:
        if train is not None:
            pf.fit(train)
            pf.new_sequence()
        phase = np.asarray(trace.meta.get("phase") or [1] * trace.num_tokens[0])
        prompt_LTK = np.stack(trace.topk_ids)[:, phase == 0]
    prev_layer: tuple = ()
    prompt_done = False
    for a in acc:
        cache.set_phase(a.phase)
        if predictive and a.phase == "decode":
            if whole and not prompt_done:
                if prompt_LTK.shape[1]:
                    pf.fit(prompt_LTK)           # the prompt was routed: its per-token paths are known
                    pf.last_LE = pf._paths_TLE[pf.n - 1]
                prompt_done = True
            cache.observe_prediction(a.layer, predictor.predict_next(a.layer, a.experts, prev_layer))
        cache.access(a.layer, a.experts)
        if predictive and a.phase == "decode":
            predictor.update(a.layer, a.experts, prev_layer)
            if pf is not None and not whole and pf is not predictor:
                pf.update(a.layer, a.experts, prev_layer)
            if whole:
                pf.observe(a.layer, a.experts)
                if a.layer + 1 < L:
                    s = pf.scores(a.layer + 1)
                    guess = [int(e) for e in np.argsort(-s, kind="stable")[:prefetch]
                             if s[e] > 0 and s[e] >= prefetch_threshold]
                    if guess:
                        cache.prefetch(a.layer + 1, guess)
                else:
                    pf.end_token()
            elif prefetch and a.layer + 1 < L:
                src = pf if pf is not None else predictor
                guess = src.predict(a.layer + 1, a.experts, src.last[a.layer + 1], n=prefetch)
                cache.prefetch(a.layer + 1, guess)
        prev_layer = a.experts
    n_dec = len({a.token for a in acc if a.phase == "decode"})
    return _result(policy, budget_bytes, cache.stats, n_dec)


def replay_accesses(acc: Sequence[Access], budget_bytes: int, expert_bytes: Sequence[int], num_experts: int,
                    top_k: int, policy: str = "predictive", *, decode_tokens: Optional[int] = None,
                    profile: Optional[np.ndarray] = None, streaming: bool = True) -> SimResult:
    """Replay an access list built elsewhere (e.g. batched passes,
    :func:`moekit.offload.schedule.batch_accesses`) through an :class:`ExpertCache` with
    per-layer quotas, demand loads only; the same loop as :func:`simulate` without prefetch
    (``predictive``: a :class:`~moekit.offload.predict.PathPredictor` learned online, ``static``:
    the accesses' own counts unless ``profile``, ``belady``: the accesses' future).
    ``decode_tokens``: tokens the decode accesses serve (default: distinct ``Access.token``)."""
    from moekit.offload.predict import PathPredictor

    L = len(expert_bytes)
    acc = list(acc)
    if policy == "static" and profile is None:
        profile = _profile(acc, L, num_experts)
    cache = ExpertCache(budget_bytes, expert_bytes, num_experts, top_k, policy=policy, profile=profile,
                        future=_future(acc, L) if policy == "belady" else None, streaming=streaming)
    predictor = PathPredictor(L, num_experts, top_k) if policy == "predictive" else None
    prev_layer: tuple = ()
    for a in acc:
        cache.set_phase(a.phase)
        if predictor is not None and a.phase == "decode":
            cache.observe_prediction(a.layer, predictor.predict_next(a.layer, a.experts, prev_layer))
        cache.access(a.layer, a.experts)
        if predictor is not None and a.phase == "decode":
            predictor.update(a.layer, a.experts, prev_layer)
        prev_layer = a.experts
    n_dec = decode_tokens if decode_tokens is not None else len({a.token for a in acc if a.phase == "decode"})
    return _result(policy, budget_bytes, cache.stats, n_dec)


def replay_global_lru(trace: RoutingTrace, budget_bytes: int,
                      expert_bytes: Optional[Sequence[int]] = None) -> SimResult:
    """One LRU over all (layer, expert) under one byte budget (the recording device's cache):
    evicts least recent entries until the miss fits; hits 0% below a token's working set."""
    eb = list(expert_bytes) if expert_bytes is not None else expert_bytes_of(trace)
    acc = accesses(trace)
    lru: OrderedDict = OrderedDict()
    used = 0
    stats = {"prefill": PhaseStats(), "decode": PhaseStats()}
    for a in acc:
        st = stats[a.phase]
        for e in a.experts:
            key = (a.layer, e)
            if key in lru:
                lru.move_to_end(key)
                st.hits += 1
                continue
            b = eb[a.layer]
            while used + b > budget_bytes and lru:
                used -= eb[lru.popitem(last=False)[0][0]]
            st.misses += 1
            st.bytes_loaded += b
            if used + b <= budget_bytes:
                lru[key] = True
                used += b
            assert used <= budget_bytes
    n_dec = len({a.token for a in acc if a.phase == "decode"})
    return _result("lru-global", budget_bytes, stats, n_dec)


def replay_global_belady(trace: RoutingTrace, budget_bytes: int,
                         expert_bytes: Optional[Sequence[int]] = None) -> SimResult:
    """Belady's MIN over all (layer, expert) under one byte budget, with bypass: on a miss,
    evict the entries used farthest in the future while the miss is used sooner than them.
    (With unequal expert sizes this is the classic heuristic, not a proven optimum.)"""
    import bisect

    eb = list(expert_bytes) if expert_bytes is not None else expert_bytes_of(trace)
    acc = accesses(trace)
    uses: dict = {}
    for i, a in enumerate(acc):
        for e in a.experts:
            uses.setdefault((a.layer, e), []).append(i)

    def next_use(key, i):
        u = uses[key]
        j = bisect.bisect_right(u, i)
        return u[j] if j < len(u) else float("inf")

    res: set = set()
    used = 0
    stats = {"prefill": PhaseStats(), "decode": PhaseStats()}
    for i, a in enumerate(acc):
        st = stats[a.phase]
        need = {(a.layer, e) for e in a.experts}
        for key in need:
            if key in res:
                st.hits += 1
                continue
            st.misses += 1
            b = eb[a.layer]
            st.bytes_loaded += b
            mine = next_use(key, i)
            if mine == float("inf"):
                continue
            cands = sorted((k for k in res if k not in need), key=lambda k: -next_use(k, i))
            victims, free = [], budget_bytes - used
            for k in cands:
                if free >= b or next_use(k, i) <= mine:
                    break
                victims.append(k)
                free += eb[k[0]]
            if free >= b:
                for k in victims:
                    res.discard(k)
                    used -= eb[k[0]]
                res.add(key)
                used += b
            assert used <= budget_bytes
    n_dec = len({a.token for a in acc if a.phase == "decode"})
    return _result("belady-global", budget_bytes, stats, n_dec)


def format_table(results: list[SimResult], belady: Optional[dict] = None) -> str:
    """Text table; ``belady`` maps budget -> Belady decode hit rate for the gap column."""
    head = f"{'policy':<18}{'budget MiB':>11}{'prefill hit':>12}{'decode hit':>11}{'MiB/dec tok':>12}{'gap to MIN':>11}"
    lines = [head, "-" * len(head)]
    for r in results:
        gap = ""
        if belady and r.budget_bytes in belady:
            gap = f"{100 * (belady[r.budget_bytes] - r.hit_rate_decode):.1f} pt"
        lines.append(f"{r.policy:<18}{r.budget_bytes / MiB:>11.0f}{100 * r.hit_rate_prefill:>11.1f}%"
                     f"{100 * r.hit_rate_decode:>10.1f}%{r.bytes_per_decode_token / MiB:>12.1f}{gap:>11}")
    return "\n".join(lines)


def results_json(results: list[SimResult]) -> str:
    return json.dumps([r.to_json() for r in results])
