"""moekit.planner: expert placement planning (leaf layer: numpy + pulp, never torch).

Quick tour::

    from moekit import planner
    tr = planner.read_trace("experts_coding_mixtral.json")        # or a moekit .npz / route_trace CSV
    res = planner.plan_placement(tr, num_gpus=4)                   # ILP (HiGHS, else CBC), warm-started
    print(res.metrics["max_mean_load"], res.metrics["cross_gpu_frac"], res.gap)
    planner.write_placement_json("placement.json", res)            # SGLang's physical_to_logical_map
    rows = planner.compare_placements(tr, num_gpus=4)              # contiguous / round-robin / greedy / ilp
    print(planner.format_table(rows))

``pulp`` and ``highspy`` are imported only when an ILP is solved.
"""
from .api import (METHODS, PlanResult, compare_placements, even_slots, format_table, instance_bounds, make_topology,
                  share_bounds, plan_placement, score, write_placement_json)
from .errors import PlanInputError
from .greedy import (balanced_packing, contiguous_placement, greedy_placement, replica_counts,
                     round_robin_placement)
from .ilp import ILPInfo, ilp_placement, layer_bounds
from .metrics import CostModel, auto_batch_size, evaluate, gpu_traffic, load_imbalance, migration_cost
from .milp import available_solvers
from .placement import Placement, PlacementError, load_placement
from .stats import TraceStats, expert_loads, trace_stats, transitions
from .topology import NVMLUnavailable, Topology, local_topology
from .traces import RoutingTrace, TraceFormatError, concat_traces, read_trace

__all__ = [
    "RoutingTrace", "TraceFormatError", "read_trace", "concat_traces",
    "TraceStats", "expert_loads", "transitions", "trace_stats",
    "Topology", "local_topology", "NVMLUnavailable",
    "Placement", "PlacementError", "load_placement",
    "replica_counts", "balanced_packing", "greedy_placement", "contiguous_placement", "round_robin_placement",
    "ilp_placement", "ILPInfo", "layer_bounds", "available_solvers",
    "CostModel", "evaluate", "gpu_traffic", "load_imbalance", "migration_cost", "auto_batch_size",
    "PlanInputError", "PlanResult", "plan_placement", "score", "compare_placements", "format_table", "write_placement_json",
    "instance_bounds", "make_topology", "even_slots", "share_bounds", "METHODS",
]
