"""Offloaded inference benchmarks (issue #10).

``--replay`` (target 1, :func:`replay_target`): replays the shared Qwen3 and Gemma routing
traces at 500/1000/2000/4000 MiB through every cache policy, the global LRU (the recording
device's cache) and global Belady; prints a table and ends with one JSON line.

    python benchmarks/bench_offload.py --replay [--traces ../shared/traces]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGETS_MIB = (500, 1000, 2000, 4000)
MiB = 1 << 20


# --- target 1: trace replay -------------------------------------------------------------
# whole-path prefetch settings replayed beside the demand-only default: (row, max per layer, threshold)
WHOLE_PATH_PREFETCH = (("predictive+wp0.7", 6, 0.7), ("predictive+wp0.5", 6, 0.5))


def replay_target(traces_dir: Path, budgets_mib=BUDGETS_MIB, prefetch: int = 6) -> dict:
    """Decode hit rates and bytes per decode token per policy and budget; checks target 1: the
    default (predictive) >= LRU and > 0 at every budget, and closing >= half of the global-LRU ->
    Belady gap, demand-only and with prefetch (co-activation top-``prefetch``, the earlier
    predictor; and the whole-path predictor above a probability threshold, WHOLE_PATH_PREFETCH),
    with each prefetch row's bytes read per decode token against per-layer LRU's."""
    from moekit.offload.policies import POLICIES
    from moekit.offload.predict import PathPredictor
    from moekit.offload.simulate import format_table, load_trace, replay_global_belady, replay_global_lru, simulate

    out = {"budgets_mib": list(budgets_mib), "traces": {}}
    for name in ("qwen", "gemma"):
        path = traces_dir / f"{name}.route.csv"
        if not path.exists():
            print(f"skip {name}: {path} absent", file=sys.stderr)
            continue
        tr = load_trace(path)
        L, E, K = tr.num_layers, tr.num_experts, tr.top_k
        rows, res, belady = [], {}, {}
        for mib in budgets_mib:
            b = mib * MiB
            rs = [replay_global_lru(tr, b), replay_global_belady(tr, b)]
            rs += [simulate(tr, b, p) for p in POLICIES]
            pf = simulate(tr, b, "predictive", prefetch=prefetch, path_predictor=PathPredictor(L, E, K))
            pf.policy = f"predictive+pf{prefetch}"
            rs.append(pf)
            for row, n, threshold in WHOLE_PATH_PREFETCH:
                r = simulate(tr, b, "predictive", prefetch=n, prefetch_threshold=threshold)
                r.policy = row
                rs.append(r)
            belady[b] = rs[1].hit_rate_decode
            rows += rs
            res[mib] = {r.policy: {"hit_rate_decode": r.hit_rate_decode, "hit_rate_prefill": r.hit_rate_prefill,
                                   "hit_rate_cumulative": r.hit_rate_cumulative,
                                   "bytes_per_decode_token": r.bytes_per_decode_token,
                                   "prefetch_bytes_per_decode_token": r.prefetch_bytes_per_decode_token}
                        for r in rs}
        print(f"\n{name} ({path.name})")
        print(format_table(rows, belady))
        checks = {}
        for mib, d in res.items():
            lru = max(d["lru"]["hit_rate_decode"], d["lru-global"]["hit_rate_decode"])
            lru_bytes = d["lru"]["bytes_per_decode_token"]
            pred = d["predictive"]["hit_rate_decode"]
            half = d["lru-global"]["hit_rate_decode"] + 0.5 * (d["belady-global"]["hit_rate_decode"]
                                                                 - d["lru-global"]["hit_rate_decode"])
            checks[mib] = {"default_ge_lru": pred >= lru, "default_gt_0": pred > 0,
                           "half_gap_target": half, "default_closes_half_gap": pred >= half,
                           "prefetch_closes_half_gap": d[f"predictive+pf{prefetch}"]["hit_rate_decode"] >= half}
            for row, _, _ in WHOLE_PATH_PREFETCH:
                checks[mib][f"{row}_closes_half_gap"] = d[row]["hit_rate_decode"] >= half
                checks[mib][f"{row}_ge_lru"] = d[row]["hit_rate_decode"] >= lru
                checks[mib][f"{row}_bytes_le_lru"] = d[row]["bytes_per_decode_token"] <= lru_bytes
        out["traces"][name] = {"results": res, "checks": checks}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", action="store_true", help="target 1: trace replay at 500/1000/2000/4000 MiB")
    ap.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces",
                    help="folder holding qwen.route.csv and gemma.route.csv (default: ../shared/traces)")
    args = ap.parse_args(argv)
    if not args.replay:
        ap.error("choose a mode: --replay")
    t0 = time.time()
    res = replay_target(args.traces)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({"bench": "offload_replay", **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
