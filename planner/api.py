"""The planner's top-level API: plan, score, compare, write placement.json.

Legend: L layers, E experts, G GPUs, S slots per GPU.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import PlanInputError
from .greedy import check_capacity, contiguous_placement, greedy_placement, round_robin_placement
from .ilp import ilp_placement, layer_bounds
from .metrics import CostModel, evaluate, resolve_batch_size
from .placement import Placement
from .stats import TraceStats, trace_stats
from .topology import Topology, local_topology
from .traces import to_jsonable

__all__ = ["PlanResult", "plan_placement", "score", "compare_placements", "format_table", "write_placement_json",
           "instance_bounds", "make_topology", "even_slots", "share_bounds", "METHODS"]

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


def make_topology(num_experts: int, num_gpus: int | None = None, slots_per_gpu: int | None = None,
                  gpus_per_node: int | None = None, local: bool = False, **bw) -> Topology:
    """Validate the cluster against E experts and build its Topology.

    ``local``: nodes laid out like this machine, read through NVML (see ``local_topology``;
    ``num_gpus`` then defaults to one node). ``slots_per_gpu`` defaults to E / G (every expert
    once, no replication). ``bw``: ``intra_node_bw`` / ``inter_node_bw`` in GB/s, None for the
    default."""
    bw = {k: v for k, v in bw.items() if v is not None}
    if local:
        topo = local_topology(1, num_gpus=num_gpus, gpus_per_node=gpus_per_node, **bw)
    elif num_gpus is None:
        raise PlanInputError("{num_gpus} is required unless the topology is read from this machine ({local})")
    else:
        topo = Topology(num_gpus, 1, gpus_per_node, **bw)
    if slots_per_gpu is None:
        slots_per_gpu = even_slots(num_experts, topo.num_gpus)
    topo = replace(topo, slots_per_gpu=slots_per_gpu)
    check_capacity(num_experts, topo)
    return topo


def even_slots(num_experts: int, num_gpus: int) -> int:
    """E / G slots per GPU: the default, every expert once; a hint when G does not divide E."""
    if num_experts % num_gpus:
        raise PlanInputError("{0} experts do not divide evenly over {1} GPUs; pass {slots_per_gpu} >= {2} (the "
                             "extra slots hold replicas of hot experts)", num_experts, num_gpus, -(-num_experts // num_gpus))
    return num_experts // num_gpus


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


def plan_placement(trace_or_loads, num_gpus: int | None = None, slots_per_gpu: int | None = None,
                   gpus_per_node: int | None = None, solver: str = "auto", time_limit: float = 60.0,
                   topology: Topology | None = None, n_jobs: int | None = None, balance_slack: float = 0.0,
                   rel_gap: float = 1e-4, progress: bool = False, score_on=None, batch_size: int | None = None,
                   cost: CostModel | None = None, previous: Placement | None = None) -> PlanResult:
    """Plan a placement.

    ``trace_or_loads``: a RoutingTrace (or a list of them, concatenated), a TraceStats, or loads
    [L, E]; ``score_on`` likewise, to score the plan out of sample. Both are normalised once
    (``trace_stats``); pass TraceStats to plan several times on the same data without
    recomputing. ``topology`` replaces num_gpus / slots_per_gpu / gpus_per_node.
    ``solver``: "auto"/"highs"/"cbc" (the ILP), "greedy", "contiguous", "round-robin".
    ``time_limit``: wall-clock budget in seconds for the ILP. ``balance_slack``: how much the
    ILP may raise max/mean load above its balanced optimum to cut cross-layer traffic (0: never).
    ``batch_size``: tokens per batch of the per-batch percentiles, None: automatic from the
    planning trace (``auto_batch_size``), the same for the out-of-sample score."""
    stats = trace_stats(trace_or_loads)
    oos = trace_stats(score_on) if score_on is not None else None
    L, E = stats.loads.shape
    topo = topology or make_topology(E, num_gpus, slots_per_gpu, gpus_per_node)
    check_capacity(E, topo)
    batch_size = resolve_batch_size(batch_size, stats)
    t0 = time.perf_counter()
    pl, info = _solve(stats, topo, solver, time_limit=time_limit, rel_gap=rel_gap, n_jobs=n_jobs,
                      balance_slack=balance_slack, progress=progress)
    pl.validate()
    secs = time.perf_counter() - t0
    metrics = evaluate(pl, stats, topo, batch_size=batch_size, cost=cost, previous=previous)
    glob, given = instance_bounds(stats.loads, topo)
    if "solver_bound_max_mean_load" in info:
        given = max(given, info["solver_bound_max_mean_load"])
        if topo.num_slots == E:
            glob = max(glob, given)
    glob = min(glob, metrics["max_mean_load"])
    given = min(given, metrics["max_mean_load"])
    gap = metrics["max_mean_load"] / glob - 1 if glob > 0 else math.nan
    res = PlanResult(pl, pl.meta["method"], secs, metrics, glob, gap,
                     lower_bound_given_counts=None if topo.num_slots == E else given, info=info)
    if oos is not None:
        res.metrics_out_of_sample = evaluate(pl, oos, topo, batch_size=batch_size, cost=cost)
    return res


def _solve(stats: TraceStats, topo: Topology, solver: str, balance_slack: float, **ilp_kw) -> tuple[Placement, dict]:
    """The placement of one method, and the ILP's solver info ({} for the baselines)."""
    L, E = stats.loads.shape
    method = solver.lower()
    if method == "greedy":
        return greedy_placement(stats.loads, topo), {}
    if method == "contiguous":
        return contiguous_placement(E, L, topo), {}
    if method in ("round-robin", "roundrobin", "rr"):
        return round_robin_placement(E, L, topo), {}
    if method not in ("auto", "highs", "cbc", "ilp"):
        raise PlanInputError("unknown {solver} {0!r} (choose auto, highs, cbc, greedy, contiguous, round-robin)",
                             solver)
    pl, ilp = ilp_placement(stats.loads, topo, stats.trans, solver="auto" if method == "ilp" else method,
                            balance_slack=balance_slack, **ilp_kw)
    return pl, {"solver": ilp.solver, "stage_seconds": ilp.stage_seconds,
                "greedy_max_mean_load": ilp.greedy_max_mean, "solver_bound_max_mean_load": ilp.bound_max_mean,
                "refined_layers": ilp.refine_improved, "exact_traffic_dp": ilp.exact_traffic,
                "balance_slack": balance_slack}


