"""Look-ahead prefetch for offloaded generation: while MoE layer ``l`` computes, guess the
experts of layers ``l+1 .. l+h`` and read them on a background thread.

Legend: L MoE layers, E experts, K top-k, D model dim, T tokens in the forward.

The guess is training-free (:func:`moekit.offload.predict.lookahead_topk`): the next layers'
routers applied to the hidden state entering layer ``l`` (the residual stream changes little
from one layer to the next). Per target layer the experts are ranked by how many tokens chose
them and cut to the layer's quota; the cache is told (``observe_prediction``: the
``predictive`` policy keeps them) and asked to admit them (``prefetch``: it never evicts the
access in flight, and per-layer quotas mean a prefetch of layer ``l+j`` never touches layer
``l``); the reads run on the runtime's worker thread (:meth:`OffloadRuntime.prefetch_async`).
A wrong guess costs a wasted read; the expert actually needed is then a miss, loaded on
demand as without prefetch.

Look-ahead ``h`` (``horizon="auto"``): the reads for one layer should finish while the layers
before it compute, so ``h = ceil(read time of one layer's prefetches / compute time of one
layer)``, both measured as the run goes (exponential averages of the worker's read time per
expert times the experts issued per layer, and of the wall time between consecutive MoE
layers minus the demand loads in it), clamped to ``[1, max_horizon]``; it starts at 1.

Recall (reported in the runner's metrics): per token and layer, the fraction of the experts
the router picked that the latest prediction for that layer had picked for that token (the
per-token top-k, before the union), split by prefill / decode.

Whole-path prediction (``predictor="wholepath"``, ExpertFlow's predictor from routes:
:class:`~moekit.offload.predict.WholePathPredictor`): for a single token in flight (decode,
batch 1) the guess for layers ``l+1 .. l+h`` is made once layer ``l`` has routed (its routing
observer; the reads then overlap layer ``l``'s expert compute) from the token's experts in the
layers so far matched against recorded paths: the prompt's tokens (recorded once the prefill
has routed every layer), each finished token (online; the last ``PATH_MEMORY`` tokens), and any
routes given beforehand (``path_predictor`` fitted on a trace). The cache is told the top-k and asked to admit the
experts whose estimated probability is at least ``path_threshold``. Forwards of several tokens
(prefill, batched decode) and a predictor with nothing recorded use the router look-ahead.

Gate (``gated=True``): a guess that needs an eviction is read only while guesses are likelier
to be used than the resident expert they would evict (see :meth:`Prefetcher._gate`); without it
a small cache over repetitive routing loses hits to wrong guesses and the link carries the
wasted reads.
"""
from __future__ import annotations

import math
import time
from typing import Optional, Union

import torch

from moekit.offload.predict import lookahead_topk

__all__ = ["Prefetcher", "PREDICTORS"]

PREDICTORS = ("lookahead", "wholepath")
PATH_MEMORY = 1024   # tokens the runner's whole-path predictor remembers (Qwen3-30B: 24 KiB per token)


