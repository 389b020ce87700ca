#!/usr/bin/env python
"""Adaptive parallelism on CPU (gloo): the cost model's degree r against the measured best r.

For each case (E < W: experts column-sharded over W/E ranks, r in {0, divisors of W/E};
E >= W: r in {0, 1}) and tokens per rank T, W ranks on this machine run one MoE layer
converted with ``moekit.parallel.adaptive_parallel``; every valid r is timed forward +
backward (median of ``--steps`` after ``--warmup``; r values interleaved step by step so
load changes hit all of them alike), then ``r="auto"`` reports its pick (from the link model
``measure_link`` fitted at conversion). Reported: time per r, the measured best, the pick, and
the pick's time over the best (1.00 = the model chose the fastest).

On 2 cores, W = 4 oversubscribes the machine: compute and gloo's loopback transport share
the cores, which the communication-only cost model does not see. Read the ratio, not the ms.

    python benchmarks/bench_adaptive.py          # ~2 minutes
    python benchmarks/bench_adaptive.py --quick

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.append(str(Path(__file__).resolve().parents[1]))  # checkout, no install: last, so
# its kernels/ folder cannot shadow the kernels distribution that transformers imports

from moekit import MoEConfig, MoELayer  # noqa: E402

# (name, E, D, F, K): one case with E < W (W = 4) and one with E >= W
CASES = [("E2<W", 2, 256, 1024, 1), ("E8>=W", 8, 256, 256, 2)]
QUICK_CASES = [("E2<W", 2, 32, 64, 1), ("E8>=W", 8, 32, 32, 2)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, W, port, a, out_dir):
    from moekit.parallel import adaptive_parallel, measure_link, set_parallel_degree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=300))
    link = measure_link()
    results = []
    for name, E, D, F, K in (QUICK_CASES if a.quick else CASES):
        for T in a.tokens:
            torch.manual_seed(0)
            layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=K))
            model = adaptive_parallel(torch.nn.Sequential(layer), r=0, link=link)
            degrees = layer.dispatcher.layout.degrees()
            x = torch.randn(T, D, generator=torch.Generator().manual_seed(rank))
            times = {r: [] for r in degrees}
            for step in range(a.warmup + a.steps):
                for r in degrees:
                    set_parallel_degree(model, r)
                    dist.barrier()
                    t0 = time.perf_counter()
                    model(x).square().mean().backward()
                    dist.barrier()
                    if step >= a.warmup:
                        times[r].append(time.perf_counter() - t0)
            set_parallel_degree(model, "auto")
            model(x).square().mean().backward()
            pick = layer.dispatcher.last_r
            ms = {r: 1e3 * statistics.median(v) for r, v in times.items()}
            best = min(ms, key=ms.get)
            from moekit.parallel.adaptive import estimate_seconds

            shard = layer.experts
            shard_bytes = tuple(w.numel() * w.element_size() for w in (shard.w_in, shard.w_out))
            est = {r: 1e3 * estimate_seconds(r, layer.dispatcher.layout, T, K, D, 4, shard_bytes, link)
                   for r in degrees}
            results.append({"case": name, "E": E, "D": D, "F": F, "K": K, "T": T, "ms": ms, "est_ms": est,
                            "best_r": best, "auto_r": pick, "auto_over_best": ms[pick] / ms[best]})
    if rank == 0:
        fits = {k: {"latency_ms": getattr(link, k).latency_s * 1e3, "GBps": getattr(link, k).bandwidth_Bps / 1e9}
                for k in ("all_to_all", "all_gather", "reduce_scatter")}
        Path(out_dir, "results.json").write_text(json.dumps({"link": fits, "results": results}))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4, help="ranks (W); the E<W case needs 2 | W")
    p.add_argument("--tokens", default="32,512,4096", help="tokens per rank, comma-separated")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (the smoke run)")
    a = p.parse_args(argv)
    a.tokens = [int(t) for t in a.tokens.split(",")]
    if a.quick:
        a.tokens, a.steps, a.warmup = [8, 64], 2, 1
    cmd = " ".join(shlex.quote(x) for x in [sys.executable] + sys.argv)
    print(f"command: {cmd}\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, W={a.world} gloo ranks on this machine")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(a.world, _free_port(), a, out), nprocs=a.world, join=True,
                           start_method="spawn")
        data = json.loads(Path(out, "results.json").read_text())
    print("link model (measure_link): " + "; ".join(f"{k} {v['latency_ms']:.3f} ms + bytes / {v['GBps']:.3f} GB/s"
                                                    for k, v in data["link"].items()))
    print("| case | T/rank | ms per r (fwd+bwd, median) | estimated comm ms per r | best r | auto r | auto/best |")
    print("|---|---|---|---|---|---|---|")
    for r in data["results"]:
        fmt = lambda d: ", ".join(f"r={k}: {v:.2f}" for k, v in d.items())  # noqa: E731
        print(f"| {r['case']} | {r['T']} | {fmt(r['ms'])} | {fmt(r['est_ms'])} | {r['best_r']} | {r['auto_r']} | "
              f"{r['auto_over_best']:.2f} |")
    agree = sum(str(r["auto_r"]) == str(r["best_r"]) for r in data["results"])
    summary = {"bench": "bench_adaptive", "command": cmd, "world": a.world, "wall_s": round(time.time() - t0, 1),
               "auto_matches_best": f"{agree}/{len(data['results'])}",
               "worst_auto_over_best": max(r["auto_over_best"] for r in data["results"]), **data}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
