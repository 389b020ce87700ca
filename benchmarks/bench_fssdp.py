#!/usr/bin/env python
"""FSSDP (Hecate) against expert parallelism and FSDP2-on-experts, on routing skewed like a real trace.

Routing: each MoE layer's expert distribution is taken from a real trace (default
``../shared/traces/qwen.route.csv``, Qwen3-30B-A3B, 128 experts): the trace layer's experts are
ranked by load and adjacent ranks merged pairwise to reach E = 64 (the heavy tail keeps its
shape), expert ids are then permuted at random (hot experts are not contiguous), and every
step draws T tokens' top-K sets from that distribution (without replacement within a token).
Steps are i.i.d. draws: the skew is stationary, as the window of Algorithm 1 assumes.

Two parts, both on the same drawn routing:

1. **accounting** (W = 4, 8, 16, 32; the shape of Qwen3-30B-A3B's experts, D=2048, F=768, and
   its 48 MoE layers, fp32 + Adam): per step, from the routing alone and moekit's own Algorithm 1
   (``choose_materialization``) and dispatch rule (the same one ``SparseDispatcher`` uses,
   re-implemented on counts), the straggler factor (max over mean rows computed per device,
   mean over layers and steps), bytes per step (token all-to-all forward + backward; spAG +
   spRS of the weights; FSDP2's all-gather + reduce-scatter of every expert), and per-rank
   expert memory (the ledger formulas, REFERENCE §2). Memory cap m = 8 non-owned experts per
   rank and layer ("8 replicas' worth").
2. **measured** (``--measure``, W = 4 processes on this machine, gloo, small dims): the same
   routing through the real models (``expert_parallel``, ``fssdp``, ``fssdp(remat=True)``, and
   FSDP2 ``fully_shard`` over the plain model, experts sharded on dim 0): rows each rank's
   experts computed (a hook on the experts), weight bytes (the sparse collectives' counters),
   token bytes (the dispatchers' counters, x2 for backward), expert parameter + gradient +
   optimizer bytes held (from the tensors), step time. The accounting of part 1 is checked
   against these counters at the measured size (they must agree exactly).

Step time here is CPU gloo on loopback with every rank sharing 2 cores: it shows the cost of
the extra work, not what a network would do (see benchmarks/shaped_link.py).

    python benchmarks/bench_fssdp.py            # accounting + measured, ~2 minutes
    python benchmarks/bench_fssdp.py --quick    # smoke test
    sudo python benchmarks/bench_fssdp.py --measure --shaped 1gbit   # measured part over a shaped link

The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import cpu_model  # noqa: E402
from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit.parallel.fssdp import Materialization, choose_materialization, ledger  # noqa: E402
from moekit.router import Routing, count_per_expert  # noqa: E402

DEFAULT_TRACE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "qwen.route.csv"


# ---- routing drawn from a trace -------------------------------------------------------------------

def layer_distributions(trace_path: Path, E: int, L: int, seed: int) -> np.ndarray:
    """[L, E] expert probabilities: L trace layers evenly spaced, ranked loads merged pairwise
    (or more) down to E, ids permuted."""
    from moekit.planner.traces import read_trace

    tr = read_trace(trace_path)
    rng = np.random.default_rng(seed)
    picks = np.linspace(0, tr.num_layers - 1, L).round().astype(int)
    out = np.zeros((L, E))
    for i, l in enumerate(picks):
        ids = tr.topk_ids[l].reshape(-1)
        load = np.bincount(ids[ids >= 0], minlength=tr.num_experts).astype(float)
        ranked = np.sort(load)[::-1]
        g = tr.num_experts // E
        merged = ranked[: g * E].reshape(E, g).sum(1) + 0.5  # +0.5: every expert can be drawn
        out[i, rng.permutation(E)] = merged / merged.sum()
    return out


def draw_routing(probs_LE: np.ndarray, T: int, K: int, steps: int, seed: int) -> list[list[torch.Tensor]]:
    """steps x L tensors of ids [T, K] (global batch; rank r takes rows [r*T/W, (r+1)*T/W)): each
    token's K experts drawn without replacement from the layer's distribution (Gumbel top-k)."""
    g = torch.Generator().manual_seed(seed)
    logp = torch.tensor(probs_LE, dtype=torch.float32).log()
    out = []
    for _ in range(steps):
        row = []
        for l in range(len(logp)):
            u = torch.rand(T, logp.shape[1], generator=g).clamp_(min=1e-20)
            row.append((logp[l] - torch.log(-torch.log(u))).topk(K, dim=1).indices)
        out.append(row)
    return out


# ---- accounting (the dispatch rule of SparseDispatcher, on counts) ------------------------------

def rows_per_device(ids_TK: torch.Tensor, mat: Materialization, W: int, rpn: int) -> tuple[np.ndarray, int]:
    """Rows each device computes and the rows that cross ranks, for the global batch split
    evenly over W source ranks, dispatched as SparseDispatcher does (local holder, else same
    node, else all holders; the k-th assignment from source s to candidate (k + s) mod n)."""
    T = ids_TK.shape[0]
    E = mat.num_experts
    rows = np.zeros(W, dtype=np.int64)
    remote = 0
    node = [r // rpn for r in range(W)]
    for s in range(W):
        part = ids_TK[s * T // W:(s + 1) * T // W]
        c_E = count_per_expert(part, E).tolist()
        for e, c in enumerate(c_E):
            if not c:
                continue
            hs = mat.holders_E[e]
            cand = [s] if s in hs else ([q for q in hs if node[q] == node[s]] or list(hs))
            n = len(cand)
            for j, q in enumerate(cand):
                got = c // n + (1 if (j - s) % n < c % n else 0)
                rows[q] += got
                if q != s:
                    remote += got
    return rows, remote


def account(routing, W: int, E: int, D: int, p: int, m: int, window: int, warmup: int, rpn: int | None = None,
            b: int = 4) -> dict:
    """Per-step means (after ``warmup`` steps) for EP and FSSDP, and FSDP2's figures."""
    L = len(routing[0])
    rpn = rpn or W
    owners = [e * W // E for e in range(E)]
    hist: list[np.ndarray] = []
    res = {k: [] for k in ("ep_straggler", "fssdp_straggler", "ep_token_bytes", "fssdp_token_bytes",
                           "spag_bytes", "sprs_bytes", "replicas_max", "replicas_sum")}
    for step, ids_L in enumerate(routing):
        load = np.sum(hist[-window:], axis=0) if hist else np.zeros((L, E), dtype=np.int64)
        mats = [choose_materialization(load[l].tolist(), owners, W, m, None, rpn) for l in range(L)]
        if step >= warmup:
            ep_s, fs_s, ep_b, fs_b = [], [], 0, 0
            for l in range(L):
                r_ep, rem_ep = rows_per_device(ids_L[l], Materialization.owners_only(owners, W), W, rpn)
                r_fs, rem_fs = rows_per_device(ids_L[l], mats[l], W, rpn)
                ep_s.append(r_ep.max() / r_ep.mean())
                fs_s.append(r_fs.max() / r_fs.mean())
                ep_b += 4 * rem_ep * D * b  # dispatch + combine, forward + backward
                fs_b += 4 * rem_fs * D * b
            res["ep_straggler"].append(float(np.mean(ep_s)))
            res["fssdp_straggler"].append(float(np.mean(fs_s)))
            res["ep_token_bytes"].append(ep_b)
            res["fssdp_token_bytes"].append(fs_b)
            res["spag_bytes"].append(sum(ledger.spag_bytes(mt, p, b) for mt in mats))
            res["sprs_bytes"].append(sum(ledger.sprs_bytes(mt, p, b) for mt in mats))
            res["replicas_max"].append(max(len(mt.replicas(d)) for mt in mats for d in range(W)))
            res["replicas_sum"].append(max(sum(len(mt.replicas(d)) for mt in mats) for d in range(W)))
        hist.append(np.stack([count_per_expert(ids_L[l], E).numpy() for l in range(L)]))
    out = {k: float(np.mean(v)) for k, v in res.items()}
    out["fsdp2_bytes"] = L * (W - 1) * E * p * (b + b)  # all-gather of weights + reduce-scatter of grads
    out["mats_last"] = mats
    return out


def memory_table(L: int, E: int, W: int, p: int, m_live_max: int, m_live_sum: int, b_w=4, b_g=4, b_o=8) -> dict:
    ep = ledger.ep_memory(L, E, W, p, b_w, b_g, b_o)
    owned = ep  # contiguous owners: the same E/W experts per layer as EP
    return {"ep": ep,
            "fssdp": owned + m_live_sum * p * (b_w + b_g),
            "fssdp_remat": owned + m_live_max * p * (b_w + b_g),
            # FSDP2: the E/W shard with its optimizer state, plus one layer's gathered experts and grads
            "fsdp2": owned + E * p * (b_w + b_g)}


# ---- measured ------------------------------------------------------------------------------------

class TraceRouter(nn.Module):
    """Routes each forward's tokens to the ids set in ``self.ids`` (uniform weights 1/K)."""

    def __init__(self, E: int, K: int, D: int):
        super().__init__()
        self.E, self.K = E, K
        self.ids: torch.Tensor | None = None
        self.register_buffer("weight", torch.zeros(E, D), persistent=False)  # the layer reads its dtype

    def forward(self, x_TD):
        ids = self.ids
        T = x_TD.shape[0]
        w = torch.full((T, self.K), 1.0 / self.K)
        z = torch.zeros(T, self.E)
        return Routing(ids, w, z, z, count_per_expert(ids, self.E))


class Stack(nn.Module):
    def __init__(self, cfg, L):
        super().__init__()
        self.dense = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.hidden_size) for _ in range(L))
        self.moe = nn.ModuleList(MoELayer(cfg) for _ in range(L))
        for m in self.moe:
            m.router = TraceRouter(cfg.num_experts, cfg.top_k, cfg.hidden_size)

    def forward(self, x):
        for d, m in zip(self.dense, self.moe):
            x = x + m(torch.tanh(d(x)))
        return x


