"""The planner's top-level API: plan, score, compare, write placement.json.

Legend: L layers, E experts, G GPUs, S slots per GPU.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .greedy import check_capacity, contiguous_placement, greedy_placement, round_robin_placement
from .ilp import ilp_placement, layer_bounds
from .metrics import CostModel, evaluate
from .placement import Placement
from .stats import TraceStats, trace_stats
from .topology import Topology
from .traces import RoutingTrace, to_jsonable

__all__ = ["PlanResult", "plan_placement", "compare_placements", "format_table", "write_placement_json",
           "instance_bounds", "make_topology", "share_bounds", "METHODS"]

METHODS = ("contiguous", "round-robin", "greedy", "ilp")


@dataclass
class PlanResult:
    """A plan and its scores. ``lower_bound`` bounds max/mean load (sum over layers of the
    heaviest GPU / sum of the mean) for this instance; ``gap`` = max_mean_load / lower_bound - 1."""

    placement: Placement
    method: str
    solve_seconds: float
    metrics: dict
    lower_bound: float
    gap: float
    lower_bound_given_counts: float | None = None
    metrics_out_of_sample: dict | None = None
    info: dict = field(default_factory=dict)

    @property
    def max_mean_load(self) -> float:
        return float(self.metrics["max_mean_load"])

    def to_json_dict(self, eplb: bool = False) -> dict:
        d = self.placement.to_json_dict(eplb=eplb)
        d.update({"method": self.method, "solve_seconds": self.solve_seconds,
                  "lower_bound_max_mean_load": self.lower_bound, "gap": self.gap,
                  "metrics": self.metrics})
        if self.lower_bound_given_counts is not None:
            d["lower_bound_given_replica_counts"] = self.lower_bound_given_counts
        if self.metrics_out_of_sample is not None:
            d["metrics_out_of_sample"] = self.metrics_out_of_sample
        if self.info:
            d["solver_info"] = self.info
        return d


def make_topology(num_experts: int, num_gpus: int, slots_per_gpu: int | None = None,
                  gpus_per_node: int | None = None, **bw) -> Topology:
    """Validate G / S against E and build a Topology (S defaults to E / G: no replication)."""
    if not isinstance(num_gpus, (int, np.integer)) or num_gpus <= 0:
        raise ValueError(f"num_gpus must be a positive integer, got {num_gpus!r}")
    if slots_per_gpu is None:
        if num_experts % num_gpus:
            raise ValueError(f"{num_experts} experts do not divide evenly over {num_gpus} GPUs; pass "
                             f"slots_per_gpu >= {-(-num_experts // num_gpus)} (the extra slots hold replicas "
                             f"of hot experts)")
        slots_per_gpu = num_experts // num_gpus
    if gpus_per_node is not None and (gpus_per_node <= 0 or num_gpus % gpus_per_node):
        raise ValueError(f"gpus_per_node={gpus_per_node} must divide num_gpus={num_gpus}")
    topo = Topology(int(num_gpus), int(slots_per_gpu), gpus_per_node, **bw)
    check_capacity(num_experts, topo)
    return topo


def instance_bounds(loads_LE: np.ndarray, topo: Topology) -> tuple[float, float]:
    """(global lower bound, bound given water-filling replica counts) on max/mean load."""
    loads_LE = np.atleast_2d(loads_LE)
    G, S = topo.num_gpus, topo.slots_per_gpu
    msum = loads_LE.sum() / G
    if msum <= 0:
        return 1.0, 1.0
    g = c = 0.0
    for l in range(loads_LE.shape[0]):
        a, b = layer_bounds(loads_LE[l], G, S)
        g += a
        c += b
    return g / msum, c / msum


def _stats_of(data) -> TraceStats:
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], RoutingTrace):
        from .traces import concat_traces
        data = concat_traces(list(data))
    return trace_stats(data)


def plan_placement(trace_or_loads, num_gpus: int, slots_per_gpu: int | None = None,
                   gpus_per_node: int | None = None, solver: str = "auto", time_limit: float = 60.0,
                   topology: Topology | None = None, n_jobs: int | None = None, balance_slack: float = 0.0,
                   rel_gap: float = 1e-4, progress: bool = False, score_on=None, batch_size: int | None = 256,
                   cost: CostModel | None = None, previous: Placement | None = None) -> PlanResult:
    """Plan a placement.

    ``trace_or_loads``: a RoutingTrace (or a list of them, concatenated), a TraceStats, or loads
    [L, E]. ``solver``: "auto"/"highs"/"cbc" (the ILP), "greedy", "contiguous", "round-robin".
    ``time_limit``: wall-clock budget in seconds for the ILP. ``balance_slack``: how much the
    ILP may raise max/mean load above its balanced optimum to cut cross-layer traffic (0: never).
    ``score_on``: another trace to score the plan out of sample."""
    stats = _stats_of(trace_or_loads)
    L, E = stats.loads.shape
    topo = topology or make_topology(E, num_gpus, slots_per_gpu, gpus_per_node)
    check_capacity(E, topo)
    method = solver.lower()
    t0 = time.perf_counter()
    info: dict = {}
    if method == "greedy":
        pl = greedy_placement(stats.loads, topo)
    elif method == "contiguous":
        pl = contiguous_placement(E, L, topo)
    elif method in ("round-robin", "roundrobin", "rr"):
        pl = round_robin_placement(E, L, topo)
    elif method in ("auto", "highs", "cbc", "ilp"):
        pl, ilp_info = ilp_placement(stats.loads, topo, stats.trans, solver="auto" if method == "ilp" else method,
                                     time_limit=time_limit, rel_gap=rel_gap, n_jobs=n_jobs,
                                     balance_slack=balance_slack, progress=progress)
        method = pl.meta["method"]
        info = {"solver": ilp_info.solver, "stage_seconds": ilp_info.stage_seconds,
                "greedy_max_mean_load": ilp_info.greedy_max_mean,
                "solver_bound_max_mean_load": ilp_info.bound_max_mean,
                "refined_layers": ilp_info.refine_improved, "exact_traffic_dp": ilp_info.exact_traffic,
                "balance_slack": balance_slack}
    else:
        raise ValueError(f"unknown solver {solver!r} (choose auto, highs, cbc, greedy, contiguous, round-robin)")
    pl.validate()
    secs = time.perf_counter() - t0
    data = trace_or_loads if isinstance(trace_or_loads, RoutingTrace) else stats
    if isinstance(trace_or_loads, (list, tuple)) and trace_or_loads and isinstance(trace_or_loads[0], RoutingTrace):
        from .traces import concat_traces
        data = concat_traces(list(trace_or_loads))
    metrics = evaluate(pl, data, topo, batch_size=batch_size, cost=cost, previous=previous)
    glob, given = instance_bounds(stats.loads, topo)
    if "solver_bound_max_mean_load" in info:
        given = max(given, info["solver_bound_max_mean_load"])
        if topo.num_slots == E:
            glob = max(glob, given)
    glob = min(glob, metrics["max_mean_load"])
    given = min(given, metrics["max_mean_load"])
    gap = metrics["max_mean_load"] / glob - 1 if glob > 0 else math.nan
    res = PlanResult(pl, method, secs, metrics, glob, gap,
                     lower_bound_given_counts=None if topo.num_slots == E else given, info=info)
    if score_on is not None:
        res.metrics_out_of_sample = score(pl, score_on, topo, batch_size=batch_size, cost=cost)
    return res


def score(placement: Placement, data, topo: Topology | None = None, **kw) -> dict:
    """Evaluate a placement on a trace (or list of traces, or stats): out-of-sample scoring."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], RoutingTrace):
        from .traces import concat_traces
        data = concat_traces(list(data))
    return evaluate(placement, data, topo, **kw)


