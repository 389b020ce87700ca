"""Offloaded experts: a MoELayer's experts module whose weights live in an expert store and
come into the fast tier as an :class:`~moekit.offload.ExpertCache` decides.

Legend: N rows sorted by expert, D model dim, F expert hidden dim, H = 2F (GLU) or F, E experts.

:class:`OffloadedExperts` sits behind the one compute signature of the experts seam,
``forward(x_ND, tokens_per_expert_E) -> y_ND`` (see :mod:`moekit.experts`), so routing,
dispatch, combine and the shared expert stay the plain :class:`~moekit.layer.MoELayer`'s. Per
forward, for the experts that got tokens, it asks the cache (``access``), frees what the cache
evicted, loads the misses (kept) and streams the rest (load, use, free, one at a time), and
computes each expert with the ``loop`` backend's math on that expert's weights, so the output
equals the in-memory layer with ``backend="loop"`` bit for bit.

The weights held in the fast tier are in one :class:`ExpertWeights` (a dict keyed by
``(layer, expert)`` plus byte accounting) that the caller owns and shares between the layers
of one model; nothing is global.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moekit.kernels.activations import activation_ref

__all__ = ["ExpertWeights", "OffloadRuntime", "OffloadedExperts"]


class ExpertWeights:
    """The experts held in the fast tier: ``held[(layer, expert)] = (w_in_HD, w_out_DF)``, with
    the bytes held now (resident, reserved for a prefetch in flight, plus an expert streaming
    through) and the peak since :meth:`reset_peak`: the measured side of the cache's budget.

    A prefetch reserves its expert's bytes when it is issued (:meth:`reserve`), before the
    background read allocates the buffer, and keeps them counted until the weights are used
    (:meth:`fill`) or dropped (:meth:`unreserve`): in-flight buffers count against the budget."""

    def __init__(self):
        self.held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reserved: dict[tuple[int, int], int] = {}
        self.bytes_held = 0
        self.peak_bytes = 0
        self._transient = 0

    @staticmethod
    def nbytes(w: tuple[torch.Tensor, torch.Tensor]) -> int:
        return w[0].numel() * w[0].element_size() + w[1].numel() * w[1].element_size()

    def put(self, key: tuple[int, int], w: tuple[torch.Tensor, torch.Tensor]) -> None:
        assert key not in self.held and key not in self.reserved, f"expert {key} loaded twice"
        self.held[key] = w
        self._add(self.nbytes(w))

    def pop(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.held.pop(key)
        self.bytes_held -= self.nbytes(w)
        return w

    def reserve(self, key: tuple[int, int], nbytes: int) -> None:
        """Count ``nbytes`` for a prefetch of ``key`` in flight (the buffer is being read)."""
        assert key not in self.held and key not in self.reserved, f"expert {key} prefetched twice"
        self.reserved[key] = int(nbytes)
        self._add(int(nbytes))

    def fill(self, key: tuple[int, int], w: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The prefetch of ``key`` arrived: hold ``w`` under the bytes reserved for it."""
        n = self.reserved.pop(key)
        assert n == self.nbytes(w), f"expert {key}: reserved {n} bytes, read {self.nbytes(w)}"
        self.held[key] = w

    def unreserve(self, key: tuple[int, int]) -> None:
        """The prefetch of ``key`` was dropped before use (evicted or cancelled)."""
        self.bytes_held -= self.reserved.pop(key)

    def hold_transient(self, w: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Count a streamed expert while it is in use; returns its bytes for :meth:`release`."""
        n = self.nbytes(w)
        self._add(n)
        return n

    def release(self, n: int) -> None:
        self.bytes_held -= n

    def _add(self, n: int) -> None:
        self.bytes_held += n
        self.peak_bytes = max(self.peak_bytes, self.bytes_held)

    def reset_peak(self) -> None:
        self.peak_bytes = self.bytes_held

    def resident(self, layer: int) -> set[int]:
        """Experts of ``layer`` held or on their way (a prefetch in flight)."""
        return {e for (l, e) in self.held if l == layer} | {e for (l, e) in self.reserved if l == layer}

    def clear(self) -> None:
        self.held.clear()
        self.reserved.clear()
        self.bytes_held = 0


@dataclass
class LoadStats:
    """Work done by the runtime (the cache's stats count decisions; these count work).

    ``loads``/``bytes_loaded``: demand loads; ``load_seconds``: the calling thread's time on
    them (the whole read when synchronous; with overlapped misses only the wait for a read
    still in flight once the layer's resident experts are computed, the read itself being
    ``miss_read_seconds`` on the reader thread).
    ``prefetch_*``: background reads (``prefetch_read_seconds`` on the worker, overlapped with
    compute), ``prefetch_wait_seconds``: the calling thread blocked on a prefetch not yet
    arrived, ``prefetch_dropped``: prefetched experts evicted before any use.
    ``slow_tier_computes``: misses computed where the expert lives instead of copied (see
    :class:`~moekit.offload.throughput.MissCostModel`)."""

    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    forwards: int = 0
    prefetch_loads: int = 0
    prefetch_bytes: int = 0
    prefetch_read_seconds: float = 0.0
    prefetch_wait_seconds: float = 0.0
    prefetch_dropped: int = 0
    slow_tier_computes: int = 0
    slow_tier_seconds: float = 0.0
    miss_read_seconds: float = 0.0


class OffloadRuntime:
    """What the offloaded experts of one model share: the store (slow tier), the cache
    (decisions), the held weights (fast tier), the compute device and activation.

    Prefetch (:meth:`prefetch_async`): the cache decides on the calling thread (admission,
    evictions), the weights dict is changed on the calling thread only, and one background
    worker thread does nothing but the reads (``pread`` releases the GIL; on CUDA the copy runs
    on a side stream and the consumer waits on its event). A prefetched expert is in
    ``pending`` until an access needs it (:meth:`_resolve` waits for it) or an eviction drops
    it; its bytes are reserved in :class:`ExpertWeights` from the moment it is issued.

    ``miss_model``: optional :class:`~moekit.offload.throughput.MissCostModel`; when set (CUDA
    device over a RAM tier) a miss whose copy would cost more than computing it on the CPU
    where it lives is computed there (Fiddler / llama.cpp ``--n-cpu-moe``).

    ``overlap_misses``: a layer's misses are read on a reader thread of their own (not queued
    behind speculative prefetches) while the layer's resident experts compute, and each miss is
    computed when its read lands; off, each miss is read on the calling thread before any
    expert of the layer computes (plain on-demand loading). Same results either way: every
    expert's rows are computed from the same weights by the same ops."""

    def __init__(self, store, cache, weights: Optional[ExpertWeights] = None, *, device="cpu",
                 activation: str = "swiglu", check_invariants: bool = True, miss_model=None,
                 overlap_misses: bool = True):
        self.store, self.cache = store, cache
        self.weights = weights if weights is not None else ExpertWeights()
        self.device = torch.device(device)
        self.activation = activation
        self.check_invariants = check_invariants
        self.miss_model = miss_model
        self.overlap_misses = bool(overlap_misses)
        self.stats = LoadStats()
        self.pending: dict[tuple[int, int], Future] = {}
        self.dry = False  # calibration: experts return zeros without touching cache or store
        self._executor: Optional[ThreadPoolExecutor] = None
        self._miss_executor: Optional[ThreadPoolExecutor] = None
        self.pending_misses: dict[tuple[int, int], Future] = {}
        self._side_stream = None

    def _load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        w = self.store.read(layer, expert, None if self.device.type == "cpu" else self.device)
        self.stats.loads += 1
        self.stats.bytes_loaded += ExpertWeights.nbytes(w)
        self.stats.load_seconds += time.perf_counter() - t0
        return w

    def _free(self, evicted) -> None:
        for key in evicted:
            key = tuple(key)
            fut = self.pending.pop(key, None)
            if fut is None:
                self.weights.pop(key)
                continue
            if not fut.cancel():  # already reading: let it finish, then drop the buffer
                try:
                    fut.result()
                except Exception:  # noqa: BLE001 - a failed read of an expert nobody uses
                    pass
            self.weights.unreserve(key)
            self.stats.prefetch_dropped += 1

    def _await(self, key: tuple[int, int], fut: Future) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of a background read of ``key`` once landed (on CUDA the current stream
        waits for the side stream's copy); a failed read releases its reservation and raises."""
        try:
            w, event = fut.result()
        except BaseException:
            self.weights.unreserve(key)
            raise
        if event is not None:  # CUDA: the copy ran on the side stream
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(event)
            for t in w:
                t.record_stream(cur)
        return w

    def _resolve(self, key: tuple[int, int]) -> None:
        """Wait for the prefetch of ``key`` and hold its weights (a failed read raises here)."""
        t0 = time.perf_counter()
        w = self._await(key, self.pending.pop(key))
        self.stats.prefetch_wait_seconds += time.perf_counter() - t0
        self.weights.fill(key, w)

    def access(self, layer: int, experts: list[int], overlap: bool = False):
        """Ask the cache for ``experts`` of ``layer``; free the evicted, load the misses, wait for
        the prefetches of the experts used. Returns the cache's
        :class:`~moekit.offload.AccessResult` (streamed still to do). With ``overlap`` (and
        ``overlap_misses``) the misses' reads are only issued: they are in
        ``pending_misses`` until :meth:`resolve_miss`."""
        res = self.cache.access(layer, experts)
        self._free(res.evicted)
        for e in (*res.hits, *res.streamed):
            if (layer, e) in self.pending:
                self._resolve((layer, e))
        if overlap and self.overlap_misses and res.misses:
            if self._miss_executor is None:
                self._miss_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-miss")
                if self.device.type == "cuda" and self._side_stream is None:
                    self._side_stream = torch.cuda.Stream(self.device)
            nb = self.cache.expert_bytes[layer]
            for e in res.misses:
                self.weights.reserve((layer, e), nb)
                self.pending_misses[(layer, e)] = self._miss_executor.submit(self._read_miss_bg, layer, e)
            return res
        for e in res.misses:
            self.weights.put((layer, e), self._load(layer, e))
        return res

    def settle_misses(self, layer: int) -> None:
        """Wait for every overlapped read of ``layer`` still in flight (only left after an
        error): held if it succeeded, its reservation released if it failed."""
        for key in [k for k in self.pending_misses if k[0] == layer]:
            try:
                self.resolve_miss(key)
            except Exception:  # noqa: BLE001 - the error being raised already is the one to report
                pass

    def _read_miss_bg(self, layer: int, expert: int):
        """Reader thread: one demand read (on CUDA with its copy on the side stream)."""
        t0 = time.perf_counter()
        w, event = self._read_to_device(layer, expert)
        self.stats.miss_read_seconds += time.perf_counter() - t0  # only this thread writes it
        return w, event

    def resolve_miss(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the overlapped read of miss ``key``, hold its weights and return them (a
        failed read raises here, its reserved bytes released)."""
        t0 = time.perf_counter()
        w = self._await(key, self.pending_misses.pop(key))
        self.stats.loads += 1
        self.stats.bytes_loaded += ExpertWeights.nbytes(w)
        self.stats.load_seconds += time.perf_counter() - t0
        self.weights.fill(key, w)
        return w

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Admit ``experts`` of ``layer`` ahead of use (synchronously); returns those loaded."""
        res = self.cache.prefetch(layer, experts)
        self._free(res.evicted)
        for e in res.misses:
            self.weights.put((layer, e), self._load(layer, e))
        return list(res.misses)

    # ---- background prefetch ------------------------------------------------------------------
    def _read_to_device(self, layer: int, expert: int):
        """One read (and on CUDA its copy on the side stream, with the event to wait on)."""
        if self.device.type != "cuda":
            return self.store.read(layer, expert, None), None
        with torch.cuda.stream(self._side_stream):
            w = self.store.read(layer, expert, self.device)
            event = torch.cuda.Event()
            event.record(self._side_stream)
        return w, event

    def _read_bg(self, layer: int, expert: int):
        """Worker thread: one read (and on CUDA its copy on the side stream); nothing else."""
        t0 = time.perf_counter()
        w, event = self._read_to_device(layer, expert)
        self.stats.prefetch_read_seconds += time.perf_counter() - t0  # only the worker writes it
        return w, event

    def prefetch_async(self, layer: int, experts: list[int]) -> list[int]:
        """Admit ``experts`` of ``layer`` (best first) and read them on the worker thread; the
        cache never evicts the access in flight for them. Returns the experts issued."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch")
            if self.device.type == "cuda":
                self._side_stream = torch.cuda.Stream(self.device)
        res = self.cache.prefetch(layer, experts)
        self._free(res.evicted)
        nb = self.cache.expert_bytes[layer]
        for e in res.misses:
            key = (layer, e)
            self.weights.reserve(key, nb)
            self.pending[key] = self._executor.submit(self._read_bg, layer, e)
            self.stats.prefetch_loads += 1
            self.stats.prefetch_bytes += nb
        return list(res.misses)

    def drain(self) -> None:
        """Wait for every prefetch in flight and hold its weights (still resident in the cache)."""
        for key in list(self.pending):
            self._resolve(key)

    def close(self) -> None:
        for key in list(self.pending):
            self._free([key])
        for key, fut in list(self.pending_misses.items()):  # only after a failed forward
            fut.cancel()
            self.weights.unreserve(key)
        self.pending_misses.clear()
        for name in ("_executor", "_miss_executor"):
            ex = getattr(self, name)
            if ex is not None:
                ex.shutdown(wait=True)
                setattr(self, name, None)

    def check(self, layer: int) -> None:
        if self.check_invariants:
            mine, theirs = self.weights.resident(layer), self.cache.resident(layer)
            assert mine == theirs, f"layer {layer}: held {sorted(mine)} but the cache has {sorted(theirs)}"


def _expert_mlp(x_nD: torch.Tensor, w: tuple[torch.Tensor, torch.Tensor], activation: str) -> torch.Tensor:
    """The ``loop`` backend's per-expert math (same ops, same order: bit-identical)."""
    return activation_ref(x_nD @ w[0].t(), activation) @ w[1].t()


class OffloadedExperts(nn.Module):
    """Experts module of MoE layer ``layer`` (its ordinal in the store) whose weights come from
    ``runtime``. No parameters: ``state_dict`` holds nothing of the experts."""

    def __init__(self, layer: int, runtime: OffloadRuntime, num_experts: int, hidden_size: int):
        super().__init__()
        self.layer = int(layer)
        self.num_experts = int(num_experts)
        self.hidden_size = int(hidden_size)
        self._runtime = [runtime]  # a list: not a submodule, not part of the state

    @property
    def runtime(self) -> OffloadRuntime:
        return self._runtime[0]

    @property
    def bytes_per_expert(self) -> int:
        return self.runtime.store.expert_bytes[self.layer]

    @torch.no_grad()
    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """x_ND [N, D] sorted by expert, tokens_per_expert_E int [E] -> y_ND [N, D] (unweighted)."""
        rt = self.runtime
        if x_ND.dtype != rt.store.dtype:
            raise TypeError(f"offloaded experts hold {rt.store.dtype} weights but got {x_ND.dtype} input; load the "
                            f"model in the store's dtype")
        counts = tokens_per_expert_E.tolist()
        if len(counts) != self.num_experts:
            raise ValueError(f"tokens_per_expert_E has {len(counts)} entries, expected E={self.num_experts}")
        y_ND = x_ND.new_empty(x_ND.shape)
        active = [e for e, n in enumerate(counts) if n]
        if rt.dry:  # calibration of the dense part: no cache, no store, no expert math
            return y_ND.zero_()
        rt.stats.forwards += 1
        if not active:
            return y_ND
        starts, s = [], 0
        for n in counts:
            starts.append(s)
            s += n
        if rt.miss_model is not None:  # misses computed where they live (CPU) instead of copied
            active = self._compute_in_slow_tier(x_ND, y_ND, active, starts, counts)
            if not active:
                return y_ND
        res = rt.access(self.layer, active, overlap=True)
        try:
            self._compute(x_ND, y_ND, res, active, starts, counts)
        finally:  # after an error: no read of this layer left in flight, its bytes accounted
            rt.settle_misses(self.layer)
        rt.check(self.layer)
        return y_ND

    def _compute(self, x_ND, y_ND, res, active, starts, counts) -> None:
        rt = self.runtime
        held = rt.weights.held
        t0 = time.perf_counter()
        later = set(res.streamed) | {e for e in res.misses if (self.layer, e) in rt.pending_misses}
        for e in active:  # resident ones (hits, and misses already read) while the misses' reads run
            if e not in later:
                a, n = starts[e], counts[e]
                y_ND[a:a + n] = _expert_mlp(x_ND[a:a + n], held[(self.layer, e)], rt.activation)
        rt.stats.compute_seconds += time.perf_counter() - t0
        for e in res.misses:  # each overlapped miss as its read lands (in the order issued)
            if (self.layer, e) in rt.pending_misses:
                w = rt.resolve_miss((self.layer, e))
                t0 = time.perf_counter()
                a, n = starts[e], counts[e]
                y_ND[a:a + n] = _expert_mlp(x_ND[a:a + n], w, rt.activation)
                rt.stats.compute_seconds += time.perf_counter() - t0
        # streamed ones one at a time through the reserved slot: a demoted resident first
        # (already held: use, then free), the rest loaded, used and freed
        for e in res.streamed:
            key = (self.layer, e)
            if key in held:
                w = held[key]
                release = lambda k=key: rt.weights.pop(k)  # noqa: E731
            else:
                w = rt._load(self.layer, e)
                nb = rt.weights.hold_transient(w)
                release = lambda nb=nb: rt.weights.release(nb)  # noqa: E731
            t0 = time.perf_counter()
            a, n = starts[e], counts[e]
            y_ND[a:a + n] = _expert_mlp(x_ND[a:a + n], w, rt.activation)
            rt.stats.compute_seconds += time.perf_counter() - t0
            del w
            release()

    def _compute_in_slow_tier(self, x_ND, y_ND, active, starts, counts) -> list[int]:
        """Experts of ``active`` neither resident nor in flight for which the runtime's
        ``miss_model`` prefers computing on the host (weights from the RAM tier, rows copied over
        and back) to copying the weights to the device; computes those into ``y_ND`` and returns
        the rest. These are not requests of the fast-tier cache (its hit rate leaves them out;
        ``LoadStats.slow_tier_computes`` counts them). Untested without a GPU (see the model)."""
        rt = self.runtime
        resident = rt.cache.resident(self.layer)
        rest = []
        for e in active:
            if e in resident or rt.miss_model.decide(self.layer, counts[e], rt.cache) != "compute_slow":
                rest.append(e)
                continue
            t0 = time.perf_counter()
            w = rt.store.read(self.layer, e, None)  # host tensors of the RAM tier (no copy)
            a, n = starts[e], counts[e]
            y_host = _expert_mlp(x_ND[a:a + n].to("cpu"), w, rt.activation)
            y_ND[a:a + n] = y_host.to(y_ND.device, non_blocking=False)
            rt.stats.slow_tier_computes += 1
            rt.stats.slow_tier_seconds += time.perf_counter() - t0
        return rest

    def extra_repr(self) -> str:
        return f"layer={self.layer}, E={self.num_experts}, D={self.hidden_size}, offloaded"