def score(placement: Placement, data, topo: Topology | None = None, **kw) -> dict:
    """Evaluate a placement on a trace (or list of traces, or stats): out-of-sample scoring."""
    return evaluate(placement, data, topo, **kw)


def compare_placements(trace_or_loads, num_gpus: int | None = None, slots_per_gpu: int | None = None,
                       gpus_per_node: int | None = None, methods=METHODS, solver: str = "auto",
                       time_limit: float = 60.0, score_on=None, **kw) -> list[PlanResult]:
    """Plan with each method ("ilp" uses ``solver``) on the same data, normalised once; score in
    and out of sample; every result gets the instance's best lower bound."""
    stats = trace_stats(trace_or_loads)
    oos = trace_stats(score_on) if score_on is not None else None
    out = []
    for m in methods:
        out.append(plan_placement(stats, num_gpus, slots_per_gpu, gpus_per_node,
                                  solver=solver if m == "ilp" else m, time_limit=time_limit,
                                  score_on=oos, **kw))
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
    """A plain-text comparison table (in-sample, and out-of-sample rows where scored); a
    "migration" column when the plans were scored against a previous placement."""
    migration = any("migration_experts" in r.metrics for r in results)
    head = ["method"] + [c[0] for c in _COLS] + ["mem/GPU", "solve s", "bound", "gap"] + ["migration"] * migration
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
                row += ["", "", ""] + [""] * migration
            else:
                row += [f"{r.solve_seconds:.2f}", f"{r.lower_bound:.4f}", f"{100 * r.gap:.2f}%"]
                row += [_migration_cell(m)] * migration
            rows.append(row)
    widths = [max(len(h), *(len(x[i]) for x in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(line(r).rstrip() for r in [head, ["-" * w for w in widths], *rows])


def _migration_cell(m: dict) -> str:
    """Expert copies to move from the previous placement (and their bytes when known)."""
    if "migration_experts" not in m:
        return "-"
    cell = f"{m['migration_experts']} experts"
    return cell + f" {_human_bytes(m['migration_bytes'])}" if m.get("migration_bytes") else cell


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


