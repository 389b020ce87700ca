"""`moekit demo`: train a byte-level MoE LM on the stdlib's source, show expert load,
record a routing trace of the trained model and plan an expert placement from it; then
train the model a few steps expert parallel over local processes on a placement planned
from that trace, and compare with the same steps on one process; last, generate with the
trained model's experts offloaded to a disk store under a budget below their total, and
compare with generation in memory.

Every flag is checked before any work starts (a bad value, a --top-k above --experts, an
--out-dir that cannot be written): the error names the flag and the exit code is 2."""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

from moekit.config import BACKEND_CHOICES

log = logging.getLogger("moekit.demo")

# files the demo writes into --out-dir
OUT_FILES = ("model.pt", "routing.trace.npz", "placement.json", "placement-ep.json")

OFFLOAD_STORE = "experts"  # folder in --out-dir: the offload step's expert store

EP_TIMEOUT_S = 180.0  # the expert-parallel step's processes are stopped after this long

# library names (MoEConfig fields, ByteMoELM and planner arguments) -> the demo's flags,
# so an error raised by the library reads in the user's terms
FIELD_FLAGS = {
    "hidden_size": "--d-model", "ffn_hidden_size": "--ffn", "num_experts": "--experts",
    "top_k": "--top-k", "aux_loss_coef": "--aux-loss-coef", "backend": "--backend",
    "n_heads": "--heads", "max_seq_len": "--seq-len", "seq_len": "--seq-len", "num_gpus": "--plan-gpus",
}


def add_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--d-model", type=int, default=128, help="model width D (a multiple of --heads)")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks (each with one MoE layer)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer E")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K (at most --experts)")
    p.add_argument("--ffn", type=int, default=256, help="expert hidden size F")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight (>= 0)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="expert compute backend (auto: cpu on CPU, triton on CUDA; see MoEConfig.backend); "
                        "the demo runs on CPU, where triton needs TRITON_INTERPRET=1 set (slow)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--corpus-mb", type=float, default=8.0,
                   help="MiB of Python stdlib source to train on (5%% of it held out for validation)")
    p.add_argument("--trace-batches", type=int, default=8, help="validation batches recorded into the trace")
    p.add_argument("--plan-gpus", type=int, default=4,
                   help="GPUs to plan an expert placement for from the recorded trace; must divide "
                        "--experts (0: skip planning)")
    p.add_argument("--ep-ranks", type=int, default=2,
                   help="local processes (gloo) for the expert-parallel step: a placement for that many GPUs "
                        "is planned from the recorded trace (ILP, written to placement-ep.json), the trained "
                        "model is converted with moekit.parallel.expert_parallel onto it and trains "
                        "--ep-steps Adam steps, each global batch of --batch-size sequences split over the "
                        "ranks; a single-process copy takes the same steps, and the losses, the final "
                        "parameters and the bytes each rank sent are compared (>= 2, at most --batch-size; "
                        f"the processes are stopped after {EP_TIMEOUT_S:g} s; 0: skip the step)")
    p.add_argument("--ep-steps", type=int, default=3, help="training steps of the expert-parallel step")
    p.add_argument("--ep-slots-per-rank", type=int, default=0,
                   help="expert slots per rank in the expert-parallel step's plan; slots beyond --experts "
                        "in all hold replicas of the busiest experts, which split their tokens (0: "
                        "ceil(--experts / --ep-ranks) + 1, so each rank has a spare slot; at most --experts)")
    p.add_argument("--offload-budget", default="auto", metavar="SIZE",
                   help="offloaded-generation step: the trained model's experts go to a disk store "
                        f"(--out-dir/{OFFLOAD_STORE}) and generate greedily through an expert cache of this many "
                        "bytes (e.g. 3MiB, 4000000), compared with generation in memory (token-identical); "
                        "'auto' (default): half of each layer's experts; it must lie between one token's "
                        "working set (--layers x --top-k experts) and all the experts; 0: skip the step")
    p.add_argument("--offload-tokens", type=int, default=24,
                   help="bytes generated by the offloaded-generation step")
    p.add_argument("--sample-bytes", type=int, default=160,
                   help="bytes of text sampled from the trained model (0: no sample)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", type=Path, default=Path("moekit-demo"),
                   help="folder for " + ", ".join(OUT_FILES) + "; created if missing and checked for "
                        "writing before training starts")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (it is drawn only when stderr is a terminal); the loss lines "
                        "are printed either way")
    return p


