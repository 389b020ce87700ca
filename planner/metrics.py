"""Scoring a placement on a trace (in or out of sample).

Legend: L layers, E experts, G GPUs, T tokens, K top-k.

Definitions (all in ``evaluate``'s returned dict):

* ``max_mean_load``: sum over layers of the heaviest GPU's tokens / sum over layers of the
  mean GPU's tokens (the MoE part of a step takes as long as its slowest GPU, layer after
  layer; 1.0 is perfect balance). ``max_mean_load_worst_layer``: the worst single layer.
* ``batch_max_mean_p50/p95/p99``: the same ratio for each batch of ``batch_size`` consecutive
  tokens of the trace, then percentiles over batches (``batch_size`` None: ``auto_batch_size``).
* ``cross_gpu_frac``: share of consecutive-layer expert pairs (e1 at l, e2 at l+1 of one
  token, all K*K pairs) whose experts are on different GPUs; replicas split a token
  equally. ``cross_node_frac``: the same across nodes.
* ``worst_link_frac``: the heaviest directed GPU pair's share of a boundary's pairs (max
  over boundaries).
* ``latency_us_per_layer``: a modeled MoE layer time: compute = heaviest GPU's
  token-experts x ``us_per_token_expert``; communication = the slowest link's bytes /
  bandwidth, a token crossing from layer l to l+1 counted once per destination expert
  (pairs / K); averaged over layers.
* ``memory_per_gpu_bytes``: slots per GPU x sum of per-layer expert bytes (or slots per GPU
  x layers in ``memory_per_gpu_slots`` when bytes are unknown).
* ``migration_experts`` / ``migration_bytes`` / ``migration_bytes_max_gpu``: expert copies a
  GPU must receive to go from ``previous`` to this placement.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import PlanInputError
from .placement import Placement
from .stats import TraceStats, trace_stats
from .topology import Topology
from .traces import RoutingTrace

__all__ = ["CostModel", "evaluate", "gpu_traffic", "load_imbalance", "migration_cost", "auto_batch_size"]


@dataclass
class CostModel:
    """Constants of the modeled layer latency (defaults: Mixtral-like, bf16, H100-class)."""

    token_bytes: float = 4096 * 2          # hidden size x bytes per element
    us_per_token_expert: float = 1.0e-3    # ~350 MFLOP per token-expert at ~350 TFLOP/s


def load_imbalance(gpu_loads_LG: np.ndarray) -> tuple[float, float]:
    """(sum_l max_g / sum_l mean_g, worst layer's max/mean) of [L, G] GPU loads."""
    g = np.asarray(gpu_loads_LG, dtype=np.float64)
    mean = g.mean(axis=1)
    mx = g.max(axis=1)
    ok = mean > 0
    if not ok.any():
        return 1.0, 1.0
    return float(mx[ok].sum() / mean[ok].sum()), float((mx[ok] / mean[ok]).max())


def gpu_traffic(placement: Placement, trans: np.ndarray) -> np.ndarray:
    """[L-1, G, G] expert pairs from GPU g1 (layer l) to GPU g2 (layer l+1)."""
    out = np.zeros((trans.shape[0], placement.num_gpus, placement.num_gpus))
    M = [placement.share_matrix(l) for l in range(placement.num_layers)]
    for l in range(trans.shape[0]):
        out[l] = M[l].T @ trans[l] @ M[l + 1]
    return out


def migration_cost(previous: Placement, new: Placement, expert_bytes=None) -> dict:
    """Expert copies each GPU must receive (experts it holds in ``new`` but not in ``previous``)."""
    if previous.num_gpus != new.num_gpus or previous.num_layers != new.num_layers:
        raise ValueError("previous and new placements differ in GPUs or layers")
    G, L = new.num_gpus, new.num_layers
    per_gpu = np.zeros(G)
    per_gpu_bytes = np.zeros(G)
    for l in range(L):
        b = float(expert_bytes[l]) if expert_bytes is not None else 0.0
        old = previous.phy2log[l].reshape(G, previous.slots_per_gpu)
        nw = new.phy2log[l].reshape(G, new.slots_per_gpu)
        for g in range(G):
            n = len(set(nw[g].tolist()) - set(old[g].tolist()))
            per_gpu[g] += n
            per_gpu_bytes[g] += n * b
    return {"migration_experts": int(per_gpu.sum()), "migration_experts_max_gpu": int(per_gpu.max()),
            "migration_bytes": float(per_gpu_bytes.sum()), "migration_bytes_max_gpu": float(per_gpu_bytes.max())}


def auto_batch_size(num_tokens: int) -> int:
    """Tokens per batch for the per-batch percentiles: 256 (a serving step's worth) on traces of
    2048 tokens or more; on shorter ones T/8 (at least 8), so there are still 8 batches."""
    return 256 if num_tokens >= 2048 else max(8, num_tokens // 8)


def resolve_batch_size(batch_size: int | None, stats: TraceStats) -> int | None:
    """``batch_size``, or the automatic one for the stats' trace; None when there is no trace
    (loads alone carry no token order)."""
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size <= 0):
        raise PlanInputError("{batch_size} must be a positive integer, got {0!r}", batch_size)
    if stats.trace is None:
        return None
    return int(batch_size) if batch_size is not None else auto_batch_size(min(stats.trace.num_tokens))


def _batch_ratios(placement: Placement, trace: RoutingTrace, batch_size: int) -> np.ndarray:
    E, G, L = placement.num_experts, placement.num_gpus, placement.num_layers
    T = min(trace.num_tokens)
    nb = T // batch_size
    if nb == 0:
        return np.zeros(0)
    mx = np.zeros(nb)
    mean = np.zeros(nb)
    for l in range(L):
        ids = trace.topk_ids[l][: nb * batch_size].reshape(nb, batch_size * trace.top_k)
        valid = ids >= 0
        b_idx = np.broadcast_to(np.arange(nb)[:, None], ids.shape)
        cnt = np.zeros((nb, E))
        np.add.at(cnt, (b_idx[valid], ids[valid]), 1.0)
        gl = cnt @ placement.share_matrix(l)
        mx += gl.max(axis=1)
        mean += gl.mean(axis=1)
    ok = mean > 0
    return mx[ok] / mean[ok]


def evaluate(placement: Placement, data, topo: Topology | None = None, batch_size: int | None = None,
             cost: CostModel | None = None, previous: Placement | None = None,
             expert_bytes=None) -> dict:
    """Score ``placement`` on ``data`` (a RoutingTrace or a list of them, TraceStats or loads
    [L, E]; see :func:`trace_stats`) and the module doc."""
    stats: TraceStats = trace_stats(data)
    L, E = stats.loads.shape
    if L != placement.num_layers or E != placement.num_experts:
        raise ValueError(f"placement is for {placement.num_layers} layers x {placement.num_experts} experts, "
                         f"data has {L} x {E}")
    topo = topo or Topology(placement.num_gpus, placement.slots_per_gpu)
    cost = cost or CostModel()
    if expert_bytes is None:
        expert_bytes = stats.expert_bytes
    G = placement.num_gpus
    gl = placement.gpu_loads(stats.loads)
    ratio, worst = load_imbalance(gl)
    out = {"max_mean_load": ratio, "max_mean_load_worst_layer": worst}
    batch_size = resolve_batch_size(batch_size, stats)
    if batch_size is not None:
        r = _batch_ratios(placement, stats.trace, batch_size)
        if r.size:
            out.update({"batch_size": int(batch_size), "num_batches": int(r.size),
                        "batch_max_mean_p50": float(np.percentile(r, 50)),
                        "batch_max_mean_p95": float(np.percentile(r, 95)),
                        "batch_max_mean_p99": float(np.percentile(r, 99))})
    compute_us = gl.max(axis=1) * cost.us_per_token_expert
    comm_us = np.zeros(L)
    if stats.trans is not None and L > 1:
        traffic = gpu_traffic(placement, stats.trans)
        total = traffic.sum(axis=(1, 2))
        diag = np.einsum("lgg->l", traffic)
        node = np.arange(G) // topo.gpus_per_node
        same_node = node[:, None] == node[None, :]
        intra = (traffic * same_node).sum(axis=(1, 2))
        off = traffic.copy()
        idx = np.arange(G)
        off[:, idx, idx] = 0
        tot = total.sum()
        out["cross_gpu_frac"] = float((tot - diag.sum()) / tot) if tot > 0 else 0.0
        out["cross_node_frac"] = float((tot - intra.sum()) / tot) if tot > 0 else 0.0
        with np.errstate(invalid="ignore", divide="ignore"):
            out["worst_link_frac"] = float(np.nanmax(np.where(total[:, None, None] > 0,
                                                              off / np.maximum(total, 1e-300)[:, None, None], 0)))
        bw = topo.bandwidth_matrix()
        # a token entering expert e2 at l+1 from its K_l experts at l: pairs / K_l tokens
        k_l = np.maximum(total / np.maximum(stats.loads[1:].sum(axis=1), 1e-300), 1.0)
        link_s = (off / k_l[:, None, None]) * cost.token_bytes / (bw[None] * 1e9)
        comm_us[:-1] = link_s.reshape(L - 1, -1).max(axis=1) * 1e6
        out["worst_link_us"] = float(comm_us.max())
        out["cross_gpu_pairs"] = float(tot - diag.sum())
    out["latency_us_per_layer"] = float((compute_us + comm_us).mean())
    out["compute_us_per_layer"] = float(compute_us.mean())
    out["comm_us_per_layer"] = float(comm_us.mean())
    S = placement.slots_per_gpu
    out["memory_per_gpu_slots"] = int(S * L)
    if expert_bytes is not None:
        out["memory_per_gpu_bytes"] = float(S * float(np.sum(expert_bytes)))
    if previous is not None:
        out.update(migration_cost(previous, placement, expert_bytes))
    return out
