#!/usr/bin/env python
"""What buffer reuse and the schedule choice buy the CPU expert path, in one process.

1. Memory: filling a fresh large tensor (page faults on first touch) against filling a reused
   one, the cost that ``moekit.workspace`` avoids.
2. MoELayer (``grouped_mm`` backend on CPU) on the bench_layer shapes, interleaved rounds:
   - ``moekit``           as shipped (buffer pool on, schedule picked by ``_plan_parts``);
   - ``moekit_no_pool``   the pool disabled (every buffer and weight gradient fresh), i.e. the
                          allocation behaviour before the pool existed;
   - ``moekit_other_schedule``  the schedule ``_plan_parts`` did not pick (workers <-> inline);
   - the dense floor as in bench_layer (fastest of three formulations, per mode).

Usage::

    python benchmarks/bench_cpu_reuse.py            # three shapes, fwd and fwd+bwd, ~6 minutes
    python benchmarks/bench_cpu_reuse.py --quick    # tiny shapes (seconds)

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moekit.experts as experts  # noqa: E402
from bench_layer import QUICK_SHAPES, SHAPES, build_moekit, dense_steps, machine_info, make_steps, \
    time_interleaved  # noqa: E402
from moekit.workspace import POOL  # noqa: E402

POOL_IDLE_DEFAULT = POOL.max_idle_bytes


def memory_costs(mib: int, rounds: int) -> dict:
    """Median ms to fill ``mib`` MiB: a freshly allocated tensor vs a reused one."""
    n = mib * 2 ** 20 // 4
    reused = torch.empty(n)
    steps = {"fill_fresh": lambda: torch.empty(n).fill_(1.0), "fill_reused": lambda: reused.fill_(1.0)}
    for s in steps.values():
        s()
    times = time_interleaved(steps, rounds, rounds, 1e9)
    out = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    out["fresh_over_reused"] = round(out["fill_fresh"] / out["fill_reused"], 2)
    return out


def _with(pool_on: bool, inline_min_macs: int, step: Callable) -> Callable:
    """``step`` with the pool on or off and ``experts.INLINE_MIN_MACS`` set for its duration."""
    def run():
        POOL.max_idle_bytes = POOL_IDLE_DEFAULT if pool_on else 0
        if not pool_on:
            POOL.clear()
        saved = experts.INLINE_MIN_MACS
        experts.INLINE_MIN_MACS = inline_min_macs
        try:
            return step()
        finally:
            experts.INLINE_MIN_MACS = saved
            POOL.max_idle_bytes = POOL_IDLE_DEFAULT

    return run


def run_shape(shape, modes, rounds) -> dict:
    layer = build_moekit(shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, shape.T, shape.D, generator=g)
    grad_out = torch.randn(1, shape.T, shape.D, generator=g)
    with torch.no_grad():  # the schedule the layer picks for this input, by its own rule
        counts = layer.router(x.view(-1, shape.D)).tokens_per_expert_E.tolist()
    picked = "inline" if len(experts._plan_parts(counts, shape.D, 2 * shape.F)) == 1 else "workers"
    shipped = experts.INLINE_MIN_MACS
    other = (1 << 62) if picked == "inline" else 0  # a threshold that forces the other schedule
    steps = make_steps(layer, x, grad_out)
    res = {"schedule_picked": picked, "modes": {}}
    for mode in modes:
        variants = {
            "moekit": _with(True, shipped, steps[mode]),
            "moekit_no_pool": _with(False, shipped, steps[mode]),
            "moekit_other_schedule": _with(True, other, steps[mode]),
        }
        for name, form in dense_steps(shape).items():
            variants[name] = form[mode]
        for s in variants.values():  # warm-up
            s()
        times = time_interleaved(variants, rounds, rounds, 1e9)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        floor = min(v for k, v in med.items() if k.startswith("dense_"))
        res["modes"][mode] = {
            "ms": {k: round(v, 1) for k, v in med.items()},
            "x_floor": {k: round(v / floor, 3) for k, v in med.items() if not k.startswith("dense_")},
            "pool_gain": round(med["moekit_no_pool"] / med["moekit"], 3),
            "schedule_gain": round(med["moekit_other_schedule"] / med["moekit"], 3),
        }
        r = res["modes"][mode]
        print(f"  {shape.name:14s} {mode:6s} floor {floor:8.1f} ms | x floor: "
              + "  ".join(f"{k} {v:.3f}" for k, v in r["x_floor"].items())
              + f" | no_pool/pool {r['pool_gain']:.3f}, other/picked ({picked}) {r['schedule_gain']:.3f}",
              flush=True)
    return res


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few rounds: a smoke run")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds (interleaved)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fill-mib", type=int, default=256, help="tensor size of the memory test")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.fill_mib = 2, 8
    torch.set_num_threads(args.threads)
    pool = QUICK_SHAPES if args.quick else SHAPES
    names = args.shapes.split(",") if args.shapes else list(pool)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    info = machine_info()
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    t0 = time.time()
    mem = memory_costs(args.fill_mib, max(args.rounds, 3))
    print(f"  fill {args.fill_mib} MiB: fresh {mem['fill_fresh']} ms, reused {mem['fill_reused']} ms "
          f"({mem['fresh_over_reused']}x)", flush=True)
    results = {}
    for name in names:
        if name not in pool:
            raise SystemExit(f"unknown shape {name!r}; choose from {list(pool)}")
        results[name] = run_shape(pool[name], args.modes.split(","), args.rounds)
    summary = {"bench": "bench_cpu_reuse", "command": command,
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": info,
               "wall_s": round(time.time() - t0, 1), "memory": mem, "results": results}
    print(json.dumps(summary, separators=(",", ":")))
    return summary


if __name__ == "__main__":
    main()
