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
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from moekit.kernels.activations import activation_ref

__all__ = ["ExpertWeights", "OffloadRuntime", "OffloadedExperts"]


class ExpertWeights:
    """The experts held in the fast tier: ``held[(layer, expert)] = (w_in_HD, w_out_DF)``, with
    the bytes held now (resident plus an expert streaming through) and the peak since
    :meth:`reset_peak`: the measured side of the cache's budget."""

    def __init__(self):
        self.held: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.bytes_held = 0
        self.peak_bytes = 0
        self._transient = 0

    @staticmethod
    def nbytes(w: tuple[torch.Tensor, torch.Tensor]) -> int:
        return w[0].numel() * w[0].element_size() + w[1].numel() * w[1].element_size()

    def put(self, key: tuple[int, int], w: tuple[torch.Tensor, torch.Tensor]) -> None:
        assert key not in self.held, f"expert {key} loaded twice"
        self.held[key] = w
        self._add(self.nbytes(w))

    def pop(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.held.pop(key)
        self.bytes_held -= self.nbytes(w)
        return w

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
        return {e for (l, e) in self.held if l == layer}

    def clear(self) -> None:
        self.held.clear()
        self.bytes_held = 0


@dataclass
class LoadStats:
    """Demand loads done by the runtime (the cache's stats count decisions; these count work)."""

    loads: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    forwards: int = 0


class OffloadRuntime:
    """What the offloaded experts of one model share: the store (slow tier), the cache
    (decisions), the held weights (fast tier), the compute device and activation."""

    def __init__(self, store, cache, weights: Optional[ExpertWeights] = None, *, device="cpu",
                 activation: str = "swiglu", check_invariants: bool = True):
        self.store, self.cache = store, cache
        self.weights = weights if weights is not None else ExpertWeights()
        self.device = torch.device(device)
        self.activation = activation
        self.check_invariants = check_invariants
        self.stats = LoadStats()

    def _load(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        w = self.store.read(layer, expert, None if self.device.type == "cpu" else self.device)
        self.stats.loads += 1
        self.stats.bytes_loaded += ExpertWeights.nbytes(w)
        self.stats.load_seconds += time.perf_counter() - t0
        return w

    def _free(self, evicted) -> None:
        for key in evicted:
            self.weights.pop(tuple(key))

    def access(self, layer: int, experts: list[int]):
        """Ask the cache for ``experts`` of ``layer``; free the evicted, load the misses.
        Returns the cache's :class:`~moekit.offload.AccessResult` (streamed still to do)."""
        res = self.cache.access(layer, experts)
        self._free(res.evicted)
        for e in res.misses:
            self.weights.put((layer, e), self._load(layer, e))
        return res

    def prefetch(self, layer: int, experts: list[int]) -> list[int]:
        """Admit ``experts`` of ``layer`` ahead of use (synchronously); returns those loaded."""
        res = self.cache.prefetch(layer, experts)
        self._free(res.evicted)
        for e in res.misses:
            self.weights.put((layer, e), self._load(layer, e))
        return list(res.misses)

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
        rt.stats.forwards += 1
        if not active:
            return y_ND
        starts, s = [], 0
        for n in counts:
            starts.append(s)
            s += n
        res = rt.access(self.layer, active)
        held = rt.weights.held
        t0 = time.perf_counter()
        streamed = set(res.streamed)
        for e in active:  # resident ones (hits and admitted misses)
            if e not in streamed:
                a, n = starts[e], counts[e]
                y_ND[a:a + n] = _expert_mlp(x_ND[a:a + n], held[(self.layer, e)], rt.activation)
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
        rt.check(self.layer)
        return y_ND

    def extra_repr(self) -> str:
        return f"layer={self.layer}, E={self.num_experts}, D={self.hidden_size}, offloaded"