def flag_hint(message: str) -> str:
    """Rewrite library names in an error message as the demo's flags:
    ``top_k=9 exceeds num_experts=8`` -> ``--top-k 9 exceeds --experts 8``. A name is rewritten
    where it is followed by ``=`` or is an identifier (holds ``_``), so plain words stay."""
    names = "|".join(sorted(FIELD_FLAGS, key=len, reverse=True))
    message = re.sub(rf"\b({names})=(['\"]?)([^\s,;)'\"]*)\2",
                     lambda m: f"{FIELD_FLAGS[m.group(1)]} {m.group(3)}", message)
    idents = "|".join(n for n in sorted(FIELD_FLAGS, key=len, reverse=True) if "_" in n)
    return re.sub(rf"\b({idents})\b", lambda m: FIELD_FLAGS[m.group(1)], message)


def check_args(args: argparse.Namespace) -> str | None:
    """Every check that needs no work done: the first problem, in the flags' terms, or None."""
    for name in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "experts", "top_k", "ffn",
                 "trace_batches", "ep_steps", "offload_tokens"):
        if getattr(args, name) < 1:
            return f"{_flag(name)} must be >= 1, got {getattr(args, name)}"
    for name in ("plan_gpus", "sample_bytes", "threads", "ep_ranks", "ep_slots_per_rank"):
        if getattr(args, name) < 0:
            return f"{_flag(name)} must be >= 0, got {getattr(args, name)}"
    for name, low in (("lr", "> 0"), ("corpus_mb", "> 0"), ("aux_loss_coef", ">= 0")):
        v = getattr(args, name)
        if not (math.isfinite(v) and (v > 0 if low == "> 0" else v >= 0)):
            return f"{_flag(name)} must be a finite number {low}, got {v}"
    if args.top_k > args.experts:
        return f"--top-k {args.top_k} exceeds --experts {args.experts} (each token picks K of the E experts)"
    if args.d_model % args.heads:
        return f"--d-model {args.d_model} must be divisible by --heads {args.heads}"
    if args.plan_gpus and args.experts % args.plan_gpus:
        divisors = [g for g in range(1, args.experts + 1) if args.experts % g == 0]
        return (f"--plan-gpus {args.plan_gpus} does not divide --experts {args.experts} (each GPU holds "
                f"E/G experts); pass --plan-gpus one of {divisors}, or --plan-gpus 0 to skip planning")
    problem = _check_ep_args(args) or _check_offload_args(args)
    if problem:
        return problem
    from moekit.demo import min_corpus_bytes

    corpus_bytes = int(args.corpus_mb * (1 << 20))
    if corpus_bytes < min_corpus_bytes(args.seq_len):
        return (f"--corpus-mb {args.corpus_mb} ({corpus_bytes} bytes) is too small for --seq-len "
                f"{args.seq_len}: it needs at least {min_corpus_bytes(args.seq_len)} bytes")
    if args.backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "--backend triton needs triton (pip install 'moekit[triton]'); or use --backend auto"
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            return ("--backend triton: the demo runs on CPU, where Triton kernels run only in the interpreter; "
                    "set TRITON_INTERPRET=1 (slow) or use --backend auto, cpu, loop or grouped_mm")
    from moekit.config import MoEConfig  # the config's own rules, in the flags' terms

    try:
        _moe_config(args, MoEConfig)
    except (TypeError, ValueError) as exc:
        return flag_hint(str(exc))
    return check_out_dir(args.out_dir)


def offload_budget(args: argparse.Namespace) -> int:
    """The offload step's budget in bytes (0: skipped); ValueError for an unreadable size."""
    from moekit.demo_offload import default_budget, expert_bytes_of_model

    text = str(args.offload_budget).strip().lower()
    if text in ("0", "0b", "off", "none"):
        return 0
    one, _ = expert_bytes_of_model(args.layers, args.experts, args.d_model, args.ffn)
    if text == "auto":
        return default_budget(args.layers, args.experts, args.top_k, one)
    from moekit.offload.simulate import parse_bytes

    return parse_bytes(args.offload_budget)


