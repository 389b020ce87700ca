#!/usr/bin/env python
"""Communication/computation overlap of the expert-parallel layer, on a rate-shaped link.

For each layer shape (Mixtral-like and Qwen2-MoE-like, scaled to CPU), world size W and link
rate, W ranks run in separate network namespaces joined by ``tc``-shaped veths
(``benchmarks/shaped_link.py``: the link waits without burning CPU, so overlap is measurable on
2 cores). Each rank holds T tokens routed by the layer's own router (random init). Per scheme
and chunk count, timed forward, the slowest rank counting, median of ``--reps``:

- ``T_comm``: the scheme's exchanges alone (the same pieces and messages, the experts skipped);
- ``T_comp``: the scheme's expert computation alone (the same pieces, no messages);
- ``T_overlap``: both, as the layer runs them;
- hidden = (T_comm + T_comp - T_overlap) / min(T_comm, T_comp), REFERENCE.md §3's measure,
  with the scheme's own T_comm and T_comp; "vs seq" uses those of the unpipelined exchange
  (chunked, d = 1) instead, so the cost chunking adds to the compute counts against it.

Schemes: ``none`` (the reference layer: dispatch all_to_all_single -> experts -> combine
all_to_all_single), ``chunked`` d in {1, 2, 4, 8} (Tutel; d = 1 is the same point-to-point
exchange without pipelining, the fair sequential baseline on gloo, whose all_to_all_single runs
at about half the link rate, see shaped_link.py), ``fine`` with B in {1, 2, 4} row blocks per
peer (Comet). Also timed: the whole layer forward (router included) and forward + backward per
setting, and ``chunks="auto"`` after its tuning calls, compared with the best fixed setting.

    python benchmarks/bench_overlap.py                      # both shapes, W = 2 and 4 (~10 min)
    python benchmarks/bench_overlap.py --quick              # one shape, W = 2, few reps
    python benchmarks/bench_overlap.py --loopback           # no namespaces (overlap is noise here)
    python benchmarks/bench_overlap.py --transport waves    # NCCL's posting order (grouped waves) on gloo

Ranks use one torch thread each and the README's glibc allocator settings (set for every
setting alike). Needs root and iproute2 for the shaped link; without them it says so and runs on loopback only
with ``--loopback``. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.append(str(Path(__file__).resolve().parents[1]))  # checkout, no install: last, so
# its kernels/ folder cannot shadow the kernels distribution that transformers imports
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402
from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit.parallel import expert_parallel  # noqa: E402
from moekit.parallel.overlap import CANDIDATES, stages  # noqa: E402

# CPU-scaled shapes: Mixtral (D 4096, F 14336, E 8, top-2) at D/8, F/8; Qwen2-MoE (D 2048,
# F 1408, E 60, top-4) at D/4, F/4. T tokens per rank.
SHAPES = {
    "mixtral": dict(hidden_size=512, ffn_hidden_size=1792, num_experts=8, top_k=2, T=1024),
    "qwen2": dict(hidden_size=512, ffn_hidden_size=352, num_experts=60, top_k=4, T=768),
    "tiny": dict(hidden_size=32, ffn_hidden_size=48, num_experts=4, top_k=2, T=24),  # --smoke only
}
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "MALLOC_TOP_PAD_": "1073741824"}


# ---------------------------------------------------------------------------------------- ranks

def _max_over_ranks(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _timed(fn) -> float:
    """The slowest rank's time of one fn() call (a barrier before it)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return _max_over_ranks(time.perf_counter() - t0)


def _layer(shape: dict) -> MoELayer:
    torch.manual_seed(0)
    kw = {k: v for k, v in shape.items() if k != "T"}
    return MoELayer(MoEConfig(**kw))


def _hidden(c: float, p: float, o: float) -> float:
    return (c + p - o) / min(c, p) if min(c, p) > 0 else 0.0


