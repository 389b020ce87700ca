"""Throughput model of offloaded decoding (MoE-Lens-style) and the per-miss cost model
(copy to the fast tier, or compute where the expert lives: Fiddler / llama.cpp ``--n-cpu-moe``).

Legend: L MoE layers, E experts per layer, K top-k, B batch (sequences decoded together).

Everything here is arithmetic on measured rates (:class:`Rates`) and the model's shape
(:class:`ModelShape`); :func:`calibrate` measures the rates of a loaded
:class:`~moekit.offload.runner.OffloadedModel` with short probes that are independent of the
generation being predicted.

Decode step model (one token for each of B sequences), for the workload a cache gives
(``hit_rate``: fraction of expert requests served from the fast tier; ``prefetch_reads``:
experts read ahead per step on the background thread)::

    requests   = L * distinct(B),  distinct(B) = E * (1 - (1 - K/E)^B)
    demand     = requests * (1 - hit_rate)                      experts read on the critical path
    t_read(n)  = n * (latency + expert_bytes / read_bandwidth)
    t_compute  = dense(B) + requests * t_expert(B / distinct(B) tokens per expert) + L * t_access
    t_step     = max(t_compute + t_read(demand),                compute and demand reads are serial
                     t_read(demand) + t_read(prefetch_reads))   the link carries every read once

Without prefetch ``t_step = t_compute + t_read(demand)``.

With overlapped misses (the runtime's default, ``overlap_misses``) a layer's misses are read
while its resident experts compute, and each miss computes once read; with k = requests / L
expert requests per layer and n ~ Binomial(k, 1 - hit_rate) misses in it, the layer's expert
time is ``max((k - n) * t_e, t_read(n)) + n * t_e`` instead of ``k * t_e + t_read(n)``;
``t_compute + t_read(demand)`` above becomes ``dense(B) + L * (E_n[that] + t_access)``
(``demand_read_seconds`` then reports the reads left on the critical path).

Reads on a background thread are taken to cost the compute beside them nothing: a probe that
timed dense steps beside a thread reading experts without pause measured 1.0-1.2 ms of compute
lost per MiB read on a 2-core box, but charging that rate predicted the variants with background
reads 13-30 % slower than they ran (reads in bursts between a layer's computes cost far less than
a reader that never stops), so it was dropped (benchmarks/RESULTS.md).

The bound is ``"io"`` when the link
sets the pace (the prefetch reads take at least the compute they hide under) or the demand
reads take longer than the compute on the critical path, else ``"compute"``; the I/O bound
(tokens/s if reading were all the work) is ``B / t_read(demand + prefetch)`` and the compute
bound ``B / t_compute``.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

__all__ = ["Rates", "ModelShape", "Prediction", "predict_decode", "distinct_experts", "MissCostModel",
           "calibrate"]


@dataclass
class Rates:
    """Measured rates. ``read_bandwidth``: slow tier -> fast tier bytes/s while reading one
    expert (disk -> RAM on CPU, host -> device on a GPU); ``read_latency``: fixed seconds per
    expert read (syscall, crc, allocation); ``dense_seconds``: the non-expert part of one
    decode step at batch ``dense_batch`` (attention, norms, routers, dispatch, shared expert,
    LM head); ``expert_seconds``: one expert's MLP on one token (``expert_seconds_per_token``
    added per further token); ``slow_compute_factor``: host compute time / fast-tier compute
    time of the same expert (1.0 on a CPU-only machine); ``h2d_bandwidth``: bytes/s to move
    activations between host and device (for the miss decision on a GPU); ``access_seconds``:
    the cache's bookkeeping per layer access (policy, residency; host Python, on the critical
    path of every MoE layer of every step)."""

    read_bandwidth: float
    dense_seconds: float
    expert_seconds: float
    read_latency: float = 0.0
    expert_seconds_per_token: float = 0.0
    dense_batch: int = 1
    slow_compute_factor: float = 1.0
    h2d_bandwidth: Optional[float] = None
    access_seconds: float = 0.0

    def __post_init__(self):
        for name in ("read_bandwidth", "dense_seconds", "expert_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"Rates.{name} must be a positive number, got {v!r}")
        if self.read_latency < 0 or self.expert_seconds_per_token < 0 or self.access_seconds < 0:
            raise ValueError("Rates.read_latency, expert_seconds_per_token and access_seconds must be >= 0")

    def read_seconds(self, n_experts: float, expert_bytes: float) -> float:
        return n_experts * (self.read_latency + expert_bytes / self.read_bandwidth)

    def expert_compute_seconds(self, tokens: float) -> float:
        return self.expert_seconds + max(tokens - 1.0, 0.0) * self.expert_seconds_per_token


@dataclass
class ModelShape:
    """``expert_bytes``: bytes of one expert (mean over MoE layers when they differ)."""

    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: float

    def __post_init__(self):
        if self.num_layers < 1 or not 0 < self.top_k <= self.num_experts or self.expert_bytes <= 0:
            raise ValueError(f"ModelShape needs L >= 1, 0 < K <= E and expert_bytes > 0, got {self}")

    @classmethod
    def of_store(cls, index) -> "ModelShape":
        b = index.expert_bytes
        return cls(len(b), index.num_experts, index.top_k, sum(b) / len(b))


@dataclass
class Prediction:
    tokens_per_s: float          # predicted decode tokens/s (all B sequences)
    bound: str                   # "io" or "compute"
    io_bound_tokens_per_s: float  # if reading were all the work (inf when nothing is read)
    compute_bound_tokens_per_s: float
    step_seconds: float
    compute_seconds: float
    demand_read_seconds: float
    prefetch_read_seconds: float
    bytes_per_token: float       # read from the slow tier per decoded token

    def as_dict(self) -> dict:
        return asdict(self)


def distinct_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts a layer uses for ``batch`` tokens routed uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def _overlapped_layer_seconds(k: float, p_miss: float, t_e: float, t_r: float) -> tuple[float, float]:
    """(expected expert seconds of a layer with overlapped misses, of which reads on the critical
    path) for k requests, each a miss with probability ``p_miss`` (k rounded to an int for the
    binomial, the result scaled back by k / round(k))."""
    n_req = max(int(round(k)), 1)
    total = exposed = 0.0
    for n in range(n_req + 1):
        w = math.comb(n_req, n) * p_miss ** n * (1.0 - p_miss) ** (n_req - n)
        hidden_under = (n_req - n) * t_e
        total += w * (max(hidden_under, n * t_r) + n * t_e)
        exposed += w * max(n * t_r - hidden_under, 0.0)
    scale = k / n_req
    return total * scale, exposed * scale


def predict_decode(shape: ModelShape, rates: Rates, *, hit_rate: float, batch: int = 1,
                   prefetch_reads: float = 0.0, requests: Optional[float] = None,
                   overlap_misses: bool = False) -> Prediction:
    """Predicted decode throughput (see the module docstring). ``hit_rate``: measured or
    expected fraction of expert requests served from the fast tier (prefetched experts that
    arrive in time count as hits). ``prefetch_reads``: experts read per step in the
    background (0 without prefetch). ``requests``: expert requests per step (default
    ``L * distinct(B)``). ``overlap_misses``: misses read while the layer's resident experts
    compute (the runtime's default)."""
    if not 0.0 <= hit_rate <= 1.0:
        raise ValueError(f"hit_rate must be in [0, 1], got {hit_rate}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if prefetch_reads < 0:
        raise ValueError(f"prefetch_reads must be >= 0, got {prefetch_reads}")
    per_layer = distinct_experts(shape.num_experts, shape.top_k, batch)
    req = shape.num_layers * per_layer if requests is None else float(requests)
    demand = req * (1.0 - hit_rate)
    t_dense = rates.dense_seconds * batch / max(rates.dense_batch, 1)
    t_compute = t_dense + req * rates.expert_compute_seconds(batch * shape.top_k / max(per_layer, 1e-12)) \
        + shape.num_layers * rates.access_seconds
    t_demand = rates.read_seconds(demand, shape.expert_bytes)
    t_pref = rates.read_seconds(prefetch_reads, shape.expert_bytes)
    t_serial = t_compute + t_demand
    if overlap_misses and demand > 0:
        t_e = rates.expert_compute_seconds(batch * shape.top_k / max(per_layer, 1e-12))
        layer_s, exposed_s = _overlapped_layer_seconds(req / shape.num_layers, 1.0 - hit_rate, t_e,
                                                       rates.read_seconds(1, shape.expert_bytes))
        t_serial = t_dense + shape.num_layers * (layer_s + rates.access_seconds)
        t_demand_exposed = shape.num_layers * exposed_s
    else:
        t_demand_exposed = t_demand
    t_step = max(t_serial, t_demand + t_pref)
    t_io = t_demand + t_pref
    return Prediction(
        tokens_per_s=batch / t_step,
        bound="io" if (t_pref >= t_compute or t_demand > t_compute) else "compute",
        io_bound_tokens_per_s=batch / t_io if t_io > 0 else math.inf,
        compute_bound_tokens_per_s=batch / t_compute,
        step_seconds=t_step, compute_seconds=t_compute, demand_read_seconds=t_demand_exposed,
        prefetch_read_seconds=t_pref,
        bytes_per_token=(demand + prefetch_reads) * shape.expert_bytes / batch)


# ---- per-miss decision ----------------------------------------------------------------------------

class MissCostModel:
    """Per miss: copy the expert to the fast tier, or compute it where it lives.

    For ``tokens`` rows of hidden size ``hidden_size`` (``act_bytes`` per element)::

        copy         = expert_bytes / read_bandwidth + read_latency + t_expert(tokens)
        compute_slow = slow_compute_factor * t_expert(tokens) + 2 * tokens * hidden * act_bytes / h2d_bandwidth
        reuse gain   = p_reuse * (min(copy, compute_slow) - t_expert(tokens))

    ``decide`` answers ``"copy"`` when ``copy - gain <= compute_slow`` (a copied expert stays
    resident, so its next use is a hit with probability ``p_reuse``), else ``"compute_slow"``.
    ``p_reuse`` is the layer's measured hit rate so far when a cache is given (the chance the
    next access finds a kept expert still useful), else ``default_reuse``.

    Honest scope: on a CPU-only machine both tiers are host memory, so computing where the
    expert lives only applies to a GPU over a RAM tier (weights in pinned host memory,
    computed by the CPU instead of copied). The decision function is unit-tested on given
    rates; the runtime path that uses it (``device="cuda"``, ``tier="ram"``) has not been
    run on a GPU in this repository's tests.
    """

    def __init__(self, rates: Rates, expert_bytes: Sequence[float], hidden_size: int, act_bytes: int = 2,
                 default_reuse: float = 0.0):
        if rates.h2d_bandwidth is None or rates.h2d_bandwidth <= 0:
            raise ValueError("MissCostModel needs Rates.h2d_bandwidth (activation transfers host <-> device)")
        self.rates = rates
        self.expert_bytes = [float(b) for b in expert_bytes]
        self.hidden_size, self.act_bytes = int(hidden_size), int(act_bytes)
        self.default_reuse = float(default_reuse)

    def costs(self, layer: int, tokens: int) -> tuple[float, float]:
        """(copy seconds, compute-where-it-lives seconds) for ``tokens`` rows of ``layer``."""
        r = self.rates
        t_fast = r.expert_compute_seconds(tokens)
        copy = self.expert_bytes[layer] / r.read_bandwidth + r.read_latency + t_fast
        move = 2.0 * tokens * self.hidden_size * self.act_bytes / r.h2d_bandwidth
        return copy, r.slow_compute_factor * t_fast + move

    def decide(self, layer: int, tokens: int, cache=None, p_reuse: Optional[float] = None) -> str:
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        if p_reuse is None:
            p_reuse = self.default_reuse
            if cache is not None:
                st = cache.stats[cache.phase]
                p_reuse = st.hit_rate if st.requests else self.default_reuse
        copy, slow = self.costs(layer, tokens)
        gain = p_reuse * (min(copy, slow) - self.rates.expert_compute_seconds(tokens))
        return "copy" if copy - gain <= slow else "compute_slow"


# ---- calibration --------------------------------------------------------------------------------

def _median_time(fn, repeat: int) -> float:
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _mean_time(fn, repeat: int) -> float:
    """Mean seconds of ``fn`` over ``repeat`` calls: what a throughput pays (a median drops the
    slow calls a shared or busy machine makes, and under-predicts step times)."""
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def _access_seconds(cache, repeat: int = 64, seed: int = 0) -> float:
    """Mean seconds of one :meth:`ExpertCache.access` of top-k experts, on a scratch cache of the same
    budget, quotas and policy (the run's cache is left alone), after a warm-up that fills it."""
    import random

    from moekit.offload.cache import ExpertCache

    scratch = ExpertCache(cache.budget_bytes, cache.expert_bytes, cache.num_experts, cache.top_k,
                          policy=cache.policy_name if cache.policy_name != "belady" else "lru", quotas=cache.quotas)
    rng = random.Random(seed)
    L, E, K = cache.num_layers, cache.num_experts, cache.top_k
    sets = [(i % L, rng.sample(range(E), K)) for i in range(2 * repeat)]
    for layer, ex in sets[:repeat]:
        scratch.access(layer, ex)
    t0 = time.perf_counter()
    for layer, ex in sets[repeat:]:
        if cache.policy_name == "predictive":
            scratch.observe_prediction(layer, ex)
        scratch.access(layer, ex)
    return (time.perf_counter() - t0) / repeat


def calibrate(om, *, reads: int = 16, repeat: int = 7, context: int = 16, batch: int = 1) -> Rates:
    """Measure the rates of ``om`` (an :class:`~moekit.offload.runner.OffloadedModel`) with
    probes that do not touch its cache or counters:

    - reads: ``reads`` experts read from the store in its page-cache mode, spread over the
      layers (the slowest expert sizes included); bandwidth = bytes / seconds of the reads,
      the latency term from one small and one large read is left at 0 (one expert size per
      model): the bandwidth then includes per-read overheads, which is what a miss costs.
    - one expert's MLP on 1 and 2 rows (mean), on the compute device, cycling through the
      experts just read so the weights come from memory as in a decode step, not from a warm
      CPU cache (a 1-row MLP is memory-bound: timing one warm expert underestimates it ~several x);
    - the dense part: a 1-token forward at ``context`` tokens of KV cache, with the experts
      returning zeros (``runtime.dry``), mean of ``repeat``; prefetch hooks are paused;
    - the cache's bookkeeping per layer access, on a scratch cache of the same quotas and
      policy (:func:`_access_seconds`).
    Means, not medians: a throughput pays for the slow calls too.
    """
    import torch

    from moekit.offload.experts import ExpertWeights, _expert_mlp

    rt, store = om.runtime, om.store
    idx = store.index
    L, E = len(idx.layers), idx.num_experts
    # reads: experts nobody holds, in this store's page-cache mode
    seen, t_read, nbytes = 0, 0.0, 0
    w = None
    held = []
    for i in range(reads):
        layer, e = i % L, (i * 7 + 3) % E
        t0 = time.perf_counter()
        w = store.read(layer, e, None if rt.device.type == "cpu" else rt.device)
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        t_read += time.perf_counter() - t0
        nbytes += ExpertWeights.nbytes(w)
        held.append(w)
        seen += 1
    # the store's counters are the run's: take these reads back out
    if hasattr(store, "_lock"):
        with store._lock:
            store.bytes_read -= nbytes
            store.reads -= seen
            store.read_seconds -= t_read
    bandwidth = nbytes / t_read
    D = w[1].shape[0]
    dtype = w[0].dtype
    x1 = torch.randn(1, D, dtype=dtype, device=w[0].device)
    x2 = torch.randn(2, D, dtype=dtype, device=w[0].device)
    sync = (lambda: torch.cuda.synchronize(rt.device)) if rt.device.type == "cuda" else (lambda: None)
    # a decode step's expert MLP is memory-bound on weights that are not in the CPU's caches:
    # time it cycling through the experts just read (each used once per round), not one warm one
    turn = [0]

    def mlp(x):
        turn[0] += 1
        _expert_mlp(x, held[turn[0] % len(held)], rt.activation)
        sync()

    with torch.no_grad():
        for _ in range(2):
            mlp(x1)
        t1 = _mean_time(lambda: mlp(x1), max(repeat * 4, 2 * len(held)))
        t2 = _mean_time(lambda: mlp(x2), max(repeat * 4, 2 * len(held)))
    del w, held
    # dense part: experts dry, prefetch paused, one decode step after `context` tokens
    model = om.model
    vocab = int(getattr(model.config, "vocab_size", 2))
    ctx = torch.randint(0, vocab, (batch, context), device=om.device)
    step = torch.randint(0, vocab, (batch, 1), device=om.device)
    prefetcher = getattr(om, "prefetcher", None)
    hooks_were = om._calibrating
    om._calibrating = True
    rt.dry = True
    if prefetcher is not None:
        prefetcher.paused = True
    try:
        import inspect

        kv_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model(ctx, use_cache=True)
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)

            def one():
                model(step, use_cache=True, **{kv_name: past})
                past.crop(-1)  # the KV cache grew by one token: every probe sees `context` tokens
                sync()

            one()
            dense = _mean_time(one, repeat)
    finally:
        rt.dry = False
        om._calibrating = hooks_were
        if prefetcher is not None:
            prefetcher.paused = False
    h2d = bandwidth if rt.device.type == "cuda" else None
    return Rates(read_bandwidth=bandwidth, dense_seconds=dense, expert_seconds=t1,
                 expert_seconds_per_token=max(t2 - t1, 0.0), dense_batch=batch, h2d_bandwidth=h2d,
                 access_seconds=_access_seconds(om.cache))