def _check_offload_args(args: argparse.Namespace) -> str | None:
    from moekit.demo_offload import expert_bytes_of_model

    try:
        budget = offload_budget(args)
    except ValueError as exc:
        return f"--offload-budget: {exc}, or auto, or 0 to skip the offloaded-generation step"
    if not budget:
        return None
    store = args.out_dir / OFFLOAD_STORE
    if store.exists() and not store.is_dir():
        return f"--out-dir {args.out_dir}: {OFFLOAD_STORE} there is a file; the offloaded-generation step writes " \
               f"its expert store into a folder of that name (or pass --offload-budget 0 to skip the step)"
    one, total = expert_bytes_of_model(args.layers, args.experts, args.d_model, args.ffn)
    low = args.layers * args.top_k * one
    if budget < low:
        return (f"--offload-budget {args.offload_budget} ({budget} bytes) is below one token's working set: "
                f"{low} bytes (--layers {args.layers} x --top-k {args.top_k} experts of {one} bytes); "
                f"give at least that, or 0 to skip the offloaded-generation step")
    if budget >= total:
        return (f"--offload-budget {args.offload_budget} ({budget} bytes) holds every expert ({total} bytes: "
                f"--layers {args.layers} x --experts {args.experts} x {one} bytes), so nothing would be offloaded; "
                f"give less than {total} bytes, or 0 to skip the offloaded-generation step")
    return None