def _probes(ep, x, gy, overlap: str, d) -> dict:
    """name -> fn: T_comm / T_comp / T_overlap of the (pipelined) block, the layer's fwd and fwd+bwd."""
    disp = ep.dispatcher
    with torch.no_grad():
        routing = ep.router(x)
        if overlap == "none":
            x_MD, counts, ctx = disp.dispatch(x, routing)
            probes = {"T_comm": lambda: disp.combine(disp.dispatch(x, routing)[0], ctx),
                      "T_comp": lambda: ep.experts(x_MD, counts),
                      "T_overlap": lambda: disp.combine(ep.experts(*disp.dispatch(x, routing)[:2]), ctx)}
        else:
            x_sorted, _, plan = disp.plan(x, routing, d)
            st = stages(overlap, plan.W, plan.rank, d)
            probes = {key: (lambda mode=mode: disp.block(x_sorted, ep.experts, plan, st, mode))
                      for mode, key in (("comm", "T_comm"), ("comp", "T_comp"), ("both", "T_overlap"))}
    xg = x.clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            ep(x)

    def step():
        ep.zero_grad(set_to_none=True)
        (ep(xg) * gy).sum().backward()
    return {**probes, "fwd": fwd, "fwd_bwd": step}


def rank_main(args) -> None:
    """Every setting's probes run interleaved (rep by rep, round robin), so drifts in the
    machine's load hit every setting alike; medians over reps."""
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=600))
    rank = dist.get_rank()
    results = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(shape["T"], shape["hidden_size"], generator=g)
        gy = torch.randn(shape["T"], shape["hidden_size"], generator=g)
        settings = [("none", None)] + [(o, d) for o in ("chunked", "fine") for d in CANDIDATES[o]]
        rows, probes = [], []
        for overlap, d in settings:
            kw = {} if overlap == "none" else {"transport": args.transport}
            ep = expert_parallel(_layer(shape), overlap=overlap, chunks=d if d else "auto", **kw)
            rows.append({"shape": name, "scheme": overlap, "chunks": d})
            probes.append(_probes(ep, x, gy, overlap, d))
        autos = []
        for overlap in ("chunked", "fine"):  # "auto": its tuning calls first, then timed like the rest
            ep = expert_parallel(_layer(shape), overlap=overlap, chunks="auto", transport=args.transport)
            with torch.no_grad():
                for _ in range(len(ep.dispatcher.tuner.candidates) * ep.dispatcher.tuner.trials + 1):
                    ep(x)
            autos.append((overlap, ep))
        times = [{k: [] for k in p} for p in probes]
        auto_t = [[] for _ in autos]
        for rep in range(args.reps + 1):  # the first round is a warm-up
            for p, t in zip(probes, times):
                for k, fn in p.items():
                    dt = _timed(fn)
                    if rep:
                        t[k].append(dt)
            for (_, ep), t in zip(autos, auto_t):
                dt = _timed(lambda: ep(x))
                if rep:
                    t.append(dt)
        for row, t in zip(rows, times):
            row.update({k: statistics.median(v) for k, v in t.items()})
            row["hidden"] = _hidden(row["T_comm"], row["T_comp"], row["T_overlap"])
        seq = next(r for r in rows if r["scheme"] == "chunked" and r["chunks"] == 1)
        for row in rows:  # against the unpipelined exchange and compute (chunking's own costs count)
            row["hidden_vs_seq"] = _hidden(seq["T_comm"], seq["T_comp"], row["T_overlap"])
        for (overlap, ep), t in zip(autos, auto_t):
            rows.append({"shape": name, "scheme": overlap, "chunks": "auto", "chose": ep.dispatcher.last_chunks,
                         "fwd": statistics.median(t)})
        results += rows
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- driver