def compare_placements(trace_or_loads, num_gpus: int, slots_per_gpu: int | None = None,
                       gpus_per_node: int | None = None, methods=METHODS, solver: str = "auto",
                       time_limit: float = 60.0, score_on=None, **kw) -> list[PlanResult]:
    """Plan with each method ("ilp" uses ``solver``) on the same data; score in and out of sample."""
    out = []
    for m in methods:
        out.append(plan_placement(trace_or_loads, num_gpus, slots_per_gpu, gpus_per_node,
                                  solver=solver if m == "ilp" else m, time_limit=time_limit,
                                  score_on=score_on, **kw))
    return share_bounds(out)


def share_bounds(results: list[PlanResult]) -> list[PlanResult]:
    """A lower bound is a property of the instance: give every result the best one and recompute gaps."""
    if not results:
        return results
    best = max(r.lower_bound for r in results)
    for r in results:
        r.lower_bound = best
        r.gap = r.max_mean_load / best - 1 if best > 0 else math.nan
    return results


_COLS = [("max/mean", "max_mean_load", "{:.4f}"), ("p95", "batch_max_mean_p95", "{:.3f}"),
         ("p99", "batch_max_mean_p99", "{:.3f}"), ("x-GPU", "cross_gpu_frac", "{:.4f}"),
         ("x-node", "cross_node_frac", "{:.4f}"), ("worst link", "worst_link_frac", "{:.4f}"),
         ("lat us/layer", "latency_us_per_layer", "{:.2f}")]


def format_table(results: list[PlanResult]) -> str:
    """A plain-text comparison table (in-sample, and out-of-sample rows where scored)."""
    head = ["method"] + [c[0] for c in _COLS] + ["mem/GPU", "solve s", "bound", "gap"]
    rows = []
    for r in results:
        for tag, m in (("", r.metrics), (" (oos)", r.metrics_out_of_sample)):
            if m is None:
                continue
            row = [r.method + tag]
            for _, key, fmt in _COLS:
                row.append(fmt.format(m[key]) if key in m else "-")
            mem = m.get("memory_per_gpu_bytes")
            row.append(_human_bytes(mem) if mem else f"{m['memory_per_gpu_slots']} slots")
            if tag:
                row += ["", "", ""]
            else:
                row += [f"{r.solve_seconds:.2f}", f"{r.lower_bound:.4f}", f"{100 * r.gap:.2f}%"]
            rows.append(row)
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.2f}{unit}"
        n /= 1024
    return f"{n:.2f}TiB"


def write_placement_json(path, result: PlanResult, eplb: bool = False, extra: dict | None = None) -> None:
    d = result.to_json_dict(eplb=eplb)
    if extra:
        d.update(extra)
    Path(path).write_text(json.dumps(to_jsonable(d), indent=1))


