"""`moekit plan`: plan expert placement from routing traces and write placement.json.

Thin front-end over :mod:`moekit.planner` (numpy + pulp; never torch).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """\
examples:
  moekit plan --trace experts_coding_mixtral.json --gpus 4 --out placement.json
  moekit plan --trace qwen.route.csv --gpus 32 --slots-per-gpu 5 --time-limit 60 --out p.json --format eplb
  moekit plan --trace coding.json --score-on math.json --gpus 4 --solver greedy --out p.json

The placement JSON holds `physical_to_logical_map` (per MoE layer, G*S expert ids; slot s is on
GPU s // S; SGLang reads it with --init-expert-location), `num_gpus`, `slots_per_gpu`, the metrics
and a comparison of contiguous / round-robin / greedy / ILP placements.
"""


def add_parser(subparsers, name: str = "plan", help_text: str = "plan expert placement") -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", action="append", required=True, metavar="FILE",
                   help="routing trace to plan on (moekit .npz, route_trace v1 CSV or Mixtral JSON); "
                        "repeat to concatenate several traces of the same model")
    p.add_argument("--gpus", type=int, default=None, metavar="G",
                   help="number of GPUs (expert-parallel ranks); required unless --topology local")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                   help="GPUs per node (default: all GPUs in one node); enables node-aware traffic metrics")
    p.add_argument("--slots-per-gpu", type=int, default=None, metavar="S",
                   help="expert slots per GPU per layer (default E/G: every expert once, no replication); "
                        "more slots hold replicas of hot experts")
    p.add_argument("--solver", choices=["auto", "highs", "cbc", "greedy"], default="auto",
                   help="planner for the written placement: the ILP with HiGHS or CBC (auto: HiGHS if "
                        "available, else CBC), or the EPLB-style greedy (default: auto)")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="SEC",
                   help="wall-clock budget of the ILP in seconds (default: 60)")
    p.add_argument("--gap", type=float, default=1e-4, metavar="REL",
                   help="relative MIP gap at which a subproblem counts as solved (default: 1e-4)")
    p.add_argument("--balance-slack", type=float, default=0.0, metavar="F",
                   help="let the ILP raise max/mean load by up to F above its balanced optimum to cut "
                        "cross-layer traffic (default: 0, balance first)")
    p.add_argument("--jobs", type=int, default=None, metavar="J",
                   help="parallel processes for the per-layer subproblems (default: CPU count)")
    p.add_argument("--score-on", action="append", default=None, metavar="FILE",
                   help="another trace to score the plans on (out-of-sample); repeatable")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="tokens per batch for the per-batch load percentiles (default: 256, or T/8 "
                        "for traces of fewer than 2048 tokens)")
    p.add_argument("--topology", choices=["manual", "local"], default="manual",
                   help="'local': nodes laid out like this machine, whose GPUs and NVLinks NVML reads "
                        "(nvidia-ml-py); --gpus defaults to one node, --gpus-per-node to its GPU count; "
                        "'manual' (default): uniform links from --gpus/--gpus-per-node")
    p.add_argument("--intra-node-bw", type=float, default=None, metavar="GBPS",
                   help="intra-node GPU-GPU bandwidth in GB/s for the traffic model (default: 450; with "
                        "--topology local: 25 per NVLink, or 450 on NVSwitch; given, it sets every NVLink pair)")
    p.add_argument("--inter-node-bw", type=float, default=50.0, metavar="GBPS",
                   help="inter-node bandwidth per GPU in GB/s (default: 50)")
    p.add_argument("--previous", default=None, metavar="FILE",
                   help="a previous placement.json: report the migration cost to each new plan")
    p.add_argument("--no-compare", action="store_true",
                   help="plan only with --solver; skip the contiguous/round-robin/greedy comparison")
    p.add_argument("--format", choices=["sglang", "eplb"], default="sglang",
                   help="'eplb' additionally writes EPLB's phy2log/log2phy/logcnt (default: sglang)")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw per-GPU load and the cross-layer GPU traffic matrix (needs matplotlib)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars, no table (progress bars are also off when stderr is not a terminal)")
    p.add_argument("--out", required=True, metavar="placement.json", help="where to write the placement JSON")
    return p


# the library names its fields in Python (slots_per_gpu); say them as the flags a user types
FLAGS = {"num_gpus": "--gpus", "gpus_per_node": "--gpus-per-node", "slots_per_gpu": "--slots-per-gpu",
         "intra_node_bw": "--intra-node-bw", "inter_node_bw": "--inter-node-bw", "batch_size": "--batch-size",
         "solver": "--solver", "local": "--topology local"}


def _err(msg: str) -> int:
    print(f"moekit plan: error: {msg}", file=sys.stderr)
    return 2


def _input_err(exc: Exception) -> int:
    """A library ValueError, its fields named as CLI flags."""
    from moekit.planner import PlanInputError
    return _err(exc.render(FLAGS) if isinstance(exc, PlanInputError) else str(exc))


def unwritable(path: str, flag: str) -> str | None:
    """Why ``path`` cannot be written (None when it can): checked before the solve, so a typo in
    an output path costs nothing."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        return f"{flag} {path} is a directory; give a file name"
    if not parent.is_dir():
        return f"{flag} {path}: folder {parent} does not exist"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{flag} {path} is not writable"
    if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: folder {parent} is not writable"
    return None


def show_progress(args, stream=None) -> bool:
    """Progress bars only for a person watching: not with --quiet, not into a file or pipe."""
    stream = sys.stderr if stream is None else stream
    return not args.quiet and bool(getattr(stream, "isatty", lambda: False)())


def run(args) -> int:
    from moekit import planner as P

    # --- outputs first: a bad path fails now, not after the solve -----------------------------
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        why = path and unwritable(path, flag)
        if why:
            return _err(why)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _err("--plot needs matplotlib: pip install 'moekit[plot]' (or pip install matplotlib)")
    for name in ("gpus", "gpus_per_node", "slots_per_gpu", "jobs", "batch_size"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            return _err(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.time_limit <= 0:
        return _err(f"--time-limit must be positive, got {args.time_limit}")
    if args.balance_slack < 0:
        return _err(f"--balance-slack must be >= 0, got {args.balance_slack}")

    # --- inputs, normalised once (loads and cross-layer transitions) ----------------------------
    try:
        stats = P.trace_stats([P.read_trace(f) for f in args.trace])
        score = P.trace_stats([P.read_trace(f) for f in args.score_on]) if args.score_on else None
    except FileNotFoundError as exc:
        return _err(str(exc))
    except P.TraceFormatError as exc:
        return _err(f"cannot parse trace: {exc}")
    except ValueError as exc:
        return _err(str(exc))
    trace = stats.trace
    E, L = trace.num_experts, trace.num_layers
    if score is not None and score.loads.shape != stats.loads.shape:
        return _err(f"--score-on trace has {score.num_layers} layers x {score.num_experts} experts, "
                    f"the planning trace {L} x {E}")
    try:
        topo = P.make_topology(E, args.gpus, args.slots_per_gpu, args.gpus_per_node,
                               local=args.topology == "local", intra_node_bw=args.intra_node_bw,
                               inter_node_bw=args.inter_node_bw)
    except P.NVMLUnavailable as exc:
        return _err(str(exc))
    except ValueError as exc:
        return _input_err(exc)

    previous = None
    if args.previous:
        try:
            previous = P.load_placement(args.previous)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            return _err(f"cannot read --previous {args.previous}: {exc}")
        if previous.num_layers != L or previous.num_gpus != topo.num_gpus:
            return _err(f"--previous placement is for {previous.num_layers} layers x {previous.num_gpus} GPUs, "
                        f"this plan for {L} x {topo.num_gpus}")

    # --- plan -------------------------------------------------------------------------------
    main_method = "greedy" if args.solver == "greedy" else "ilp"
    methods = [] if args.no_compare else ["contiguous", "round-robin", "greedy"]
    if main_method not in methods:
        methods.append(main_method)
    if not args.quiet:
        print(f"moekit plan: {L} layers x {E} experts (top-{trace.top_k}, {min(trace.num_tokens)} tokens); "
              f"{topo.num_gpus} GPUs x {topo.slots_per_gpu} slots ({topo.num_nodes} node(s)); "
              f"planner {args.solver}", file=sys.stderr)
    try:
        results = P.compare_placements(stats, methods=methods, solver=args.solver, topology=topo,
                                       time_limit=args.time_limit, rel_gap=args.gap, n_jobs=args.jobs,
                                       balance_slack=args.balance_slack, progress=show_progress(args),
                                       score_on=score, batch_size=args.batch_size, previous=previous)
    except ValueError as exc:      # infeasible / unavailable solver
        return _input_err(exc)
    except RuntimeError as exc:
        return _err(f"solver failed: {exc}")
    chosen = results[-1]

    # --- output -------------------------------------------------------------------------------
    if not args.quiet:
        print(P.format_table(results))
    extra = {
        "traces": [str(f) for f in args.trace],
        "score_on": [str(f) for f in args.score_on] if args.score_on else None,
        "topology": topo.to_dict(),
        "comparison": {m: {"method": r.method, "solve_seconds": r.solve_seconds, "lower_bound": r.lower_bound,
                           "gap": r.gap, "metrics": r.metrics, "metrics_out_of_sample": r.metrics_out_of_sample}
                       for m, r in zip(methods, results)},
    }
    try:
        P.write_placement_json(args.out, chosen, eplb=args.format == "eplb", extra=extra)
    except OSError as exc:
        return _err(f"cannot write {args.out}: {exc}")
    if args.plot:
        try:
            from moekit.planner.plot import plot_placement
            plot_placement(chosen.placement, stats, topo, args.plot)
        except Exception as exc:  # noqa: BLE001 - plotting is best effort, report and fail
            return _err(f"cannot draw {args.plot}: {exc}")
    if not args.quiet:
        print(f"wrote {args.out} ({chosen.method}, max/mean {chosen.max_mean_load:.4f}, "
              f"gap {100 * chosen.gap:.2f}%)", file=sys.stderr)
        if args.plot:
            print(f"wrote plot {args.plot}", file=sys.stderr)
    return 0