def _summarise(rows: list[dict]) -> dict:
    """Per scheme, the best hidden fraction and its setting; auto vs the best fixed forward."""
    out = {}
    for scheme in ("chunked", "fine"):
        fixed = [r for r in rows if r["scheme"] == scheme and r["chunks"] != "auto"]
        piped = [r for r in fixed if not (scheme == "chunked" and r["chunks"] == 1)]
        best_h = max(piped, key=lambda r: r["hidden"])
        best_s = max(piped, key=lambda r: r["hidden_vs_seq"])
        best_fwd = min(fixed, key=lambda r: r["fwd"])
        auto = next(r for r in rows if r["scheme"] == scheme and r["chunks"] == "auto")
        out[scheme] = {"best_hidden": round(best_h["hidden"], 3), "at_chunks": best_h["chunks"],
                       "best_hidden_vs_seq": round(best_s["hidden_vs_seq"], 3), "vs_seq_at_chunks": best_s["chunks"],
                       "best_fixed_fwd_ms": round(best_fwd["fwd"] * 1e3, 2), "best_fixed_chunks": best_fwd["chunks"],
                       "auto_chose": auto["chose"], "auto_fwd_ms": round(auto["fwd"] * 1e3, 2),
                       "auto_vs_best": round(auto["fwd"] / best_fwd["fwd"], 3)}
    none = next(r for r in rows if r["scheme"] == "none")
    seq = next(r for r in rows if r["scheme"] == "chunked" and r["chunks"] == 1)
    for scheme in ("chunked", "fine"):
        best = min((r for r in rows if r["scheme"] == scheme and r["chunks"] != "auto"), key=lambda r: r["fwd_bwd"])
        out[scheme]["fwd_bwd_speedup_vs_none"] = round(none["fwd_bwd"] / best["fwd_bwd"], 3)
        out[scheme]["fwd_bwd_speedup_vs_p2p_sequential"] = round(seq["fwd_bwd"] / best["fwd_bwd"], 3)
    return out


def _print_table(rows, shape, W, rate, transport) -> None:
    print(f"\n{shape}, W={W}, link {rate}, transport {transport} (ms, slowest rank, median)")
    print(f"{'scheme':8} {'chunks':>6} {'T_comm':>8} {'T_comp':>8} {'T_overlap':>9} {'hidden':>7} {'vs seq':>7} "
          f"{'fwd':>8} {'fwd+bwd':>8}")
    for r in rows:
        if r["chunks"] == "auto":
            print(f"{r['scheme']:8} {'auto':>6} {'':>8} {'':>8} {'':>9} {'':>7} {r['fwd'] * 1e3:8.1f}   (chose {r['chose']})")
            continue
        print(f"{r['scheme']:8} {str(r['chunks'] or '-'):>6} {r['T_comm'] * 1e3:8.1f} {r['T_comp'] * 1e3:8.1f} "
              f"{r['T_overlap'] * 1e3:9.1f} {r['hidden'] * 100:6.1f}% {r['hidden_vs_seq'] * 100:6.1f}% "
              f"{r['fwd'] * 1e3:8.1f} {r['fwd_bwd'] * 1e3:8.1f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--shapes", default="mixtral,qwen2", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--worlds", default="2,4", help="world sizes W (one namespace per rank)")
    p.add_argument("--rates", default="auto",
                   help="link rates (tc spelling, comma list), or 'auto': per shape and W, the rate at "
                        "which the scheme's communication about equals its computation (measured)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--transport", choices=("tagged", "waves"), default="tagged",
                   help="how the overlapped layers post their messages: gloo's tagged order (default) or "
                        "NCCL's grouped waves (batch_isend_irecv, the same order on every rank)")
    p.add_argument("--quick", action="store_true", help="mixtral only, W=2, 3 reps")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny layer, W=2, 1 rep, 200mbit (or loopback where no shaped link can be built): "
                        "checks the script runs, measures nothing")
    p.add_argument("--loopback", action="store_true", help="no shaped link: ranks on 127.0.0.1 (overlap is noise)")
    p.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank:
        rank_main(args)
        return 0
    if args.quick:
        args.shapes, args.worlds, args.reps = "mixtral", "2", 3
    if args.smoke:
        args.shapes, args.worlds, args.reps, args.rates = "tiny", "2", 1, "200mbit"
    # every setting runs under the same allocator settings: the README's CPU-allocator ones
    # (glibc keeps freed blocks instead of page-faulting them in again each call)
    for k, v in ALLOCATOR_ENV.items():
        os.environ.setdefault(k, v)
    print("command:", shlex.join([sys.executable] + sys.argv))
    print("allocator:", " ".join(f"{k}={os.environ[k]}" for k in ALLOCATOR_ENV))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {platform.platform()}")
    from shaped_link import available, launch
    ok, why = available()
    if not ok and args.smoke:
        print(f"shaped link unavailable ({why}): smoke run on loopback")
        args.loopback = True
    if not ok and not args.loopback:
        print(f"shaped link unavailable ({why}); rerun with --loopback to measure on loopback (noise on small boxes)")
        print(json.dumps({"bench": "overlap", "skipped": why}))
        return 0
    all_rows, summary = [], []
    for W in map(int, args.worlds.split(",")):
        for shape in args.shapes.split(","):
            rates = [_balanced_rate(shape, W, args)] if args.rates == "auto" else args.rates.split(",")
            for rate in rates:
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "rows.json")
                    argv = [sys.executable, os.path.abspath(__file__), "--rank", "--out", out, "--shapes", shape,
                            "--reps", str(args.reps), "--threads", str(args.threads), "--transport", args.transport]
                    rc = _launch(argv, rate, W, args.loopback, launch)
                    if rc:
                        print(f"{shape} W={W} {rate}: ranks failed (rc {rc})")
                        continue
                    rows = json.loads(Path(out).read_text())
                _print_table(rows, shape, W, rate, args.transport)
                s = {"shape": shape, "W": W, "rate": rate, "transport": args.transport, **_summarise(rows)}
                print(json.dumps(s))
                summary.append(s)
                all_rows += [{"W": W, "rate": rate, **r} for r in rows]
    print(json.dumps({"bench": "overlap", "machine": cpu_model(), "link": "loopback" if args.loopback else "shaped",
                      "transport": args.transport, "results": summary}))
    return 0