def ep_slots_per_rank(args: argparse.Namespace) -> int:
    """Slots per rank of the expert-parallel step's plan: --ep-slots-per-rank, or by default
    one more than an even split needs (a spare slot per rank for a replica), at most E."""
    if args.ep_slots_per_rank:
        return args.ep_slots_per_rank
    return min(-(-args.experts // args.ep_ranks) + 1, args.experts)


def _check_ep_args(args: argparse.Namespace) -> str | None:
    W = args.ep_ranks
    if not W:
        return None
    if W == 1:
        return "--ep-ranks 1: the expert-parallel step needs at least 2 ranks (--ep-ranks 0 skips it)"
    if W > args.batch_size:
        return (f"--ep-ranks {W} exceeds --batch-size {args.batch_size}: the step splits each global batch of "
                f"--batch-size sequences over the ranks, at least one each (--ep-ranks 0 skips the step)")
    S = ep_slots_per_rank(args)
    if S > args.experts:
        return (f"--ep-slots-per-rank {S} exceeds --experts {args.experts}: a rank would hold an expert twice")
    if S * W < args.experts:
        return (f"--ep-slots-per-rank {S} x --ep-ranks {W} = {S * W} slots is fewer than --experts "
                f"{args.experts}; pass --ep-slots-per-rank >= {-(-args.experts // W)} (or 0 for the default)")
    return None


def check_out_dir(out_dir: Path) -> str | None:
    """Make --out-dir before the work starts and prove it takes a file; the problem, or None."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"--out-dir {out_dir} exists and is not a directory"
    except NotADirectoryError:
        return f"--out-dir {out_dir}: a part of that path is a file, not a directory"
    except OSError as exc:
        return f"--out-dir {out_dir} cannot be created: {exc.strerror or exc}"
    if not out_dir.is_dir():  # e.g. a link to a file
        return f"--out-dir {out_dir} is not a directory"
    try:
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        return f"--out-dir {out_dir} is not writable: {exc.strerror or exc}"
    for name in OUT_FILES:
        target = out_dir / name
        if target.is_dir():
            return f"--out-dir {out_dir}: {name} there is a directory; the demo writes a file of that name"
        if target.exists() and not os.access(target, os.W_OK):
            return f"--out-dir {out_dir}: {name} there is not writable"
    return None


def run(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"moekit demo: error: {problem}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from moekit import MoEConfig
    from moekit.demo import ByteBatches, ByteMoELM, load_table, stdlib_corpus, train
    from moekit.trace import record

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model = ByteMoELM(_moe_config(args, MoEConfig), n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=args.seq_len)
    except (TypeError, ValueError) as exc:  # a rule check_args does not know yet
        print(f"moekit demo: error: {flag_hint(str(exc))}", file=sys.stderr)
        return 2
    corpus = stdlib_corpus(int(args.corpus_mb * (1 << 20)))
    try:
        batches = ByteBatches(corpus, args.batch_size, args.seq_len, seed=args.seed)
    except ValueError as exc:  # this Python's stdlib holds less source than --corpus-mb asked for
        print(f"moekit demo: error: the standard library's source: {flag_hint(str(exc))}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    print(f"moekit demo: {n_params / 1e6:.2f}M parameters, {args.layers} MoE layers x {args.experts} experts "
          f"(top-{args.top_k}), corpus {len(corpus) / 2**20:.1f} MiB of Python stdlib source, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    # the bar goes to stderr and only to a terminal: logs and pipes get the loss lines alone
    bar = tqdm(total=args.steps, desc="training", unit="step", file=sys.stderr,
               disable=args.no_progress or not sys.stderr.isatty())
    every = max(args.steps // 10, 1)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % every == 0 or step == 0:
            tqdm.write(f"step {step + 1:5d}  loss {loss:.4f}", file=sys.stdout)

    result = train(model, batches, args.steps, lr=args.lr, on_step=on_step)
    bar.close()
    print(f"\nvalidation loss {result.val_loss_before:.3f} -> {result.val_loss_after:.3f} "
          f"(nats/byte; uniform is {torch.log(torch.tensor(256.0)):.3f}) in {result.seconds:.1f} s "
          f"({args.steps * args.batch_size * args.seq_len / result.seconds:.0f} tokens/s)")
    print("\nexpert load over training (share of top-k assignments):")
    print(load_table(result.tokens_per_expert))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out_dir / "model.pt")
    model.eval()
    with torch.no_grad(), record(model, model_name="moekit-demo-byte-lm") as rec:
        for _ in range(args.trace_batches):
            model(batches.sample("val")[0])
    trace_path = rec.save(args.out_dir / "routing.trace.npz")
    print(f"\nrouting trace of the trained model: {rec.num_tokens} tokens x {args.layers} layers -> {trace_path}")

    if args.sample_bytes:
        text = model.generate(b"def ", args.sample_bytes, seed=args.seed)
        print("\nsample (prompt 'def '):\n" + "-" * 60 + "\ndef " + text.decode("utf-8", "replace") + "\n" + "-" * 60)

    summary = {"steps": args.steps, "val_loss_before": round(result.val_loss_before, 4),
               "val_loss_after": round(result.val_loss_after, 4), "train_seconds": round(result.seconds, 2),
               "trace": str(trace_path)}
    if args.plan_gpus:
        summary["plan"] = _plan_step(trace_path, args.plan_gpus, args.out_dir)
    rc = 0
    if args.ep_ranks:
        summary["ep"] = _ep_step(args, model, batches, trace_path)
        rc = 1 if "error" in summary["ep"] else 0
    budget = offload_budget(args)
    if budget:
        summary["offload"] = _offload_step(args, model, budget)
        rc = rc or (0 if summary["offload"].get("identical") else 1)
    print(json.dumps(summary))
    return rc


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _moe_config(args: argparse.Namespace, config_cls):
    return config_cls(hidden_size=args.d_model, ffn_hidden_size=args.ffn, num_experts=args.experts,
                      top_k=args.top_k, aux_loss_coef=args.aux_loss_coef, backend=args.backend)


def _plan_step(trace_path: Path, gpus: int, out_dir: Path) -> dict:
    """Plan a placement on the recorded trace with the library calls behind `moekit plan`:
    contiguous, round-robin, greedy and ILP side by side; the ILP plan is written."""
    from moekit import planner

    trace = planner.read_trace(trace_path)
    print(f"\nplanning expert placement for {gpus} GPUs from the recorded trace "
          f"(same as: moekit plan --trace {trace_path} --gpus {gpus}):")
    try:
        results = planner.compare_placements(trace, num_gpus=gpus, time_limit=20.0)
    except ValueError as exc:  # check_args rules out experts that do not divide over the GPUs
        print(f"planning skipped: {flag_hint(str(exc))}")
        return {"skipped": flag_hint(str(exc))}
    print(planner.format_table(results))
    best = results[-1]
    out = out_dir / "placement.json"
    planner.write_placement_json(out, best)
    print(f"placement ({best.method}) -> {out}")
    return {"method": best.method, "max_mean_load": round(best.max_mean_load, 4),
            "cross_gpu_frac": round(float(best.metrics.get("cross_gpu_frac", float("nan"))), 4),
            "placement": str(out)}


def _offload_step(args: argparse.Namespace, model, budget: int) -> dict:
    """Generate with the trained model's experts in a disk store under ``budget`` bytes and
    compare with generation in memory (moekit.demo_offload): the summary's ``offload`` entry."""
    from moekit.demo_offload import describe, offload_generate_check

    store = args.out_dir / OFFLOAD_STORE
    print(f"\noffloaded generation: the trained experts -> disk store {store} (page cache dropped after each "
          f"read), expert cache of {budget / 2**20:.2f} MiB (policy predictive), greedy from 'def ' against the "
          f"same weights in memory:")
    res = offload_generate_check(model, store, budget, prompt=b"def ", n_bytes=args.offload_tokens)
    print(f"experts {res.experts_bytes / 2**20:.2f} MiB in all, budget {res.budget_bytes / 2**20:.2f} MiB "
          f"(minimum {res.min_budget_bytes / 2**20:.2f} MiB); " + describe(res))
    if not res.identical:
        print(f"moekit demo: error: offloaded generation differs from in-memory generation: "
              f"{res.generated!r} vs {res.reference!r}", file=sys.stderr)
    return res.to_json_dict()


def _ep_step(args: argparse.Namespace, model, batches, trace_path: Path) -> dict:
    """Plan for --ep-ranks GPUs from the recorded trace, then train expert parallel over that
    many local processes against one process (moekit.demo_ep): the summary's ``ep`` entry."""
    import torch

    from moekit import planner
    from moekit.demo_ep import EPStepError, ep_table, ep_train_check

    W, S = args.ep_ranks, ep_slots_per_rank(args)
    out = args.out_dir / "placement-ep.json"
    print(f"\nexpert-parallel step: planning for {W} GPUs x {S} slots from the recorded trace (same as: moekit "
          f"plan --trace {trace_path} --gpus {W} --slots-per-gpu {S} --out {out})")
    try:
        plan = planner.plan_placement(planner.read_trace(trace_path), num_gpus=W, slots_per_gpu=S,
                                      time_limit=20.0)
    except ValueError as exc:  # check_args rules out too few or too many slots
        print(f"expert-parallel step skipped: {flag_hint(str(exc))}")
        return {"skipped": flag_hint(str(exc))}
    planner.write_placement_json(out, plan)
    global_batches = [batches.sample("train") for _ in range(args.ep_steps)]
    per_rank = [len(part) for part in torch.tensor_split(global_batches[0][0], W)]
    print(f"placement ({plan.method}, max/mean load {plan.max_mean_load:.4f}) -> {out}; training "
          f"{args.ep_steps} Adam steps (lr {args.lr:g}, aux loss on the global batch) on "
          f"{W} local processes, {'/'.join(map(str, per_rank))} of {args.batch_size} sequences each, "
          f"and on one process:")
    try:
        res = ep_train_check(model, global_batches, placement=out, world_size=W, lr=args.lr, timeout=EP_TIMEOUT_S)
    except EPStepError as exc:
        print(f"moekit demo: error: {exc}", file=sys.stderr)
        return {"error": str(exc), "placement": str(out)}
    reps = "; ".join(f"layer {l}: {r}" for l, r in enumerate(res.replicated_experts) if r) or "none"
    print(f"replicated experts: {reps}")
    print(ep_table(res))
    print(f"({res.seconds:.1f} s for the {W} processes, start-up included)")
    return res.to_json_dict()
