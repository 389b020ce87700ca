"""Offloaded generation: an HF MoE model whose dense weights are in memory and whose routed
experts stay in an expert store, fetched through a budgeted cache.

Legend: L MoE layers, E experts per layer, K top-k.

API::

    om = load_offloaded(model_dir, budget="2GiB", policy="predictive", device="cpu")
    result = om.generate(input_ids, max_new_tokens=32)     # transformers' own generate (greedy)
    result.generated_ids, result.metrics                    # new tokens; tokens/s, hit rate, bytes
    om.close()

How the model is built without ever holding all experts: the HF model class is subclassed so
that, right after its ``__init__`` (which ``from_pretrained`` runs on the meta device), every
MoE block's experts module is replaced by a placeholder with no parameters that only carries
the experts' shapes as meta tensors. ``from_pretrained`` then loads the dense weights alone (the
checkpoint's expert keys match no parameter and are never read) with transformers' own key
renaming, dtype handling and buffer initialisation. :func:`moekit.hf.patch_model` turns the
blocks into MoELayers (router, shared expert: real tensors; experts: meta), and each layer's
experts module becomes an :class:`~moekit.offload.experts.OffloadedExperts` reading
:mod:`moekit.offload.store`. Attention, KV cache and ``generate`` stay transformers'.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from moekit.offload.experts import ExpertWeights, OffloadedExperts, OffloadRuntime
from moekit.offload.store import RamStore, StoreError, ensure_store, open_store

__all__ = ["OffloadedModel", "GenerationResult", "ManyResult", "load_offloaded", "auto_budget", "free_memory_bytes"]

MiB = 1 << 20


# ---- building the model without its experts --------------------------------------------------------

class _ExpertShapes(nn.Module):
    """Stands in for an HF experts module while the model loads: no parameters (nothing to load
    or initialise), the fused shapes as meta tensors and the activation, which is all
    :func:`moekit.hf.from_hf` reads from it."""

    def __init__(self, E: int, H: int, D: int, Fh: int, activation: str):
        super().__init__()
        object.__setattr__(self, "gate_up_proj", torch.empty(E, H, D, device="meta"))
        object.__setattr__(self, "down_proj", torch.empty(E, D, Fh, device="meta"))
        self.act_fn = nn.SiLU() if activation == "swiglu" else nn.GELU()


def _strip_experts(model: nn.Module) -> None:
    from moekit import hf as H

    for _, block, family in H._find_blocks(model):
        cfg, _ = H._read_block(block, family, "loop")
        if cfg.activation not in ("swiglu", "geglu"):
            raise NotImplementedError(f"offloaded experts with activation {cfg.activation}")
        H_ = 2 * cfg.ffn_hidden_size if cfg.is_glu else cfg.ffn_hidden_size
        block.experts = _ExpertShapes(cfg.num_experts, H_, cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation)


def _model_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{type(config).__name__} has no causal-LM model class in transformers") from None


def _dense_only_class(cls):
    """``cls`` whose instances drop their experts right after construction."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        _strip_experts(self)

    return type(f"ExpertsOffloaded{cls.__name__}", (cls,), {
        "__init__": __init__,
        # the checkpoint's expert tensors are left where they are (the store reads them)
        "_keys_to_ignore_on_load_unexpected": [r"\.experts\."],
    })


# ---- results ----------------------------------------------------------------------------------------

@dataclass
class GenerationResult:
    """``generated_ids``: the new tokens (list per sequence); ``sequences``: prompt + new tokens
    (LongTensor [B, S]); ``metrics``: see :meth:`OffloadedModel.generate`."""

    generated_ids: list[list[int]]
    sequences: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ManyResult:
    """:meth:`OffloadedModel.generate_many`: ``generated_ids`` per request in the order given;
    ``batches``: request indices per batch, in run order; ``batch_metrics``: each batch's
    :meth:`OffloadedModel.generate` metrics; ``metrics``: the whole call (see ``generate_many``)."""

    generated_ids: list[list[int]]
    batches: list[list[int]]
    batch_metrics: list[dict[str, Any]]
    metrics: dict[str, Any] = field(default_factory=dict)