def _launch(argv, rate, W, loopback: bool, launch) -> int:
    if not loopback:
        return launch(rate, W, argv, timeout=1800)
    import subprocess
    from socket import socket
    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(W))
    procs = [subprocess.Popen(argv, env=dict(env, RANK=str(r))) for r in range(W)]
    return max(p.wait() for p in procs)


def _balanced_rate(shape: str, W: int, args) -> str:
    """The link rate at which the sequential exchange about equals the experts' time: the regime
    where overlap matters most and the hidden fraction is best defined. Estimated from the bytes
    the shape moves per rank and the experts' measured time on this machine (single process)."""
    s = SHAPES[shape]
    torch.set_num_threads(args.threads)
    layer = _layer(s)
    x = torch.randn(s["T"], s["hidden_size"])
    with torch.no_grad():
        r = layer.router(x)
        x_ND, counts, _ = layer.dispatcher.dispatch(x, r)
        ranks_per_core = max(W / (os.cpu_count() or 1), 1.0)
        per_expert_rank = x_ND.shape[0]  # rows a rank computes ~ rows it sends (uniform routing)
        layer.experts(x_ND, counts)
        t0 = time.perf_counter()
        for _ in range(3):
            layer.experts(x_ND, counts)
        t_comp = (time.perf_counter() - t0) / 3 * ranks_per_core
    remote_bytes = per_expert_rank * (W - 1) / W * s["hidden_size"] * 4
    bits = 2 * remote_bytes * 8  # dispatch rows out + results out, per direction of a rank's link
    mbit = max(int(bits / t_comp / 1e6 / 0.93 / 10) * 10, 10)  # gloo p2p reaches ~0.93 of the rate
    return f"{mbit}mbit"


if __name__ == "__main__":
    sys.exit(main())
