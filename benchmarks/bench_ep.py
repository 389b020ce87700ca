#!/usr/bin/env python
"""Expert parallelism on CPU (gloo): bytes on the wire against the minimum, and step time.

For W in ``--worlds`` (default 1, 2, 4) ranks on this machine, every rank runs an MoE layer
(D, F, E, K below, contiguous placement) on its own T tokens, forward + backward, timed over
``--steps`` steps after a warm-up. Also timed in the same run: the single-device layer on T
tokens (``local``), the floor for W = 1.

Bytes: every call of ``torch.distributed.all_to_all_single`` is wrapped to add up the bytes of
the rows each rank sends to *other* ranks (its input splits for q != rank); the minimum is
computed from the routing alone (assignments whose expert lives on another rank, times the
row size, once for dispatch and once for combine, and the same again in backward). Ratio 1.00
means only routed token rows cross ranks: no padding, no local rows on the wire. The counts
exchanged first (E ints per rank) are reported apart.

On 2 cores, W = 4 oversubscribes the machine and gloo's loopback transport competes with the
GEMMs for the same cores: step times show the cost of the exchange here, not scaling.

    python benchmarks/bench_ep.py            # ~1 minute
    python benchmarks/bench_ep.py --quick

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, W, port, a, out_dir):
    from moekit.parallel import expert_parallel

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // W))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=300))
    sent = {"rows": 0, "counts": 0}
    real = dist.all_to_all_single

    def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        row = input[0].numel() * input.element_size() if input.dim() > 1 and input.shape[0] else 0
        if input_split_sizes is None:  # the equal-split count exchange
            per = input.numel() // W
            sent["counts"] += (input.numel() - per) * input.element_size()
        else:
            sent["rows"] += sum(n for q, n in enumerate(input_split_sizes) if q != rank) * row
        return real(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = counting
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=a.D, ffn_hidden_size=a.F, num_experts=a.E, top_k=a.K)
    local = MoELayer(cfg)
    with torch.no_grad():
        local.router.weight.normal_(0, a.D ** -0.5)
    torch.manual_seed(0)
    ep = MoELayer(cfg)
    ep.load_state_dict(local.state_dict())
    expert_parallel(ep)
    S = a.E // W
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(a.T, a.D, generator=g).requires_grad_()  # as inside a model: the input needs a grad
    gy = torch.randn(a.T, a.D, generator=g)
    minimum = 0
    times = {"ep": [], "local": []}
    for step in range(a.warmup + a.steps):
        for name, layer in (("ep", ep), ("local", local)):
            dist.barrier()
            t0 = time.perf_counter()
            layer(x).backward(gy)
            dt = time.perf_counter() - t0
            layer.zero_grad(set_to_none=True)
            if step >= a.warmup:
                times[name].append(dt)
        if step == a.warmup - 1:
            sent["rows"] = sent["counts"] = 0  # count the timed steps only
        if step >= a.warmup:
            with torch.no_grad():
                ids = ep.router(x).topk_ids_TK  # the same routing the step used (no dropping)
            remote = int(((ids // S) != rank).sum())
            minimum += 4 * remote * a.D * x.element_size()  # dispatch + combine, forward + backward
    res = {"rank": rank, "bytes_rows": sent["rows"], "bytes_counts": sent["counts"], "bytes_min": minimum,
           "ep_ms": statistics.median(times["ep"]) * 1e3, "local_ms": statistics.median(times["local"]) * 1e3}
    Path(out_dir, f"r{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--F", type=int, default=256)
    p.add_argument("--E", type=int, default=16)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--T", type=int, default=1024, help="tokens per rank")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.D, a.F, a.T, a.steps, a.warmup, a.worlds = 64, 32, 64, 2, 1, "1,2"
    command = " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"layer: D={a.D} F={a.F} E={a.E} K={a.K}, T={a.T} tokens per rank, fp32, fwd+bwd, contiguous placement")
    rows = []
    for W in [int(w) for w in a.worlds.split(",")]:
        with tempfile.TemporaryDirectory() as out:
            mp.start_processes(_worker, args=(W, _free_port(), a, out), nprocs=W, join=True, start_method="spawn")
            per = [json.loads(Path(out, f"r{r}.json").read_text()) for r in range(W)]
        sent = sum(r["bytes_rows"] for r in per)
        minimum = sum(r["bytes_min"] for r in per)
        row = {"W": W, "bytes_rows_per_rank_step": sent / W / a.steps, "bytes_min_per_rank_step": minimum / W / a.steps,
               "byte_ratio": (sent / minimum) if minimum else (1.0 if sent == 0 else float("inf")),
               "bytes_counts_per_rank_step": sum(r["bytes_counts"] for r in per) / W / a.steps,
               "ep_ms_max_rank": max(r["ep_ms"] for r in per), "local_ms_median_rank": statistics.median(r["local_ms"] for r in per)}
        rows.append(row)
        print(f"W={W}: rows sent {row['bytes_rows_per_rank_step'] / 2**20:8.2f} MiB/rank/step, minimum "
              f"{row['bytes_min_per_rank_step'] / 2**20:8.2f}, ratio {row['byte_ratio']:.4f}; counts "
              f"{row['bytes_counts_per_rank_step']:.0f} B; step EP {row['ep_ms_max_rank']:.1f} ms (slowest rank), "
              f"single-device layer on the same T {row['local_ms_median_rank']:.1f} ms")
    print(json.dumps({"bench": "bench_ep", "command": command, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      "config": vars(a), "results": rows}, separators=(",", ":")))


if __name__ == "__main__":
    main()
