"""Look-ahead prefetch and the throughput model, end to end on a saved random-weight OLMoE-like model.

For each budget, offloaded greedy generation from disk with the page cache dropped after every
read (``page_cache="drop"``), prefetch off and on, each after a calibration of the rates
(:func:`moekit.offload.throughput.calibrate`); reports measured decode tokens/s, the throughput
model's prediction from the calibrated rates and the run's measured hit rate / prefetch reads,
its error, the bound, and the look-ahead predictor's recall. One JSON line at the end.

    .venv/bin/python benchmarks/bench_prefetch.py [--dir /tmp/moekit-prefetch] [--new 24]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

PROMPT = [5, 17, 42, 3, 9, 77, 31, 64]


def make_model(path: Path, hidden: int, ffn: int, experts: int, layers: int, seed: int = 0) -> Path:
    import transformers as T

    if (path / "config.json").exists():
        return path
    cfg = T.OlmoeConfig(vocab_size=101, hidden_size=hidden, num_attention_heads=8, num_key_value_heads=8,
                        max_position_embeddings=256, initializer_range=0.02, tie_word_embeddings=False,
                        intermediate_size=ffn, num_experts=experts, num_experts_per_tok=2, num_hidden_layers=layers,
                        norm_topk_prob=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return path


def drop_page_cache(store: Path) -> None:
    """Evict the store's files from the page cache (written pages are flushed first)."""
    import os

    for f in store.glob("layer_*.bin"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/moekit-prefetch")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new", type=int, default=24, help="new tokens per run")
    ap.add_argument("--budgets", default="1,2.5,5", help="budgets as multiples of the minimum")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from moekit.offload.runner import load_offloaded

    root = Path(args.dir)
    d = make_model(root / "model", args.hidden, args.ffn, args.experts, args.layers)
    store = root / "store"
    with load_offloaded(d, "100GiB", store_dir=store, progress=False) as om:
        lo, total = om.min_budget_bytes, om.store.index.total_bytes
    rows = []
    ref = None
    for mult in [float(x) for x in args.budgets.split(",")]:
        budget = int(lo * mult)
        for prefetch in (False, True):
            drop_page_cache(store)
            with load_offloaded(d, budget, store_dir=store, page_cache="drop", verify=False, prefetch=prefetch,
                                progress=False) as om:
                om.calibrate()
                drop_page_cache(store)
                r = om.generate(PROMPT, max_new_tokens=args.new)
            m = r.metrics
            if ref is None:
                ref = r.generated_ids[0]
            pred, meas = m["predicted_decode_tokens_per_s"], m["decode_tokens_per_s"]
            row = {"budget_mib": budget / 2**20, "budget_x_min": mult, "prefetch": prefetch,
                   "decode_tokens_per_s": meas, "predicted_decode_tokens_per_s": pred,
                   "model_error": pred / meas - 1.0, "bound": m["predicted_bound"],
                   "hit_rate_decode": m["hit_rate_decode"], "recall_decode": m.get("prediction_recall_decode"),
                   "horizon": m.get("prefetch_horizon"), "prefetched": m["prefetched"],
                   "prefetch_hits": m["prefetch_hits"], "prefetch_dropped": m["prefetch_dropped"],
                   "bytes_per_decode_token_mib": (m["bytes_per_decode_token"] or 0) / 2**20,
                   "peak_mib": m["peak_expert_bytes"] / 2**20, "within_budget": m["peak_expert_bytes"] <= budget,
                   "same_tokens": r.generated_ids[0] == ref,
                   "read_bandwidth_mb_s": om.rates.read_bandwidth / 1e6,
                   "calibrated": {k: v for k, v in vars(om.rates).items()},
                   "demand_load_s": m["demand_load_seconds"], "expert_compute_s": m["expert_compute_seconds"],
                   "prefetch_wait_s": m["prefetch_wait_seconds"], "decode_s": m["decode_seconds"],
                   "run_read_bandwidth_mb_s": (m["read_bandwidth"] or 0) / 1e6}
            rows.append(row)
            print(f"{budget / 2**20:7.1f} MiB  prefetch={'on ' if prefetch else 'off'}  decode {meas:6.2f} tok/s  "
                  f"model {pred:6.2f} ({100 * row['model_error']:+5.1f}%, {row['bound']})  hit {m['hit_rate_decode']:.3f}  "
                  f"recall {row['recall_decode'] if row['recall_decode'] is not None else '-'}  h {row['horizon']}  "
                  f"peak {row['peak_mib']:.1f} MiB  same tokens {row['same_tokens']}", flush=True)
    print(json.dumps({"bench": "prefetch", "machine": platform.node(), "cpu_threads": args.threads,
                      "date": time.strftime("%Y-%m-%d"), "model": vars(args), "min_budget_mib": lo / 2**20,
                      "expert_total_mib": total / 2**20, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
