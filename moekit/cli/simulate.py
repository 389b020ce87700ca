"""`moekit simulate`: replay a routing trace through the expert cache, every policy against Belady.

Thin front-end over :mod:`moekit.offload.simulate` (numpy only; no model is loaded).
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  moekit simulate --trace qwen.route.csv --budget 2000MiB
  moekit simulate --trace qwen.route.csv --budget 500MiB --budget 4GiB --policy all --json

Access order: prefill is one batched access per layer (the distinct experts of the prompt),
decode one access per (token, layer). Hit rates count one request per expert an access needs.
Rows 'lru-global' (one LRU over all layers, the recording device's cache) and 'belady-global'
(MIN over all layers) are references; the policies run with per-layer quotas.
"""


def add_parser(subparsers, name: str = "simulate", help_text: str = "replay a trace through the expert cache"):
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", required=True, metavar="FILE",
                   help="routing trace: route_trace v1 CSV (with per-layer expert_bytes) or moekit .npz")
    p.add_argument("--budget", action="append", required=True, metavar="SIZE",
                   help="fast-tier byte budget, e.g. 2000MiB, 2GiB, 500MB; repeat for several budgets")
    p.add_argument("--policy", default="all", metavar="NAME",
                   help="lru, lfu, static, predictive, belady, or 'all' (default: all, plus the global "
                        "LRU and global Belady references)")
    p.add_argument("--expert-bytes", type=int, default=None, metavar="N",
                   help="bytes of one expert in every layer, for traces without a per-layer size")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {policy, budget_bytes, hit_rate_prefill, hit_rate_decode, "
                        "bytes_per_decode_token, ...} instead of the table")
    return p


def _err(msg: str) -> int:
    print(f"moekit simulate: error: {msg}", file=sys.stderr)
    return 2


def run(args) -> int:
    from moekit.offload import simulate as S
    from moekit.offload.policies import POLICIES
    from moekit.planner.traces import TraceFormatError

    try:
        budgets = [S.parse_bytes(b) for b in args.budget]
    except ValueError as exc:
        return _err(f"--budget: {exc}")
    if args.policy != "all" and args.policy not in POLICIES:
        return _err(f"--policy must be one of {', '.join(POLICIES)} or all; got {args.policy!r}")
    if args.expert_bytes is not None and args.expert_bytes <= 0:
        return _err(f"--expert-bytes must be positive, got {args.expert_bytes}")
    try:
        trace = S.load_trace(args.trace)
    except FileNotFoundError as exc:
        return _err(str(exc))
    except TraceFormatError as exc:
        return _err(f"cannot parse trace: {exc}")
    eb = [args.expert_bytes] * trace.num_layers if args.expert_bytes else None
    policies = list(POLICIES) if args.policy == "all" else [args.policy]
    results, belady = [], {}
    try:
        for b in budgets:
            if args.policy == "all":
                results.append(S.replay_global_lru(trace, b, eb))
                ref = S.replay_global_belady(trace, b, eb)
                results.append(ref)
                belady[b] = ref.hit_rate_decode
            for pol in policies:
                r = S.simulate(trace, b, pol, expert_bytes=eb)
                results.append(r)
                if pol == "belady" and b not in belady:
                    belady[b] = r.hit_rate_decode
    except ValueError as exc:
        return _err(str(exc))
    if args.json:
        print(S.results_json(results))
    else:
        print(f"{args.trace}: {trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}, "
              f"{results[0].decode_tokens} decode tokens")
        print(S.format_table(results, belady))
    return 0
