"""Record routing traces from any model holding MoELayers.

The file format and reader live in :mod:`moekit.planner.traces` (numpy only), so the
planner and the runtime share one definition::

    with moekit.trace.record(model) as rec:
        model(batch)            # any number of forwards
    rec.save("run.trace.npz")   # moekit trace v1 (.npz), readable by `moekit plan`

Each forward appends, for every MoE layer, each token's top-k expert ids ``[T, K]``
(``-1`` where capacity dropped the slot) and weights. Layers are token-aligned when
every layer sees the same tokens in the same order (a plain decoder stack does).

Legend: T tokens, K top-k, L MoE layers.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from moekit.layer import MoELayer, moe_layers
from moekit.planner.traces import RoutingTrace, TraceFormatError, read_trace

__all__ = ["record", "TraceRecorder", "RoutingTrace", "TraceFormatError", "load"]


class TraceRecorder:
    """Collects per-layer routing of the forwards run inside :func:`record`."""

    def __init__(self, model: nn.Module, model_name: str = "", with_weights: bool = True):
        self.layers: list[tuple[str, MoELayer]] = list(moe_layers(model))
        if not self.layers:
            raise ValueError(f"{type(model).__name__} holds no moekit.MoELayer: convert an HF model "
                             f"with moekit.hf.patch_model(model) first")
        experts = {layer.config.num_experts for _, layer in self.layers}
        ks = {layer.config.top_k for _, layer in self.layers}
        if len(experts) != 1 or len(ks) != 1:
            raise ValueError(f"layers differ in num_experts {sorted(experts)} or top_k {sorted(ks)}; "
                             f"a trace holds one shape")
        self.model_name = model_name or type(model).__name__
        self.with_weights = with_weights
        self._ids: list[list[np.ndarray]] = [[] for _ in self.layers]
        self._weights: list[list[np.ndarray]] = [[] for _ in self.layers]
        self._removers: list = []

    def _observer(self, index: int):
        def observe(layer: MoELayer, routing) -> None:
            self._ids[index].append(routing.topk_ids_TK.detach().to("cpu", torch.int32).numpy())
            if self.with_weights:
                self._weights[index].append(routing.topk_weights_TK.detach().to("cpu", torch.float32).numpy())
        return observe

    def start(self) -> "TraceRecorder":
        self._removers = [layer.add_routing_observer(self._observer(i)) for i, (_, layer) in enumerate(self.layers)]
        return self

    def stop(self) -> None:
        for remove in self._removers:
            remove()
        self._removers = []

    @property
    def num_tokens(self) -> int:
        """Tokens recorded in the first MoE layer."""
        return sum(a.shape[0] for a in self._ids[0])

    def trace(self) -> RoutingTrace:
        """Everything recorded so far as a :class:`RoutingTrace`."""
        if not self._ids[0]:
            raise RuntimeError("nothing recorded: run the model inside `with moekit.trace.record(model)`")
        K = self.layers[0][1].config.top_k
        ids = [np.concatenate(chunks) if chunks else np.zeros((0, K), np.int32) for chunks in self._ids]
        weights = None
        if self.with_weights:
            weights = [np.concatenate(chunks) if chunks else np.zeros((0, K), np.float32)
                       for chunks in self._weights]
        aligned = len({a.shape[0] for a in ids}) == 1
        meta = {"model": self.model_name, "layer_names": [n for n, _ in self.layers], "aligned": aligned,
                "source": "moekit.trace.record"}
        bytes_per_expert = _expert_bytes(self.layers[0][1])
        meta["expert_bytes"] = [bytes_per_expert] * len(self.layers)
        return RoutingTrace(ids, weights, self.layers[0][1].config.num_experts, meta)

    def save(self, path: Union[str, Path]) -> Path:
        """Write the trace in moekit's ``.npz`` format; returns the path."""
        path = Path(path)
        self.trace().save(path)
        return path


def _expert_bytes(layer: MoELayer) -> int:
    per = layer.experts.bytes_per_expert
    return int(per)


@contextlib.contextmanager
def record(model: nn.Module, model_name: str = "", with_weights: bool = True) -> Iterator[TraceRecorder]:
    """Context manager recording the routing of every MoELayer in ``model``."""
    rec = TraceRecorder(model, model_name, with_weights).start()
    try:
        yield rec
    finally:
        rec.stop()


def load(path: Union[str, Path]) -> RoutingTrace:
    """Read a trace in any supported format (moekit .npz, route_trace v1 CSV, Mixtral JSON)."""
    return read_trace(path)


def expert_load_table(trace: RoutingTrace, layer: Optional[int] = None) -> np.ndarray:
    """Assignments per expert: [L, E] (or [E] for one layer), ignoring dropped slots."""
    def counts(a: np.ndarray) -> np.ndarray:
        return np.bincount(a[a >= 0].ravel(), minlength=trace.num_experts)
    if layer is not None:
        return counts(trace.topk_ids[layer])
    return np.stack([counts(a) for a in trace.topk_ids])