class OffloadedModel:
    """An HF causal LM with offloaded experts (see :func:`load_offloaded`).

    ``model``: the HF model (patched; usable with ``generate`` or a plain forward),
    ``store``, ``cache`` (:class:`~moekit.offload.ExpertCache`), ``weights``
    (:class:`~moekit.offload.experts.ExpertWeights`: the experts held now, measured peak),
    ``runtime``, ``layers`` (the :class:`OffloadedExperts` per MoE layer)."""

    def __init__(self, model, store, cache, runtime: OffloadRuntime, layers: list[OffloadedExperts],
                 model_dir: Path, store_dir: Path, device: torch.device):
        self.model, self.store, self.cache, self.runtime, self.layers = model, store, cache, runtime, layers
        self.weights = runtime.weights
        self.model_dir, self.store_dir, self.device = model_dir, store_dir, device
        self._forward_calls = 0
        self._first_forward_end: Optional[float] = None
        self._prefill_counters: Optional[dict] = None   # counters when the prefill ended
        self._calibrating = False
        self.prefetcher = None   # a moekit.offload.prefetch.Prefetcher when prefetch is on
        self.rates = None        # moekit.offload.throughput.Rates once calibrate() ran
        model.register_forward_pre_hook(self._pre_forward)
        model.register_forward_hook(self._post_forward)

    # phase bookkeeping: the first forward of a generate call is the prefill, the rest decode
    def _pre_forward(self, module, args):
        if not self._calibrating:
            self.cache.set_phase("prefill" if self._forward_calls == 0 else "decode")

    def _post_forward(self, module, args, output):
        if self._calibrating:
            return
        self._forward_calls += 1
        if self._forward_calls == 1:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._first_forward_end = time.perf_counter()
            self._prefill_counters = self._counters()

    def calibrate(self, **kwargs):
        """Measure the rates the throughput model needs (:func:`moekit.offload.throughput.calibrate`);
        later :meth:`generate` calls then report the predicted decode tokens/s and bound."""
        from moekit.offload.throughput import calibrate

        self.rates = calibrate(self, **kwargs)
        return self.rates

    @property
    def budget_bytes(self) -> int:
        return self.cache.budget_bytes

    @property
    def min_budget_bytes(self) -> int:
        return type(self.cache).min_budget(self.store.expert_bytes, self.store.index.top_k)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 32,
                 **generate_kwargs: Any) -> GenerationResult:
        """Greedy generation with transformers' ``generate`` (``do_sample=False`` unless given).

        ``metrics``: ``prompt_tokens``, ``new_tokens``, ``seconds`` (wall, whole call),
        ``prefill_seconds``, ``decode_seconds``, ``tokens_per_s`` (new tokens / seconds),
        ``decode_tokens_per_s`` (tokens after the first / decode_seconds), ``hit_rate``,
        ``hit_rate_prefill``, ``hit_rate_decode`` (fractions of the expert requests the cache
        served from the fast tier), ``bytes_read`` (from the slow tier), ``bytes_read_per_token``
        (per new token), ``bytes_per_decode_token``, ``read_seconds``, ``read_bandwidth``
        (bytes/s while reading), ``io_bound_decode_tokens_per_s`` (read_bandwidth /
        bytes_per_decode_token: the speed if reading were all the work), ``peak_expert_bytes``
        (measured: the most expert weight bytes held at once), ``budget_bytes``,
        ``min_budget_bytes``, ``expert_bytes_total`` (all experts), ``policy``, ``page_cache``."""
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor([list(input_ids)], dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dtype != torch.long or input_ids.numel() == 0:
            raise ValueError(f"input_ids must be a non-empty LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"input_ids must lie in [0, vocab_size={vocab}), got ids from {int(input_ids.min())} "
                             f"to {int(input_ids.max())}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        input_ids = input_ids.to(self.device)
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("attention_mask", torch.ones_like(input_ids))
        if getattr(self.model.generation_config, "pad_token_id", None) is None:
            generate_kwargs.setdefault("pad_token_id", getattr(self.model.generation_config, "eos_token_id", None) or 0)
        before = self._counters()
        self.weights.reset_peak()
        self._forward_calls, self._first_forward_end, self._prefill_counters = 0, None, None
        t0 = time.perf_counter()
        out = self.model.generate(input_ids, max_new_tokens=max_new_tokens, **generate_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        self.runtime.drain()  # reads still in flight land now, outside the timed region
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        new = sequences[:, input_ids.shape[1]:].cpu()
        metrics = self._metrics(before, self._counters(), input_ids, new, t0, t1)
        return GenerationResult(generated_ids=new.tolist(), sequences=sequences.cpu(), metrics=metrics)

    @torch.no_grad()
    def route_signatures(self, prompts: Sequence[Sequence[int]], top_n: Optional[int] = None):
        """Bool ``[R, L, E]``: each prompt's predicted experts per MoE layer, training-free and without
        reading an expert: every MoE layer's router applied to the prompt's token embeddings ``[T, D]``
        (normalised by that decoder layer's ``post_attention_layernorm`` when it has one), i.e. the
        look-ahead predictor (:func:`~moekit.offload.predict.lookahead_topk`) from the model's input;
        per layer the ``top_n`` experts most of the prompt's tokens pick (default ``2 * top_k``: the
        union over a long prompt would hold nearly every expert and tell prompts apart poorly)."""
        import numpy as np

        from moekit.layer import moe_layers
        from moekit.offload.schedule import route_sets

        found = list(moe_layers(self.model))
        emb = self.model.get_input_embeddings()
        modules = dict(self.model.named_modules())
        E = self.store.index.num_experts
        K = self.store.index.top_k
        out = np.zeros((len(prompts), len(found), E), dtype=bool)
        for r, ids in enumerate(prompts):
            x_TD = emb(torch.as_tensor(list(ids), dtype=torch.long, device=self.device))
            ids_LTK = []
            for name, layer in found:
                parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
                norm = getattr(parent, "post_attention_layernorm", None)
                h_TD = norm(x_TD) if norm is not None else x_TD * torch.rsqrt(x_TD.pow(2).mean(-1, keepdim=True) + 1e-6)
                ids_LTK.append(layer.router(h_TD.to(layer.router.weight.dtype)).topk_ids_TK.cpu().numpy())
            out[r] = route_sets(np.stack(ids_LTK, axis=1), E, top_n=top_n or 2 * K)
        return out

    def generate_many(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, batch_size: int = 4,
                      schedule: str = "similar", signatures=None, **generate_kwargs: Any) -> ManyResult:
        """Greedy generation for several prompts (token-id lists), ``batch_size`` at a time: each batch
        is one :meth:`generate` call (transformers' own, prompts left-padded, attention mask over the
        padding), so every request's tokens are what transformers' ``generate`` gives for that batch.

        ``schedule``: ``"similar"`` (:func:`moekit.offload.schedule.schedule` on the predicted routes,
        ``signatures`` ``[R, L, E]`` or by default :meth:`route_signatures`: requests whose routes look
        alike share a batch, so a batch needs fewer distinct experts) or ``"fifo"`` (the order given).

        ``metrics``: ``num_requests``, ``num_batches``, ``batch_size``, ``schedule``, ``new_tokens`` (real
        requests' tokens), ``seconds``, ``tokens_per_s``, ``hit_rate_prefill`` / ``_decode``,
        ``bytes_read``, ``bytes_per_decode_token`` (decode bytes / decode tokens of all rows),
        ``distinct_experts_per_decode_pass`` (measured: mean distinct experts a decode step of a batch
        needed per MoE layer), ``predicted_distinct_experts`` (the signatures' union per batch and
        layer, mean), ``schedule_seconds`` (signatures + scheduling), ``peak_expert_bytes``,
        ``budget_bytes``."""
        import numpy as np

        from moekit.offload import schedule as S

        prompts = [list(map(int, p)) for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if schedule not in S.METHODS:
            raise ValueError(f"schedule must be one of {S.METHODS}, got {schedule!r}")
        t0 = time.perf_counter()
        sig = None
        if schedule == "similar" or signatures is not None:
            sig = np.asarray(signatures, dtype=bool) if signatures is not None else self.route_signatures(prompts)
            if sig.shape[0] != len(prompts):
                raise ValueError(f"signatures must be [R={len(prompts)}, L, E], got {sig.shape}")
        batches = S.schedule(sig, batch_size, schedule) if schedule == "similar" else \
            S.fifo_batches(len(prompts), batch_size)
        t_sched = time.perf_counter() - t0
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.model.generation_config, "eos_token_id", None) or 0
        pad = pad[0] if isinstance(pad, (list, tuple)) else int(pad)
        generate_kwargs.setdefault("pad_token_id", pad)
        before = self._counters()
        peak = 0
        out: list[Optional[list[int]]] = [None] * len(prompts)
        per_batch = []
        t1 = time.perf_counter()
        for b in batches:
            n = max(len(prompts[r]) for r in b)
            ids = torch.full((len(b), n), pad, dtype=torch.long)
            mask = torch.zeros((len(b), n), dtype=torch.long)
            for i, r in enumerate(b):             # left padding: every row's last token is real
                ids[i, n - len(prompts[r]):] = torch.tensor(prompts[r])
                mask[i, n - len(prompts[r]):] = 1
            res = self.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask.to(self.device),
                                **generate_kwargs)
            for i, r in enumerate(b):
                out[r] = res.generated_ids[i]
            per_batch.append(res.metrics)
            peak = max(peak, res.metrics["peak_expert_bytes"])
        seconds = time.perf_counter() - t1
        d = {k: v - before[k] for k, v in self._counters().items()}

        def rate(ph):
            req = d[f"{ph}_hits"] + d[f"{ph}_misses"] + d[f"{ph}_streamed"]
            return d[f"{ph}_hits"] / req if req else None

        new_tokens = sum(len(o) for o in out)
        decode_rows = sum(len(b) * max(m["new_tokens"] // max(m["batch"], 1) - 1, 0) for b, m in zip(batches, per_batch))
        dec_req = d["decode_hits"] + d["decode_misses"] + d["decode_streamed"]
        metrics = {
            "num_requests": len(prompts), "num_batches": len(batches), "batch_size": batch_size, "schedule": schedule,
            "new_tokens": new_tokens, "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds > 0 else None,
            "hit_rate_prefill": rate("prefill"), "hit_rate_decode": rate("decode"),
            "bytes_read": int(d["bytes_read"]),
            "bytes_per_decode_token": (d["decode_bytes_loaded"] + d["decode_prefetch_bytes"]) / decode_rows
            if decode_rows else None,
            "distinct_experts_per_decode_pass": dec_req / d["decode_accesses"] if d["decode_accesses"] else None,
            "predicted_distinct_experts": float(S.batch_costs(sig, batches).mean() / sig.shape[1])
            if sig is not None else None,
            "schedule_seconds": t_sched, "peak_expert_bytes": int(peak), "budget_bytes": int(self.budget_bytes),
            "policy": self.cache.policy_name,
        }
        return ManyResult(generated_ids=out, batches=batches, batch_metrics=per_batch, metrics=metrics)  # type: ignore[arg-type]

    def _counters(self) -> dict[str, Any]:
        st = self.cache.stats
        snap = {f"{ph}_{k}": getattr(st[ph], k) for ph in ("prefill", "decode")
                for k in ("hits", "misses", "streamed", "bytes_loaded", "prefetch_bytes")}
        snap.update(bytes_read=self.store.bytes_read, read_seconds=self.store.read_seconds)
        snap.update({f"decode_{k}": getattr(st["decode"], k) for k in ("prefetched", "prefetch_hits", "accesses")})
        rs = self.runtime.stats
        snap.update(prefetch_loads=rs.prefetch_loads, prefetch_dropped=rs.prefetch_dropped,
                    prefetch_wait_seconds=rs.prefetch_wait_seconds, prefetch_read_seconds=rs.prefetch_read_seconds,
                    load_seconds=rs.load_seconds, compute_seconds=rs.compute_seconds,
                    slow_tier_computes=rs.slow_tier_computes)
        if self.prefetcher is not None:
            snap.update(self.prefetcher.counters())
        return snap

    def _metrics(self, a, b, input_ids, new, t0, t1) -> dict[str, Any]:
        d = {k: b[k] - a[k] for k in a}
        B, P = input_ids.shape
        n_new = int(new.shape[1])
        seconds = t1 - t0
        first = self._first_forward_end or t1
        prefill_s, decode_s = first - t0, t1 - first
        decode_tokens = max(n_new - 1, 0)

        def rate(ph):
            req = d[f"{ph}_hits"] + d[f"{ph}_misses"] + d[f"{ph}_streamed"]
            return d[f"{ph}_hits"] / req if req else None

        req_all = sum(d[f"{ph}_{k}"] for ph in ("prefill", "decode") for k in ("hits", "misses", "streamed"))
        hits_all = d["prefill_hits"] + d["decode_hits"]
        decode_bytes = d["decode_bytes_loaded"] + d["decode_prefetch_bytes"]
        bpdt = decode_bytes / (B * decode_tokens) if decode_tokens else None
        bw = d["bytes_read"] / d["read_seconds"] if d["read_seconds"] > 0 else None
        return {
            "prompt_tokens": int(B * P), "new_tokens": int(B * n_new), "batch": int(B),
            "seconds": seconds, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "tokens_per_s": B * n_new / seconds if seconds > 0 else None,
            "decode_tokens_per_s": B * decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
            "hit_rate": hits_all / req_all if req_all else None,
            "hit_rate_prefill": rate("prefill"), "hit_rate_decode": rate("decode"),
            "bytes_read": int(d["bytes_read"]),
            "bytes_read_per_token": d["bytes_read"] / (B * n_new) if n_new else None,
            "bytes_per_decode_token": bpdt,
            "read_seconds": d["read_seconds"], "read_bandwidth": bw,
            "io_bound_decode_tokens_per_s": (bw / bpdt) if bw and bpdt else None,
            "peak_expert_bytes": int(self.weights.peak_bytes), "budget_bytes": int(self.budget_bytes),
            "min_budget_bytes": int(self.min_budget_bytes), "expert_bytes_total": int(self.store.index.total_bytes),
            "policy": self.cache.policy_name, "page_cache": getattr(self.store, "page_cache", "ram"),
            **self._prefetch_metrics(d, B, decode_tokens),
            **self._decode_breakdown(b, decode_tokens, decode_s),
            **self._model_metrics(d, B, decode_tokens),
        }

    def _decode_breakdown(self, end: dict, decode_tokens: int, decode_s: float) -> dict[str, Any]:
        """Where a decode step's wall time went (decode steps only, the prefill's share left out),
        per step: ``decode_step_seconds``, ``decode_demand_read_seconds`` (demand loads on the
        critical path), ``decode_expert_compute_seconds`` (expert MLPs), ``decode_prefetch_wait_seconds``
        (blocked on a read in flight) and ``decode_other_seconds`` (the rest: dense part, routing,
        dispatch, bookkeeping); beside the throughput model's terms they show which one is off."""
        a = self._prefill_counters
        if a is None or not decode_tokens:
            return {}
        n = decode_tokens
        out = {"decode_step_seconds": decode_s / n,
               "decode_demand_read_seconds": (end["load_seconds"] - a["load_seconds"]) / n,
               "decode_expert_compute_seconds": (end["compute_seconds"] - a["compute_seconds"]) / n,
               "decode_prefetch_wait_seconds": (end["prefetch_wait_seconds"] - a["prefetch_wait_seconds"]) / n}
        out["decode_other_seconds"] = out["decode_step_seconds"] - out["decode_demand_read_seconds"] - \
            out["decode_expert_compute_seconds"] - out["decode_prefetch_wait_seconds"]
        return out

    def _prefetch_metrics(self, d, B, decode_tokens) -> dict[str, Any]:
        """``prefetch`` (on/off), ``prefetch_horizon`` (last look-ahead used), ``prediction_recall``
        (fraction of the experts the routers picked that the look-ahead had predicted, per token),
        ``prediction_recall_prefill`` / ``_decode``, ``prefetched`` (experts read ahead),
        ``prefetch_hits`` (decode requests served by a prefetched expert on its first use),
        ``prefetch_dropped`` (read ahead, evicted unused), ``prefetch_wait_seconds`` (blocked on
        a read still in flight), ``demand_load_seconds``, ``expert_compute_seconds``,
        ``slow_tier_computes`` (misses computed where they live); with prefetch on also
        ``prefetch_predictor`` (``lookahead`` / ``wholepath``) and ``wholepath_guesses`` (layer
        predictions the whole-path predictor made; the rest were the router look-ahead's)."""
        out: dict[str, Any] = {"prefetch": self.prefetcher is not None, "prefetched": int(d["prefetch_loads"]),
                               "prefetch_hits": int(d["decode_prefetch_hits"]),
                               "prefetch_dropped": int(d["prefetch_dropped"]),
                               "prefetch_wait_seconds": d["prefetch_wait_seconds"],
                               "demand_load_seconds": d["load_seconds"], "expert_compute_seconds": d["compute_seconds"],
                               "slow_tier_computes": int(d["slow_tier_computes"])}
        if self.prefetcher is not None:
            def rec(ph):
                tot = d[f"recall_total_{ph}"]
                return d[f"recall_hits_{ph}"] / tot if tot else None

            tot = d["recall_total_prefill"] + d["recall_total_decode"]
            out.update(prefetch_predictor=self.prefetcher.predictor, wholepath_guesses=int(d["wholepath_guesses"]),
                       prefetch_horizon=self.prefetcher.horizon,
                       prediction_recall=(d["recall_hits_prefill"] + d["recall_hits_decode"]) / tot if tot else None,
                       prediction_recall_prefill=rec("prefill"), prediction_recall_decode=rec("decode"))
        return out

    def _model_metrics(self, d, B, decode_tokens) -> dict[str, Any]:
        """With :meth:`calibrate` done: ``predicted_decode_tokens_per_s`` and ``predicted_bound``
        from :func:`moekit.offload.throughput.predict_decode` on the calibrated rates and this
        run's measured decode hit rate and prefetch reads; ``predicted_io_bound_tokens_per_s``,
        ``predicted_compute_bound_tokens_per_s``; per decode step (seconds, to set beside the
        measured ``decode_*_seconds``): ``predicted_step_seconds``, ``predicted_dense_seconds``,
        ``predicted_expert_compute_seconds``, ``predicted_demand_read_seconds``,
        ``predicted_prefetch_read_seconds`` (background)."""
        if self.rates is None or not decode_tokens:
            return {}
        from moekit.offload.throughput import ModelShape, predict_decode

        req = d["decode_hits"] + d["decode_misses"] + d["decode_streamed"]
        if not req:
            return {}
        steps = decode_tokens
        shape = ModelShape.of_store(self.store.index)
        p = predict_decode(shape, self.rates, hit_rate=d["decode_hits"] / req, batch=B,
                           prefetch_reads=d["decode_prefetched"] / steps, requests=req / steps,
                           overlap_misses=self.runtime.overlap_misses)
        t_dense = self.rates.dense_seconds * B / max(self.rates.dense_batch, 1)
        return {"predicted_decode_tokens_per_s": p.tokens_per_s, "predicted_bound": p.bound,
                "predicted_step_seconds": p.step_seconds, "predicted_dense_seconds": t_dense,
                "predicted_expert_compute_seconds": p.compute_seconds - t_dense,
                "predicted_demand_read_seconds": p.demand_read_seconds,
                "predicted_prefetch_read_seconds": p.prefetch_read_seconds,
                "predicted_io_bound_tokens_per_s": p.io_bound_tokens_per_s,
                "predicted_compute_bound_tokens_per_s": p.compute_bound_tokens_per_s,
                "calibrated_rates": {k: v for k, v in vars(self.rates).items()}}

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.remove()
        self.runtime.close()
        self.weights.clear()
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _host_compute_factor(store, activation: str, device: torch.device, repeat: int = 20) -> float:
    """Host time / device time of one expert's MLP on one row (for the miss cost model)."""
    from moekit.offload.experts import _expert_mlp
    from moekit.offload.throughput import _median_time

    w_host = store.read(0, 0, None)
    w_dev = tuple(t.to(device) for t in w_host)
    x = torch.randn(1, w_host[1].shape[0], dtype=w_host[0].dtype)
    xd = x.to(device)

    host = _median_time(lambda: _expert_mlp(x, w_host, activation), repeat)
    dev = _median_time(lambda: (_expert_mlp(xd, w_dev, activation), torch.cuda.synchronize(device)), repeat)
    return host / max(dev, 1e-9)


# ---- budget -------------------------------------------------------------------------------------------

def free_memory_bytes(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(free bytes on ``device``, where the figure came from). CPU: the OS's MemAvailable
    (/proc/meminfo; sysconf elsewhere). CUDA: NVML (nvidia-ml-py), falling back to
    ``torch.cuda.mem_get_info`` when the NVML library is missing or fails."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(index)
                return int(pynvml.nvmlDeviceGetMemoryInfo(h).free), "NVML"
            finally:
                pynvml.nvmlShutdown()
        except Exception:  # ImportError, NVMLError (library not found, driver mismatch ...)
            free, _ = torch.cuda.mem_get_info(index)
            return int(free), "torch.cuda.mem_get_info (NVML unavailable)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "/proc/meminfo MemAvailable"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "sysconf(SC_AVPHYS_PAGES)"
    except (ValueError, OSError, AttributeError):
        raise RuntimeError("cannot read the free memory of this machine; give the budget in bytes") from None


def auto_budget(expert_bytes_total: int, dense_bytes: int, device: torch.device | str = "cpu",
                fraction: float = 0.8) -> tuple[int, str]:
    """Budget for ``--budget auto``: ``fraction`` of the free memory on ``device`` after the
    dense weights, at most every expert. Returns (bytes, how it was found)."""
    free, source = free_memory_bytes(device)
    budget = int(fraction * max(free - dense_bytes, 0))
    return min(budget, int(expert_bytes_total)), f"{fraction:.0%} of free memory after dense weights ({source})"


# ---- loading -----------------------------------------------------------------------------------------

def load_offloaded(model_dir: str | os.PathLike, budget: int | str, *, store_dir: Optional[str | os.PathLike] = None,
                   policy: str = "predictive", device: str | torch.device = "cpu", tier: str = "disk",
                   page_cache: str = "keep", verify: bool = True, dtype: Optional[torch.dtype] = None,
                   profile=None, progress: Optional[bool] = None, prefetch: bool = False,
                   horizon: int | str = "auto", miss_model=None, prefetch_predictor: str = "lookahead",
                   path_predictor=None, path_threshold: float = 0.5,
                   overlap_misses: bool = True) -> OffloadedModel:
    """An :class:`OffloadedModel` for the HF checkpoint in ``model_dir``.

    ``budget``: bytes of expert weights the fast tier may hold (an int, a size like
    ``"2GiB"``, or ``"auto"``: see :func:`auto_budget`); below one token's working set
    (``sum_l top_k * expert bytes``) it is refused with the minimum stated. ``store_dir``:
    the expert store (default next to the model, converted on first use with a progress
    bar). ``tier``: ``"disk"`` (read on each miss) or ``"ram"`` (all experts in host memory).
    ``page_cache``: ``keep`` / ``drop`` / ``direct`` (see :mod:`moekit.offload.store`).
    ``dtype``: the model's dtype (default: the store's, which is the checkpoint's); the
    experts must be computed in the store's dtype. ``profile``: [L, E] routing counts for the
    cache (``static`` pins from it). ``prefetch``: look-ahead prediction and background reads
    (:class:`~moekit.offload.prefetch.Prefetcher`; ``horizon`` an int or ``"auto"``: from the
    measured read and compute times; ``prefetch_predictor``: ``"lookahead"``, the next layers'
    routers on the current hidden state, or ``"wholepath"``, the token's experts so far matched
    against recorded paths, :class:`~moekit.offload.predict.WholePathPredictor`, learned online
    from the prompt and each finished token, optionally given pre-fitted as ``path_predictor``,
    prefetching experts whose estimated probability is at least ``path_threshold``; see
    :mod:`moekit.offload.prefetch`). ``miss_model``: ``"auto"`` (only with ``device="cuda"``
    and ``tier="ram"``: calibrate a :class:`~moekit.offload.throughput.MissCostModel` and
    compute a miss on the CPU where that is cheaper than copying it; not run on a GPU in this
    repository's tests), a ``MissCostModel``, or None. ``overlap_misses``: read a layer's
    misses on a reader thread while its resident experts compute (default), or each on demand
    before the layer computes (:class:`~moekit.offload.experts.OffloadRuntime`)."""
    import transformers

    from moekit import hf as H
    from moekit.layer import moe_layers
    from moekit.offload.cache import ExpertCache

    from moekit.offload.policies import POLICIES, Belady

    if policy == Belady.name:
        raise ValueError(f"policy {policy!r} is an offline oracle (it needs the future accesses): use it with "
                         f"`moekit simulate`; for generation pick one of {[n for n in POLICIES if n != Belady.name]}")
    model_dir = Path(model_dir)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    store_dir = ensure_store(model_dir, store_dir, progress=progress)
    if tier not in ("disk", "ram"):
        raise ValueError(f"tier must be 'disk' or 'ram', got {tier!r}")
    store = open_store(store_dir, model_dir=model_dir, tier="disk", page_cache=page_cache, verify=verify)
    try:
        index = store.index
        if dtype is not None and dtype != index.torch_dtype:
            raise ValueError(f"dtype={dtype} differs from the expert store's {index.torch_dtype}; the offloaded "
                             f"experts compute in the store's dtype")
        if isinstance(budget, str) and budget.strip().lower() != "auto":
            from moekit.offload.simulate import parse_bytes

            budget = parse_bytes(budget)
        make_cache = lambda b: ExpertCache(int(b), index.expert_bytes, index.num_experts, index.top_k,  # noqa: E731
                                           policy=policy, profile=profile)
        cache = None if isinstance(budget, str) else make_cache(budget)  # refused before any loading
        if tier == "ram":
            disk, store = store, None
            try:
                store = RamStore(disk, progress=bool(progress))
            finally:
                disk.close()
        hf_config = transformers.AutoConfig.from_pretrained(model_dir)
        cls = _dense_only_class(_model_class(hf_config))
        model = cls.from_pretrained(model_dir, dtype=index.torch_dtype)
        H.patch_model(model, backend="loop")
        if cache is None:  # budget="auto": what is free once the dense weights are in
            dense = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
            cache = make_cache(auto_budget(index.total_bytes, dense, device)[0])
        runtime = OffloadRuntime(store, cache, ExpertWeights(), device=device, activation=index.activation,
                                 overlap_misses=overlap_misses)
        layers: list[OffloadedExperts] = []
        found = list(moe_layers(model))
        if [n for n, _ in found] != [e.module for e in index.layers]:
            raise StoreError(f"{store_dir}: the store's MoE layers {[e.module for e in index.layers]} are not the "
                             f"model's {[n for n, _ in found]}")
        for (name, layer), entry in zip(found, index.layers):
            c = layer.config
            H_ = 2 * c.ffn_hidden_size if c.is_glu else c.ffn_hidden_size
            if (entry.num_experts, entry.w_in_shape, entry.w_out_shape, index.activation) != \
                    (c.num_experts, (H_, c.hidden_size), (c.hidden_size, c.ffn_hidden_size), c.activation):
                raise StoreError(f"{store_dir}: layer {name} in the store has E={entry.num_experts}, w_in "
                                 f"{entry.w_in_shape}, w_out {entry.w_out_shape}, {index.activation}; the model has "
                                 f"E={c.num_experts}, [{H_}, {c.hidden_size}], [{c.hidden_size}, {c.ffn_hidden_size}], "
                                 f"{c.activation}")
            experts = OffloadedExperts(entry.layer, runtime, c.num_experts, c.hidden_size)
            layer.experts = experts
            # patch_model made these on the meta device with the experts; they are counters
            layer.tokens_per_expert = torch.zeros(c.num_experts, dtype=torch.long)
            layer.expert_load = torch.zeros(c.num_experts, dtype=torch.long)
            layers.append(experts)
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"offloaded model still has tensors on the meta device: {meta[:5]}")
        model.to(device).eval()
        om = OffloadedModel(model, store, cache, runtime, layers, model_dir, Path(store_dir), device)
        if miss_model is not None:
            if device.type != "cuda" or tier != "ram":
                raise ValueError("miss_model (compute a miss where it lives) needs device='cuda' and tier='ram': on "
                                 "a CPU-only machine both tiers are host memory")
            if miss_model == "auto":
                from moekit.offload.throughput import MissCostModel

                rates = om.calibrate()
                rates.slow_compute_factor = _host_compute_factor(store, index.activation, device)
                miss_model = MissCostModel(rates, index.expert_bytes, found[0][1].config.hidden_size,
                                           act_bytes=torch.tensor([], dtype=index.torch_dtype).element_size())
            runtime.miss_model = miss_model
        if prefetch:
            from moekit.offload.prefetch import Prefetcher

            om.prefetcher = Prefetcher(runtime, [layer for _, layer in found], horizon=horizon,
                                       predictor=prefetch_predictor, path_predictor=path_predictor,
                                       path_threshold=path_threshold)
        elif prefetch_predictor != "lookahead" or path_predictor is not None:
            raise ValueError("prefetch_predictor / path_predictor need prefetch=True")
        return om
    except BaseException:
        if store is not None:
            store.close()
        raise
