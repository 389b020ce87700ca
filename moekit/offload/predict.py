"""Routing predictors for prefetch and the ``predictive`` cache policy.

Legend: L MoE layers, E experts, K top-k, D model dim, T tokens.

* :func:`lookahead_topk`: training-free. The residual stream changes little from one layer to
  the next, so the next layers' routers applied to the current hidden state guess their
  choice (the runner prefetches with it).
* :class:`PathPredictor`: learned from traces (ExpertFlow-style, from routes instead of token
  ids): co-activation counts of expert i in layer l-1 -> expert j in layer l (same token),
  and of expert i -> j in the same layer on the next token, plus per-layer frequency.
  Chained, the cross-layer counts predict a whole path; :meth:`PathPredictor.recall` scores
  a held-out split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["lookahead_topk", "PathPredictor"]


def lookahead_topk(hidden_TD, router_weights_ED: Sequence, top_k: int,
                   router_biases_E: Optional[Sequence] = None) -> list:
    """Top-k expert ids ``[T, K]`` each given router would pick for ``hidden_TD`` (the hidden
    state entering the current layer, applied to the next layers' routers ``[E, D]``)."""
    import torch

    if hidden_TD.dim() == 1:
        hidden_TD = hidden_TD.unsqueeze(0)
    out = []
    for i, w_ED in enumerate(router_weights_ED):
        if w_ED.dim() != 2 or w_ED.shape[1] != hidden_TD.shape[-1]:
            raise ValueError(f"router_weights_ED[{i}] must be [E, D={hidden_TD.shape[-1]}], got {tuple(w_ED.shape)}")
        logits_TE = hidden_TD.float() @ w_ED.float().t()
        if router_biases_E is not None and router_biases_E[i] is not None:
            logits_TE = logits_TE + router_biases_E[i].float()
        out.append(torch.topk(logits_TE, min(top_k, w_ED.shape[0]), dim=-1).indices)
    return out


class PathPredictor:
    """Co-activation statistics of routes; learns online (``update``) or from a trace (``fit``)."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int, temporal_weight: float = 1.0,
                 prior_weight: float = 0.3):
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.cross_LEE = np.zeros((num_layers, num_experts, num_experts))     # [l, i@l-1, j@l]
        self.temporal_LEE = np.zeros((num_layers, num_experts, num_experts))  # [l, i@t-1, j@t]
        self.freq_LE = np.zeros((num_layers, num_experts))
        self.last: list[tuple] = [() for _ in range(num_layers)]
        self.wt, self.wp = temporal_weight, prior_weight

    # --- learning ---------------------------------------------------------------------
    def update(self, layer: int, experts: Sequence[int], prev_layer_experts: Sequence[int] = ()) -> None:
        """Record that one token used ``experts`` in ``layer`` (after ``prev_layer_experts``)."""
        ex = list(experts)
        if layer > 0 and len(prev_layer_experts):
            self.cross_LEE[layer][np.ix_(list(prev_layer_experts), ex)] += 1
        if self.last[layer]:
            self.temporal_LEE[layer][np.ix_(list(self.last[layer]), ex)] += 1
        self.freq_LE[layer, ex] += 1
        self.last[layer] = tuple(ex)

    def fit(self, ids_LTK: np.ndarray) -> "PathPredictor":
        """Learn from ``[L, T, K]`` routes (tokens in order; ``-1`` slots ignored)."""
        for t in range(ids_LTK.shape[1]):
            prev: tuple = ()
            for l in range(ids_LTK.shape[0]):
                ex = tuple(int(e) for e in ids_LTK[l, t] if e >= 0)
                self.update(l, ex, prev)
                prev = ex
        return self

    # --- scores -------------------------------------------------------------------------
    @staticmethod
    def _rows(m_EE: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        if not len(rows):
            return np.zeros(m_EE.shape[1])
        sub = m_EE[list(rows)]
        return (sub / np.maximum(sub.sum(axis=1, keepdims=True), 1.0)).sum(axis=0)

    def _prior(self, layer: int) -> np.ndarray:
        f = self.freq_LE[layer]
        return f / max(f.sum(), 1.0) * self.K

    def scores(self, layer: int, prev_layer_experts: Sequence[int] = (),
               prev_token_experts: Sequence[int] = ()) -> np.ndarray:
        """``[E]`` scores for the experts a token uses in ``layer``, given its experts in the
        previous layer and the previous token's experts in this layer."""
        s = self._rows(self.cross_LEE[layer], prev_layer_experts) if layer > 0 else np.zeros(self.E)
        s = s + self.wt * self._rows(self.temporal_LEE[layer], prev_token_experts)
        return s + self.wp * self._prior(layer)

    def predict(self, layer: int, prev_layer_experts: Sequence[int] = (),
                prev_token_experts: Sequence[int] = (), n: Optional[int] = None) -> list[int]:
        s = self.scores(layer, prev_layer_experts, prev_token_experts)
        return [int(e) for e in np.argsort(-s, kind="stable")[: n or self.K]]

    def predict_next(self, layer: int, current: Sequence[int], prev_layer_experts: Sequence[int] = (),
                     n: Optional[int] = None) -> list[int]:
        """Experts of the *next* token in ``layer``, known: this token's ``current`` experts there
        (what the cache should keep after the access in flight)."""
        s = self.wt * self._rows(self.temporal_LEE[layer], current) + self.wp * self._prior(layer)
        return [int(e) for e in np.argsort(-s, kind="stable")[: n or self.K]]

    def predict_path(self, layer: int, experts: Sequence[int], horizon: int) -> list[list[int]]:
        """Top-k of layers ``layer+1 .. layer+horizon`` from the token's experts in ``layer``
        (the cross-layer transition chained as a probability vector)."""
        v = np.zeros(self.E)
        v[list(experts)] = 1.0 / max(len(experts), 1)
        out = []
        for l in range(layer + 1, min(layer + 1 + horizon, self.L)):
            m = self.cross_LEE[l]
            m = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
            v = v @ m
            s = v + 1e-3 * self._prior(l)
            out.append([int(e) for e in np.argsort(-s, kind="stable")[: self.K]])
        return out

    # --- evaluation ---------------------------------------------------------------------
    def recall(self, ids_LTK: np.ndarray, mode: str = "cross+temporal", horizon: int = 1) -> float:
        """Mean top-k recall (|predicted top-k & used| / used) on held-out routes ``[L, T, K]``.

        ``mode``: ``cross+temporal`` (previous layer and previous token), ``cross``, ``temporal``,
        ``prior`` (frequency only), or ``path`` (layer l+``horizon`` from layer l alone); ``cross``
        and ``path`` skip the layers they have no input for."""
        hit = tot = 0
        Ltot, T = ids_LTK.shape[0], ids_LTK.shape[1]
        for t in range(T):
            for l in range(Ltot):
                used = {int(e) for e in ids_LTK[l, t] if e >= 0}
                if not used:
                    continue
                prev_l = [int(e) for e in ids_LTK[l - 1, t] if e >= 0] if l > 0 else []
                prev_t = [int(e) for e in ids_LTK[l, t - 1] if e >= 0] if t > 0 else []
                if mode == "path":
                    if l - horizon < 0:
                        continue
                    src = [int(e) for e in ids_LTK[l - horizon, t] if e >= 0]
                    pred = self.predict_path(l - horizon, src, horizon)[-1]
                elif mode == "cross":
                    if l == 0:                      # nothing before the first layer
                        continue
                    pred = self.predict(l, prev_l, ())
                elif mode == "temporal":
                    pred = self.predict(l, (), prev_t)
                elif mode == "prior":
                    pred = self.predict(l)
                else:
                    pred = self.predict(l, prev_l, prev_t)
                hit += len(used & set(pred))
                tot += len(used)
        return hit / tot if tot else 0.0