def _worker(rank, W, port, a, mode, out_dir):
    import warnings

    # MoELayer returns a view; Stack adds it out of place, as FSDP2's warning asks
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    torch.set_num_threads(1)
    if port:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                                timeout=timedelta(seconds=300))
    else:  # under shaped_link.py (env://)
        dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    from moekit.parallel import expert_parallel, fssdp
    from moekit.parallel.fssdp import fssdp_state

    probs = layer_distributions(Path(a.trace), a.E, a.L, a.seed)
    routing = draw_routing(probs, a.T * W, a.K, a.warmup + a.steps, a.seed + 1)
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=a.D, ffn_hidden_size=a.F, num_experts=a.E, top_k=a.K)
    model = Stack(cfg, a.L)
    inner = model
    if mode == "ep":
        expert_parallel(model)
        from torch.nn.parallel import DistributedDataParallel as DDP
        from moekit.parallel import expert_param_names

        DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
        model = DDP(model)
    elif mode.startswith("fssdp"):
        model = fssdp(model, memory_cap=a.m, remat=(mode == "fssdp_remat"))
        inner = model.module
    else:  # fsdp2: every parameter sharded on dim 0, all experts gathered every step
        from torch.distributed.fsdp import fully_shard

        for m in inner.moe:
            fully_shard(m)
        fully_shard(model)
    rows = [0]
    for m in inner.moe:
        m.experts.register_forward_pre_hook(lambda mod, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(a.T, a.D, generator=g)
    times, rows_steps = [], []
    for step, ids_L in enumerate(routing):
        for m, ids in zip(inner.moe, ids_L):
            m.router.ids = ids[rank * a.T:(rank + 1) * a.T]
        if step == a.warmup and mode.startswith("fssdp"):
            ctl = fssdp_state(model)
            base = (ctl.spag_traffic.bytes_sent, ctl.sprs_traffic.bytes_sent)
        if step == a.warmup:
            for m in inner.moe:
                if hasattr(m.dispatcher, "bytes_sent"):
                    m.dispatcher.bytes_sent = 0
        rows[0] = 0
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        dt = time.perf_counter() - t0
        if step >= a.warmup:
            times.append(dt)
            rows_steps.append(rows[0])
    res = {"rank": rank, "step_ms": statistics.median(times) * 1e3, "rows": rows_steps}
    res["token_bytes"] = 2 * sum(getattr(m.dispatcher, "bytes_sent", 0) for m in inner.moe)  # + backward
    if mode.startswith("fssdp"):
        ctl = fssdp_state(model)
        res["spag_bytes"] = ctl.spag_traffic.bytes_sent - base[0]
        res["sprs_bytes"] = ctl.sprs_traffic.bytes_sent - base[1]
    expert_bytes = 0
    for m in inner.moe:
        for t in (m.experts.w_in, m.experts.w_out):
            local = t.to_local() if hasattr(t, "to_local") else t
            n = local.numel() * local.element_size()
            expert_bytes += n + (n if t.grad is not None else 0)
            expert_bytes += sum((v.to_local() if hasattr(v, "to_local") else v).numel() * 4
                                for v in opt.state[t].values() if v.dim() > 0)
    res["expert_state_bytes"] = expert_bytes
    Path(out_dir, f"{mode}.r{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(a, W: int, rate: str | None = None) -> dict:
    """The four models on W processes: spawned here (loopback), or with ``rate`` each rank in its
    own network namespace behind a link shaped to ``rate`` (benchmarks/shaped_link.py, env://)."""
    out = {}
    with tempfile.TemporaryDirectory() as d:
        if rate:
            os.chmod(d, 0o777)
            Path(d, "args.json").write_text(json.dumps(vars(a)))
        for mode in ("ep", "fssdp", "fssdp_remat", "fsdp2"):
            if rate:
                from shaped_link import launch

                rc = launch(rate, W, [sys.executable, __file__, "--rank-mode", mode, "--out", d], timeout=1200)
                if rc:
                    raise RuntimeError(f"shaped-link run of {mode} failed with exit code {rc}")
            else:
                mp.start_processes(_worker, args=(W, _free_port(), a, mode, d), nprocs=W, join=True,
                                   start_method="spawn")
            rs = [json.loads(Path(d, f"{mode}.r{r}.json").read_text()) for r in range(W)]
            rows_WS = np.array([r["rows"] for r in rs])  # [W, steps], summed over layers
            out[mode] = {"step_ms": max(r["step_ms"] for r in rs),
                         "rows_per_rank": rows_WS.sum(1).tolist(),
                         "token_bytes_per_step": sum(r["token_bytes"] for r in rs) / a.steps,
                         "spag_bytes_per_step": sum(r.get("spag_bytes", 0) for r in rs) / a.steps,
                         "sprs_bytes_per_step": sum(r.get("sprs_bytes", 0) for r in rs) / a.steps,
                         "expert_state_bytes_max": max(r["expert_state_bytes"] for r in rs)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--E", type=int, default=64)
    p.add_argument("--K", type=int, default=6)
    p.add_argument("--L", type=int, default=4, help="measured: MoE layers (trace layers evenly spaced)")
    p.add_argument("--acc-layers", type=int, default=48, help="accounting: MoE layers (Qwen3-30B-A3B has 48)")
    p.add_argument("--m", type=int, default=8, help="memory cap: non-owned experts per rank and layer")
    p.add_argument("--worlds", default="4,8,16,32")
    p.add_argument("--tokens", type=int, default=1024, help="accounting: tokens per rank and step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5, help="steps before counting (the load window)")
    p.add_argument("--measure", action="store_true", help="also run the models on W=4 processes here")
    p.add_argument("--D", type=int, default=64, help="measured: model dim")
    p.add_argument("--F", type=int, default=48, help="measured: expert hidden dim")
    p.add_argument("--T", type=int, default=256, help="measured: tokens per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shaped", metavar="RATE", help="measured: ranks behind a shaped link (e.g. 1gbit; root)")
    p.add_argument("--rank-mode", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.rank_mode:  # one rank of a shaped-link run, started by shaped_link.launch (env://)
        saved = argparse.Namespace(**json.loads(Path(a.out, "args.json").read_text()))
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), 0, saved, a.rank_mode, a.out)
        return 0
    if a.quick:
        a.worlds, a.tokens, a.steps, a.warmup, a.T, a.L, a.acc_layers = "4", 256, 2, 2, 64, 2, 4
    command = " ".join(shlex.quote(x) for x in [sys.executable, *sys.argv])
    print(f"command: {command}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    if not Path(a.trace).exists():
        print(json.dumps({"skipped": f"trace {a.trace} not found"}))
        return 0
    probs = layer_distributions(Path(a.trace), a.E, a.acc_layers, a.seed)
    share = probs.max(1)
    print(f"routing: {Path(a.trace).name}, E={a.E}, K={a.K}; hottest expert's share of a layer's assignments: "
          f"median {np.median(share):.3f}, max {share.max():.3f} over {a.acc_layers} layers (uniform {1 / a.E:.3f})")
    Dq, Fq = 2048, 768
    pq = 3 * Dq * Fq  # GLU expert: w_in [2F, D] + w_out [D, F]
    print(f"accounting: D={Dq} F={Fq} (p={pq} elements/expert, fp32, Adam), m={a.m}, {a.tokens} tokens/rank/step, "
          f"{a.steps} steps after a {a.warmup}-step window")
    hdr = (f"{'W':>3} {'EP strag':>8} {'FSSDP strag':>11} {'EP GB':>7} {'FSSDP tok GB':>12} {'FSSDP w GB':>10} "
           f"{'FSDP2 GB':>9} {'w/FSDP2':>7} {'all/FSDP2':>9} {'mem EP':>7} {'+FSSDP':>7} {'+RM':>6} {'FSDP2':>6}")
    print(hdr)
    table = []
    worlds = [int(w) for w in a.worlds.split(",")]
    drawn = draw_routing(probs, a.tokens * max(worlds), a.K, a.warmup + a.steps, a.seed + 1)
    for W in worlds:
        routing = [[ids[:a.tokens * W] for ids in row] for row in drawn]  # the first W ranks' tokens
        acc = account(routing, W, a.E, Dq, pq, a.m, 5, a.warmup)
        mem = memory_table(a.acc_layers, a.E, W, pq, int(acc["replicas_max"]), int(acc["replicas_sum"]))
        w_bytes = acc["spag_bytes"] + acc["sprs_bytes"]
        row = {"W": W, "ep_straggler": acc["ep_straggler"], "fssdp_straggler": acc["fssdp_straggler"],
               "ep_bytes": acc["ep_token_bytes"], "fssdp_token_bytes": acc["fssdp_token_bytes"],
               "fssdp_weight_bytes": w_bytes, "fsdp2_bytes": acc["fsdp2_bytes"],
               "weight_ratio_vs_fsdp2": w_bytes / acc["fsdp2_bytes"],
               "total_ratio_vs_fsdp2": (w_bytes + acc["fssdp_token_bytes"]) / acc["fsdp2_bytes"],
               "mem": mem, "mem_fssdp_vs_ep": mem["fssdp"] / mem["ep"] - 1,
               "mem_remat_vs_ep": mem["fssdp_remat"] / mem["ep"] - 1}
        table.append(row)
        G = 1e9
        print(f"{W:>3} {row['ep_straggler']:>8.2f} {row['fssdp_straggler']:>11.2f} {row['ep_bytes'] / G:>7.2f} "
              f"{row['fssdp_token_bytes'] / G:>12.2f} {w_bytes / G:>10.2f} {row['fsdp2_bytes'] / G:>9.2f} "
              f"{row['weight_ratio_vs_fsdp2']:>7.3f} {row['total_ratio_vs_fsdp2']:>9.3f} {mem['ep'] / G:>7.2f} "
              f"{row['mem_fssdp_vs_ep']:>+7.1%} {row['mem_remat_vs_ep']:>+6.1%} {mem['fsdp2'] / mem['ep'] - 1:>+6.1%}")
    print("(strag = max/mean rows per device; GB per step, all ranks; w = spAG + spRS of weights; mem = expert "
          "weights + grads + Adam state per rank, FSSDP/RM/FSDP2 relative to EP)")
    result = {"bench": "fssdp", "trace": Path(a.trace).name, "E": a.E, "K": a.K, "L": a.acc_layers, "m": a.m,
              "accounting": table}
    if a.measure or a.quick or a.shaped:
        Wm = 4
        meas = measure(a, Wm, a.shaped)
        pm = 3 * a.D * a.F
        probs = layer_distributions(Path(a.trace), a.E, a.L, a.seed)
        routing = draw_routing(probs, a.T * Wm, a.K, a.warmup + a.steps, a.seed + 1)
        acc = account(routing, Wm, a.E, a.D, pm, a.m, 5, a.warmup)
        link = f"gloo over a link shaped to {a.shaped} per rank" if a.shaped else "gloo over loopback"
        print(f"measured: W={Wm} processes on this machine, {link}, D={a.D} F={a.F} E={a.E} K={a.K} L={a.L}, "
              f"T={a.T} tokens/rank, m={a.m}, {a.steps} steps after {a.warmup}")
        print(f"{'mode':>12} {'step ms':>8} {'straggler':>9} {'token MB':>9} {'spAG MB':>8} {'spRS MB':>8} "
              f"{'owned expert state MB/rank':>26}")
        for mode, r in meas.items():
            rows = np.array(r["rows_per_rank"], dtype=float)
            r["straggler_total"] = float(rows.max() / rows.mean())
            print(f"{mode:>12} {r['step_ms']:>8.1f} {r['straggler_total']:>9.2f} "
                  f"{r['token_bytes_per_step'] / 1e6:>9.3f} "
                  f"{r['spag_bytes_per_step'] / 1e6:>8.3f} {r['sprs_bytes_per_step'] / 1e6:>8.3f} "
                  f"{r['expert_state_bytes_max'] / 1e6:>26.3f}")
        print("(straggler: max/mean rows computed per rank over the timed steps, all layers; MB per step, all "
              "ranks; owned state: expert weights + grads + Adam state that persist between steps)")
        checks = {
            "token_bytes_ep": meas["ep"]["token_bytes_per_step"] == acc["ep_token_bytes"],
            "token_bytes_fssdp": meas["fssdp"]["token_bytes_per_step"] == acc["fssdp_token_bytes"],
            "spag_bytes": meas["fssdp"]["spag_bytes_per_step"] == acc["spag_bytes"],
            "sprs_bytes": meas["fssdp"]["sprs_bytes_per_step"] == acc["sprs_bytes"],
            "spag_bytes_remat": meas["fssdp_remat"]["spag_bytes_per_step"] == 2 * acc["spag_bytes"],
        }
        print(f"accounting == measured counters: {checks}")
        result["measured"] = {"W": Wm, "link": a.shaped or "loopback", "D": a.D, "F": a.F, "T": a.T, "modes": meas,
                              "accounting_checks": checks}
    print(json.dumps(result, default=lambda o: None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
