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
* :class:`WholePathPredictor`: learned from recorded traces (ExpertFlow's whole-path predictor,
  from routes: the traces carry no token ids, but a token's early-layer experts identify it
  nearly as well). It keeps the recorded paths (every layer's experts of every token) and
  predicts the rest of the path of the token in flight from the recorded tokens whose paths
  match its known layers (weighted votes, similarity sharpened by a power), and the next
  token's experts from the successors of the recorded tokens that match the current one. It
  learns online from each finished token; it never sees a token before that token is routed.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

__all__ = ["lookahead_topk", "PathPredictor", "WholePathPredictor"]


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


class WholePathPredictor:
    """Predicts a token's experts in every layer from the recorded paths it matches.

    Memory: ``[T, L, E]`` one-hot paths of recorded tokens (:meth:`fit` on a trace, then one
    per finished token, :meth:`end_token`); ``max_tokens`` caps ``T`` (the oldest quarter is
    forgotten when it is reached; each guess costs ``O(T * window * E)``). For the token in flight (its experts observed layer
    by layer, :meth:`observe`), the similarity to a recorded token ``s`` is
    ``sum_{j in [l-window, l)} decay^(l-1-j) * |experts_t[j] & experts_s[j]|``, and the score of
    expert ``e`` in layer ``l`` is ``sum_s sim_s^power * [e in experts_s[l]] / sum_s sim_s^power``,
    an estimate of the probability that the token uses ``e`` there (0..1; sums to about K).
    Layer 0 (nothing known yet) and the next token (:meth:`scores_next`) vote with the
    successors ``s + 1`` of the recorded tokens that match the current (or last finished) token.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, window: int = 8, decay: float = 0.8,
                 power: float = 6.0, max_tokens: Optional[int] = None):
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be None or >= 2, got {max_tokens}")
        if num_layers <= 0 or num_experts <= 0 or not 0 < top_k <= num_experts:
            raise ValueError(f"need num_layers > 0 and 0 < top_k <= num_experts, got L={num_layers}, "
                             f"E={num_experts}, K={top_k}")
        if window < 1 or not 0 < decay <= 1 or power <= 0:
            raise ValueError(f"need window >= 1, 0 < decay <= 1, power > 0; got {window}, {decay}, {power}")
        self.L, self.E, self.K = num_layers, num_experts, top_k
        self.window, self.decay, self.power = int(window), float(decay), float(power)
        self._paths_TLE = np.zeros((64, num_layers, num_experts), dtype=np.float32)
        self._succ_T = np.zeros(64, dtype=bool)      # token t+1 is recorded right after t (same sequence)
        self.n = 0                                    # recorded tokens
        self.max_tokens = max_tokens                  # memory cap: the oldest quarter goes when full
        self.cur_LE = np.zeros((num_layers, num_experts), dtype=np.float32)
        self.last_LE: Optional[np.ndarray] = None    # the previous finished token's path (this sequence)

    # --- learning ---------------------------------------------------------------------
    def _append(self, path_LE: np.ndarray, follows: bool) -> None:
        if self.max_tokens is not None and self.n >= self.max_tokens:
            drop = max(1, self.max_tokens // 4)
            keep = self.n - drop
            self._paths_TLE[:keep] = self._paths_TLE[drop:self.n]
            self._succ_T[:keep] = self._succ_T[drop:self.n]
            self._succ_T[keep:] = False
            self.n = keep
        if self.n == len(self._paths_TLE):
            self._paths_TLE = np.concatenate([self._paths_TLE, np.zeros_like(self._paths_TLE)])
            self._succ_T = np.concatenate([self._succ_T, np.zeros_like(self._succ_T)])
        if follows and self.n:
            self._succ_T[self.n - 1] = True
        self._paths_TLE[self.n] = path_LE
        self.n += 1

    def fit(self, ids_LTK: np.ndarray, continues: bool = False) -> "WholePathPredictor":
        """Record the paths of ``[L, T, K]`` routes (one sequence, tokens in order; ``-1`` ignored).
        ``continues``: the sequence goes on after them (a prompt just prefilled): the next token
        in flight follows the last one recorded here."""
        ids_LTK = np.asarray(ids_LTK)
        if ids_LTK.ndim != 3 or ids_LTK.shape[0] != self.L:
            raise ValueError(f"ids_LTK must be [L={self.L}, T, K], got {ids_LTK.shape}")
        for t in range(ids_LTK.shape[1]):
            path = np.zeros((self.L, self.E), dtype=np.float32)
            for l in range(self.L):
                ex = ids_LTK[l, t]
                path[l, ex[ex >= 0]] = 1.0
            self._append(path, follows=t > 0)
        if continues and ids_LTK.shape[1]:
            self.last_LE = self._paths_TLE[self.n - 1].copy()
            self.cur_LE[:] = 0.0
        return self

    def observe(self, layer: int, experts: Sequence[int]) -> None:
        """The token in flight used ``experts`` in ``layer`` (call layer by layer)."""
        self.cur_LE[layer] = 0.0
        self.cur_LE[layer, list(experts)] = 1.0

    def end_token(self) -> None:
        """The token in flight is finished: record its path (online learning) and start the next."""
        self._append(self.cur_LE.copy(), follows=self.last_LE is not None)
        self.last_LE = self._paths_TLE[self.n - 1].copy()
        self.cur_LE[:] = 0.0

    def new_sequence(self) -> None:
        """The next token starts another sequence (no successor link to the last one)."""
        self.last_LE = None
        self.cur_LE[:] = 0.0

    # --- scores -------------------------------------------------------------------------
    def _vote(self, sim_T: np.ndarray, rows_TE: np.ndarray) -> np.ndarray:
        w = np.power(sim_T.astype(np.float64), self.power)
        tot = w.sum()
        if tot <= 0:
            f = rows_TE.sum(axis=0, dtype=np.float64)
            return f / max(len(rows_TE), 1)
        return (w @ rows_TE) / tot

    def scores(self, layer: int) -> np.ndarray:
        """``[E]`` probability estimates for the token in flight's experts in ``layer``, from its
        observed layers ``layer-window .. layer-1`` (layer 0: from the previous token)."""
        if self.n == 0:
            return np.zeros(self.E)
        if layer == 0:
            return self.scores_next(0)
        lo = max(0, layer - self.window)
        w_J = self.decay ** np.arange(layer - lo, dtype=np.float64)[::-1]
        past = self._paths_TLE[: self.n]
        sim_T = np.einsum("tje,je,j->t", past[:, lo:layer], self.cur_LE[lo:layer], w_J.astype(np.float32))
        return self._vote(sim_T, past[:, layer])

    def scores_next(self, layer: int) -> np.ndarray:
        """``[E]`` probability estimates for the *next* token's experts in ``layer``: successors of
        the recorded tokens whose path matches the token in flight's observed layers (between
        tokens: the last finished token's whole path)."""
        idx = np.nonzero(self._succ_T[: self.n])[0]
        ref_LE = self.cur_LE if self.cur_LE.any() else self.last_LE   # the token in flight, else the last
        if ref_LE is None or idx.size == 0:
            past = self._paths_TLE[: self.n, layer]
            return past.mean(axis=0, dtype=np.float64) if self.n else np.zeros(self.E)
        sim_T = np.einsum("tle,le->t", self._paths_TLE[idx], ref_LE) / self.L
        return self._vote(sim_T, self._paths_TLE[idx + 1, layer])

    def predict(self, layer: int, n: Optional[int] = None) -> list[int]:
        s = self.scores(layer)
        return [int(e) for e in np.argsort(-s, kind="stable")[: n or self.K]]

    # --- evaluation ---------------------------------------------------------------------
    def recall(self, ids_LTK: np.ndarray, online: bool = True) -> float:
        """Mean top-k recall of the in-flight prediction (layer l from the layers before it) on
        ``[L, T, K]`` routes, token by token; ``online``: each token is recorded after it is scored."""
        hit = tot = 0
        for t in range(ids_LTK.shape[1]):
            for l in range(self.L):
                used = {int(e) for e in ids_LTK[l, t] if e >= 0}
                if used:
                    hit += len(used & set(self.predict(l)))
                    tot += len(used)
                self.observe(l, sorted(used))
            if online:
                self.end_token()
            else:
                self.last_LE = self.cur_LE.copy()
                self.cur_LE[:] = 0.0
        return hit / tot if tot else 0.0