class Prefetcher:
    """Attach look-ahead prefetch to the MoE layers ``moe_layers`` (in order; entry ``i`` is
    store layer ``i``) of a model driven by ``runtime``. ``horizon``: an int, or ``"auto"``.
    Remove with :meth:`remove`."""

    def __init__(self, runtime, moe_layers: list, horizon: Union[int, str] = "auto", max_horizon: int = 4,
                 ema: float = 0.2, gated: bool = True, predictor: str = "lookahead", path_predictor=None,
                 path_threshold: float = 0.5):
        if horizon != "auto" and (not isinstance(horizon, int) or horizon < 1):
            raise ValueError(f"horizon must be a positive int or 'auto', got {horizon!r}")
        if predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {predictor!r}")
        if not 0.0 <= path_threshold <= 1.0:
            raise ValueError(f"path_threshold must lie in [0, 1], got {path_threshold}")
        if max_horizon < 1:
            raise ValueError(f"max_horizon must be >= 1, got {max_horizon}")
        self.runtime, self.layers = runtime, list(moe_layers)
        self.L = len(self.layers)
        self.auto = horizon == "auto"
        self.max_horizon = max(1, min(max_horizon, self.L - 1)) if self.L > 1 else 1
        self.horizon = 1 if self.auto else min(int(horizon), max(self.L - 1, 1))
        self.ema = float(ema)
        self.paused = False
        self.gated = bool(gated)
        self._issued: list[set[int]] = [set() for _ in range(self.L)]
        # the gate's measurements, per phase ("prefill" / "decode"): a prompt's many tokens miss
        # far more and use guesses far more often than one decoded token does
        self._n_issued = {"prefill": 0, "decode": 0}
        self._used_issued = {"prefill": 0, "decode": 0}
        self._layer_hits = {"prefill": [0] * self.L, "decode": [0] * self.L}
        self._layer_requests = {"prefill": [0] * self.L, "decode": [0] * self.L}
        self._index = {id(m): i for i, m in enumerate(self.layers)}
        self._pred_TK: list[Optional[torch.Tensor]] = [None] * self.L
        self.recall_hits = {"prefill": 0, "decode": 0}
        self.recall_total = {"prefill": 0, "decode": 0}
        self.horizons: list[int] = []
        # timing (auto horizon)
        self._t_layer: Optional[float] = None      # EMA seconds of compute per MoE layer
        self._t_read: Optional[float] = None       # EMA seconds of one background read
        self._issued_per_layer: Optional[float] = None
        self._last: Optional[tuple[int, float, float]] = None  # (layer, time, demand load seconds then)
        self._reads_seen = (0, 0.0)
        self.predictor = predictor
        self.path_threshold = float(path_threshold)
        self.wp = None
        self._multi: list = [None] * self.L      # [T, K] routes of a multi-token forward (prefill), per layer
        if predictor == "wholepath":
            from moekit.offload.predict import WholePathPredictor

            c = self.layers[0].config
            self.wp = path_predictor if path_predictor is not None else \
                WholePathPredictor(self.L, c.num_experts, c.top_k, max_tokens=PATH_MEMORY)
            if not isinstance(self.wp, WholePathPredictor) or (self.wp.L, self.wp.E) != (self.L, c.num_experts):
                raise ValueError(f"path_predictor must be a WholePathPredictor for L={self.L} MoE layers and "
                                 f"E={c.num_experts} experts")
        self.wholepath_guesses = 0               # layer predictions made by the whole-path predictor
        self._handles = []
        for m in self.layers:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.add_routing_observer(self._observe))

    def remove(self) -> None:
        for h in self._handles:
            h() if callable(h) and not hasattr(h, "remove") else h.remove()
        self._handles = []

    # ---- hooks ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre(self, module, args):
        if self.paused:
            return
        l = self._index[id(module)]
        rt = self.runtime
        self._time(l)
        targets = list(range(l + 1, min(l + self.horizon, self.L - 1) + 1))
        if not targets:
            return
        hidden = args[0]
        x_TD = hidden.reshape(-1, hidden.shape[-1])
        if self.wp is not None and x_TD.shape[0] == 1 and self.wp.n:
            return  # one token in flight: the whole-path predictor guesses once this layer has routed
        preds = self._predict(x_TD, targets)
        issued = 0
        cache = rt.cache
        for t, ids_TK in zip(targets, preds):
            self._pred_TK[t] = ids_TK
            ranked = self._rank(ids_TK, self.layers[t].config.num_experts)[: cache.quotas[t]]
            cache.observe_prediction(t, ranked)
            ranked = self._gate(t, ranked)
            got = rt.prefetch_async(t, ranked) if ranked else []
            self._issued[t] |= set(got)
            issued += len(got)
        if targets:
            n = issued / len(targets) if issued else 0.0
            self._issued_per_layer = n if self._issued_per_layer is None else \
                (1 - self.ema) * self._issued_per_layer + self.ema * n

    def _gate(self, t: int, ranked: list[int]) -> list[int]:
        """The guesses worth reading now: all of them into free slots; one that needs an eviction
        only while a guess is likelier to be used than the expert it would evict. Likelihoods
        are measured: a guess, by the fraction of earlier prefetches of non-resident experts
        that their access used (``precision``); a resident, by the layer's hits per access over
        its slots (hit rate x K / quota: a resident expert's chance of being used). When the
        cache already serves nearly every request from what it keeps (small budgets, repetitive
        routing), prefetching would only evict useful experts and load the link; it stops. Both
        are measured per phase: the prompt's accesses (cold cache, many tokens) would make a
        decoded token's guesses look better and the residents worse than they are."""
        cache = self.runtime.cache
        res = cache.resident(t)
        new = [e for e in ranked if e not in res]
        if not new:
            return ranked
        free = cache.quotas[t] - len(res)
        if len(new) <= free or not self.gated:
            return ranked
        k = self.layers[t].config.top_k
        ph = cache.phase
        hits, reqs = self._layer_hits[ph][t], self._layer_requests[ph][t]
        h = hits / reqs if reqs else 0.0
        p_resident = h * k / cache.quotas[t]
        p_guess = self.precision(ph)
        if p_guess > p_resident:
            return ranked
        keep, n_free = [], free
        for e in ranked:  # the resident ones (no read) and as many new ones as there are free slots
            if e in res:
                keep.append(e)
            elif n_free > 0:
                keep.append(e)
                n_free -= 1
        return keep

    def precision(self, phase: str) -> float:
        """Measured fraction of issued prefetches used by their layer's next access in ``phase``
        ("prefill" / "decode"), prior 0.5."""
        return (self._used_issued[phase] + 1.0) / (self._n_issued[phase] + 2.0)

    def _predict(self, x_TD: torch.Tensor, targets: list[int]) -> list[torch.Tensor]:
        """[T, K] per target layer. Softmax routers: lookahead_topk on the router weights (and
        linear bias); sigmoid / group-limited routers: the router's own selection."""
        out: list[Optional[torch.Tensor]] = [None] * len(targets)
        plain = []
        for i, t in enumerate(targets):
            r, c = self.layers[t].router, self.layers[t].config
            if c.router == "sigmoid" or getattr(c, "n_group", None) or r.e_score_correction_bias is not None:
                out[i] = r(x_TD.to(r.weight.dtype)).topk_ids_TK
            else:
                plain.append(i)
        if plain:
            k = self.layers[targets[plain[0]]].config.top_k
            ws = [self.layers[targets[i]].router.weight for i in plain]
            bs = [self.layers[targets[i]].router.bias for i in plain]
            for i, ids in zip(plain, lookahead_topk(x_TD, ws, k, bs)):
                out[i] = ids
        return out  # type: ignore[return-value]

    @staticmethod
    def _rank(ids_TK: torch.Tensor, num_experts: int) -> list[int]:
        flat = ids_TK.reshape(-1).tolist()  # token-major, each token's top-k best first
        count, first = {}, {}
        for i, e in enumerate(flat):
            if e >= 0:
                count[e] = count.get(e, 0) + 1
                first.setdefault(e, i)
        return sorted(count, key=lambda e: (-count[e], first[e]))

    def _observe(self, module, routing) -> None:
        if self.paused:
            return
        l = self._index[id(module)]
        used_set = set(routing.topk_ids_TK.reshape(-1).tolist()) - {-1}
        ph = self.runtime.cache.phase
        if self._issued[l]:
            self._n_issued[ph] += len(self._issued[l])
            self._used_issued[ph] += len(self._issued[l] & used_set)
            self._issued[l] = set()
        res = self.runtime.cache.resident(l)  # before this access: what the cache kept
        self._layer_hits[ph][l] += len(used_set & res)
        self._layer_requests[ph][l] += len(used_set)
        pred = self._pred_TK[l]
        self._pred_TK[l] = None
        used = routing.topk_ids_TK
        if pred is not None and pred.shape[0] == used.shape[0]:
            valid = used >= 0
            hit = (used.unsqueeze(-1) == pred.to(used.device).unsqueeze(1)).any(-1) & valid
            phase = self.runtime.cache.phase
            self.recall_hits[phase] += int(hit.sum())
            self.recall_total[phase] += int(valid.sum())
        if self.wp is not None:
            self._whole_path(l, used)

    def _whole_path(self, l: int, used_TK: torch.Tensor) -> None:
        """Record layer ``l``'s routes ``[T, K]`` in the whole-path predictor; for one token in flight,
        guess and prefetch layers ``l+1 .. l+h`` from them."""
        import numpy as np

        wp = self.wp
        if used_TK.shape[0] != 1:
            if self.runtime.cache.phase == "prefill":    # the prompt's paths, once every layer routed
                self._multi[l] = used_TK.cpu().numpy()
                if l == self.L - 1 and all(m is not None and m.shape == self._multi[0].shape for m in self._multi):
                    wp.fit(np.stack(self._multi), continues=True)
            if l == self.L - 1:
                self._multi = [None] * self.L
            return
        wp.observe(l, [e for e in used_TK[0].tolist() if e >= 0])
        if l == self.L - 1:
            wp.end_token()
            return
        cache, rt = self.runtime.cache, self.runtime
        targets = list(range(l + 1, min(l + self.horizon, self.L - 1) + 1))
        issued = 0
        for t in targets:
            s_E = wp.scores(t)
            order = np.argsort(-s_E, kind="stable")
            k = self.layers[t].config.top_k
            self._pred_TK[t] = torch.as_tensor(order[:k].copy(), dtype=torch.long).unsqueeze(0)
            cache.observe_prediction(t, [int(e) for e in order[:k]])
            ranked = [int(e) for e in order[: cache.quotas[t]] if s_E[e] > 0 and s_E[e] >= self.path_threshold]
            ranked = self._gate(t, ranked) if ranked else []
            got = rt.prefetch_async(t, ranked) if ranked else []
            self._issued[t] |= set(got)
            issued += len(got)
            self.wholepath_guesses += 1
        if targets:
            n = issued / len(targets)
            self._issued_per_layer = n if self._issued_per_layer is None else \
                (1 - self.ema) * self._issued_per_layer + self.ema * n

    # ---- look-ahead from measured times --------------------------------------------------------
    def _time(self, l: int) -> None:
        now = time.perf_counter()
        st = self.runtime.stats
        if self._last is not None and self._last[0] == l - 1:
            dt = now - self._last[1] - (st.load_seconds - self._last[2])
            if dt > 0:
                self._t_layer = dt if self._t_layer is None else (1 - self.ema) * self._t_layer + self.ema * dt
        self._last = (l, now, st.load_seconds)
        n0, s0 = self._reads_seen
        n, s = st.prefetch_loads, st.prefetch_read_seconds
        done = n - len(self.runtime.pending)
        if done > n0 and s > s0:
            per = (s - s0) / (done - n0)
            self._t_read = per if self._t_read is None else (1 - self.ema) * self._t_read + self.ema * per
            self._reads_seen = (done, s)
        if l == 0 and self.auto:
            self.horizon = self.choose_horizon()
            self.horizons.append(self.horizon)

    def choose_horizon(self) -> int:
        """``ceil(read seconds per layer / compute seconds per layer)`` in ``[1, max_horizon]``."""
        if not self.auto:
            return self.horizon
        if self._t_layer is None or self._t_read is None or not self._issued_per_layer:
            return self.horizon
        need = self._t_read * self._issued_per_layer / max(self._t_layer, 1e-9)
        return int(min(max(math.ceil(need), 1), self.max_horizon))

    # ---- report ------------------------------------------------------------------------------
    def recall(self, phase: Optional[str] = None) -> Optional[float]:
        phases = ("prefill", "decode") if phase is None else (phase,)
        tot = sum(self.recall_total[p] for p in phases)
        return sum(self.recall_hits[p] for p in phases) / tot if tot else None

    def counters(self) -> dict:
        return {"recall_hits_prefill": self.recall_hits["prefill"], "recall_total_prefill": self.recall_total["prefill"],
                "recall_hits_decode": self.recall_hits["decode"], "recall_total_decode": self.recall_total["decode"],
                "wholepath_guesses": self.wholepath_guesses}
