"""`moekit demo`: train a byte-level MoE LM on the stdlib's source, show expert load,
record a routing trace of the trained model and plan an expert placement from it."""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from pathlib import Path

log = logging.getLogger("moekit.demo")


def add_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="bytes per sequence")
    p.add_argument("--d-model", type=int, default=128, help="model width D")
    p.add_argument("--layers", type=int, default=4, help="decoder blocks (each with one MoE layer)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--experts", type=int, default=8, help="experts per MoE layer E")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K")
    p.add_argument("--ffn", type=int, default=256, help="expert hidden size F")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="load-balancing loss weight")
    p.add_argument("--backend", default="auto", choices=["auto", "loop", "grouped_mm", "triton"],
                   help="expert compute backend")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    p.add_argument("--corpus-mb", type=float, default=8.0, help="MiB of stdlib source to train on")
    p.add_argument("--trace-batches", type=int, default=8, help="validation batches recorded into the trace")
    p.add_argument("--plan-gpus", type=int, default=4,
                   help="GPUs to plan an expert placement for from the recorded trace (0: skip planning)")
    p.add_argument("--sample-bytes", type=int, default=160, help="bytes of text sampled from the trained model")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out-dir", type=Path, default=Path("moekit-demo"),
                   help="where the checkpoint, trace and placement are written")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from moekit import MoEConfig
    from moekit.demo import ByteBatches, ByteMoELM, load_table, stdlib_corpus, train
    from moekit.trace import record

    for name in ("steps", "batch_size", "seq_len", "d_model", "layers", "heads", "experts", "top_k", "ffn"):
        if getattr(args, name) < 1:
            print(f"moekit demo: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        moe = MoEConfig(hidden_size=args.d_model, ffn_hidden_size=args.ffn, num_experts=args.experts,
                        top_k=args.top_k, aux_loss_coef=args.aux_loss_coef, backend=args.backend)
        model = ByteMoELM(moe, n_layers=args.layers, n_heads=args.heads, max_seq_len=args.seq_len)
    except ValueError as exc:
        print(f"moekit demo: {exc}", file=sys.stderr)
        return 2
    corpus = stdlib_corpus(int(args.corpus_mb * (1 << 20)))
    batches = ByteBatches(corpus, args.batch_size, args.seq_len, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"moekit demo: {n_params / 1e6:.2f}M parameters, {args.layers} MoE layers x {args.experts} experts "
          f"(top-{args.top_k}), corpus {len(corpus) / 2**20:.1f} MiB of Python stdlib source, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    bar = tqdm(total=args.steps, desc="training", unit="step", disable=args.no_progress, file=sys.stdout)
    every = max(args.steps // 10, 1)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if (step + 1) % every == 0 or step == 0:
            bar.write(f"step {step + 1:5d}  loss {loss:.4f}")

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
    print(json.dumps(summary))
    return 0


def _plan_step(trace_path: Path, gpus: int, out_dir: Path) -> dict:
    """Plan a placement on the recorded trace with the library calls behind `moekit plan`:
    contiguous, round-robin, greedy and ILP side by side; the ILP plan is written."""
    from moekit import planner

    trace = planner.read_trace(trace_path)
    print(f"\nplanning expert placement for {gpus} GPUs from the recorded trace "
          f"(same as: moekit plan --trace {trace_path} --gpus {gpus}):")
    try:
        results = planner.compare_placements(trace, num_gpus=gpus, time_limit=20.0)
    except ValueError as exc:  # e.g. experts that do not divide over the GPUs
        print(f"planning skipped: {exc}")
        return {"skipped": str(exc)}
    print(planner.format_table(results))
    best = results[-1]
    out = out_dir / "placement.json"
    planner.write_placement_json(out, best)
    print(f"placement ({best.method}) -> {out}")
    return {"method": best.method, "max_mean_load": round(best.max_mean_load, 4),
            "cross_gpu_frac": round(float(best.metrics.get("cross_gpu_frac", float("nan"))), 4),
            "placement": str(out)}
