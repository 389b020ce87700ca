"""`moekit run`: greedy generation with an HF MoE model whose experts stay in an expert store.

Thin front-end over :func:`moekit.offload.runner.load_offloaded`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  moekit run --model ./olmoe --budget 2GiB --prompt "The capital of France is"
  moekit run --model ./qwen-moe --budget auto --prompt-ids 5,17,42 --max-new-tokens 16 --json
  moekit run --model ./mixtral --budget 500MiB --page-cache drop --policy lru --prompt "Hi"
  moekit run --model ./olmoe --budget 2GiB --prompts-file prompts.txt --batch-size 4 --schedule similar

Several prompts (--prompts-file: one text prompt per line; --prompt-ids-file: one line of
comma-separated token ids per prompt) run batch-size at a time, left-padded; --schedule similar
groups prompts whose predicted routes (each MoE layer's router on the prompt's embeddings) are
alike, so each batch needs fewer distinct experts; fifo keeps the file's order.

The first run converts the checkpoint's experts into an expert store (one blob per expert,
with a progress bar) in MODEL_DIR.moekit-experts next to the model, or in --store DIR; later
runs reuse it. The budget counts expert weights in the fast tier (RAM on CPU, GPU memory with
--device cuda); the dense weights (attention, embeddings, routers, shared experts) and the KV
cache come on top. A budget below one token's working set (sum over MoE layers of top_k x the
bytes of one expert) is refused with that minimum.

Metrics: tokens/s, decode tokens/s, hit rate (prefill / decode: fraction of expert requests
served from the fast tier), bytes read from the store per generated token, the I/O bound
(decode tokens/s if reading were all the work, at the measured read bandwidth), and the peak
bytes of expert weights held (measured) against the budget.
"""

POLICY_CHOICES = ("predictive", "lru", "lfu", "static")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_parser(subparsers, name: str = "run", help_text: str = "generate with an MoE model whose experts are offloaded"):
    p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model directory (config.json + safetensors) of a Mixtral, Qwen2/3-MoE, "
                        "OLMoE or DeepSeek-V3 family model")
    p.add_argument("--budget", default="auto", metavar="SIZE",
                   help="bytes of expert weights the fast tier may hold, e.g. 2GiB, 500MiB, 1.5GB, or 'auto': "
                        "80%% of the free memory after the dense weights (the OS's on CPU, NVML's on a GPU, "
                        "torch's when NVML is missing), at most all experts (default: auto)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model computes and the expert cache lives (default: cpu)")
    p.add_argument("--policy", choices=POLICY_CHOICES, default="predictive",
                   help="cache eviction policy within each layer's slots: predictive (decayed frequency + "
                        "predictions), lru, lfu, static (first experts pinned) (default: predictive)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (needs the model's tokenizer in --model)")
    src.add_argument("--prompt-ids", metavar="IDS",
                     help="prompt as comma-separated token ids, e.g. 5,17,42 (no tokenizer needed)")
    src.add_argument("--prompts-file", metavar="FILE",
                     help="several prompts, one text prompt per non-empty line (needs the model's tokenizer)")
    src.add_argument("--prompt-ids-file", metavar="FILE",
                     help="several prompts, one line of comma-separated token ids each (no tokenizer needed)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="with --prompts-file / --prompt-ids-file: prompts generated together per batch (default: 4)")
    p.add_argument("--schedule", choices=["similar", "fifo"], default="similar",
                   help="with several prompts: 'similar' batches prompts whose predicted routes are alike (fewer "
                        "distinct experts per batch), 'fifo' keeps the file's order (default: similar)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="tokens to generate, greedily (default: 32)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="expert store directory (default: MODEL_DIR.moekit-experts next to the model); "
                        "created from the checkpoint when it has no index yet")
    p.add_argument("--tier", choices=["disk", "ram"], default="disk",
                   help="slow tier: 'disk' reads each missed expert from the store; 'ram' holds every expert "
                        "in host memory (pinned with CUDA) and copies misses to the device (default: disk)")
    p.add_argument("--page-cache", choices=["keep", "drop", "direct"], default="keep",
                   help="disk reads: 'keep' lets the OS cache them, 'drop' evicts each blob from the page "
                        "cache after reading it (honest disk benchmarks), 'direct' uses O_DIRECT (default: keep)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the crc32 check of each expert blob read from disk (faster; corruption then "
                        "goes unnoticed)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=None,
                   help="predict the next layers' experts (their routers on the current hidden state) and read "
                        "them on a background thread while this layer computes (default: on with --device cuda; "
                        "off on CPU, where the guessed reads cost more than they hid on a 2-core disk-tier "
                        "benchmark: see benchmarks/RESULTS.md)")
    p.add_argument("--overlap-misses", action=argparse.BooleanOptionalAction, default=True,
                   help="read a layer's missed experts on a reader thread while its resident experts compute, "
                        "computing each miss as it lands; --no-overlap-misses reads each miss before the layer "
                        "computes (plain on-demand loading) (default: on)")
    p.add_argument("--prefetch-predictor", choices=["lookahead", "wholepath"], default=None,
                   help="what guesses the next layers' experts: 'lookahead' (their routers on the current hidden "
                        "state) or 'wholepath' (the token's experts so far matched against the paths recorded from "
                        "the prompt and earlier tokens, ExpertFlow-style); turns --prefetch on (default: lookahead)")
    p.add_argument("--horizon", default="auto", metavar="H",
                   help="prefetch look-ahead in MoE layers, or 'auto': from the measured read and compute times "
                        "(default: auto)")
    p.add_argument("--miss-model", choices=["off", "auto"], default="off",
                   help="with --device cuda --tier ram: per miss, copy the expert to the GPU or compute it on the "
                        "CPU where it lives, whichever a calibrated cost model says is cheaper (default: off)")
    p.add_argument("--no-predict", action="store_true",
                   help="skip the calibration probes (a few expert reads and timed forwards) behind the "
                        "throughput model's predicted tokens/s")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: generated_ids (the new tokens), the metrics, the budget used")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is also off when stderr is not a terminal)")
    return p


def _err(msg: str) -> int:
    print(f"moekit run: error: {msg}", file=sys.stderr)
    return 2


def _size(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def run(args) -> int:
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        return _err(f"--model {args.model}: no config.json there (expects a Hugging Face model directory)")
    if args.max_new_tokens < 1:
        return _err(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    budget = args.budget.strip()
    if budget.lower() != "auto":
        from moekit.offload.simulate import parse_bytes

        try:
            budget = parse_bytes(budget)
        except ValueError as exc:
            return _err(f"--budget: {exc}")
    ids = None
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(" ", "").split(",") if t != ""]
        except ValueError:
            return _err(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
        if not ids or min(ids) < 0:
            return _err(f"--prompt-ids must be non-negative token ids, got {args.prompt_ids!r}")
    many = None
    if args.prompt_ids_file is not None or args.prompts_file is not None:
        if args.batch_size < 1:
            return _err(f"--batch-size must be >= 1, got {args.batch_size}")
        path = Path(args.prompt_ids_file or args.prompts_file)
        try:
            lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        except OSError as exc:
            return _err(f"cannot read {path}: {exc.strerror or exc}")
        if not lines:
            return _err(f"{path}: no prompts (one per non-empty line)")
        many = lines
        if args.prompt_ids_file is not None:
            many = []
            for i, ln in enumerate(lines, 1):
                try:
                    row = [int(t) for t in ln.replace(" ", "").split(",") if t != ""]
                except ValueError:
                    return _err(f"--prompt-ids-file {path}, prompt {i}: not comma-separated integers: {ln[:60]!r}")
                if not row or min(row) < 0:
                    return _err(f"--prompt-ids-file {path}, prompt {i}: needs non-negative token ids")
                many.append(row)
    horizon = args.horizon.strip().lower()
    if horizon != "auto":
        try:
            horizon = int(horizon)
            if horizon < 1:
                raise ValueError
        except ValueError:
            return _err(f"--horizon must be a positive integer or 'auto', got {args.horizon!r}")
    if args.miss_model != "off" and (args.device != "cuda" or args.tier != "ram"):
        return _err("--miss-model needs --device cuda --tier ram (on a CPU-only machine both tiers are host memory)")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return _err("--device cuda: torch sees no CUDA device")
    tokenizer = None
    if args.prompt is not None or args.prompts_file is not None:
        flag = "--prompt" if args.prompt is not None else "--prompts-file"
        alt = "--prompt-ids" if args.prompt is not None else "--prompt-ids-file"
        if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
            return _err(f"{flag} needs a tokenizer in {model_dir} (none of {', '.join(TOKENIZER_FILES)}); "
                        f"give token ids with {alt} instead")
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except Exception as exc:  # no tokenizer files, or one transformers cannot load
            return _err(f"{flag} needs a tokenizer in {model_dir} ({type(exc).__name__}: {exc}); "
                        f"give token ids with {alt} instead")
        if args.prompt is not None:
            ids = tokenizer(args.prompt)["input_ids"]
            if not ids:
                return _err("--prompt encodes to no tokens")
        else:
            texts = many
            many = [tokenizer(t)["input_ids"] for t in texts]
            if any(not m for m in many):
                return _err(f"--prompts-file: prompt {next(i for i, m in enumerate(many, 1) if not m)} encodes to no tokens")

    from moekit.offload.runner import auto_budget, load_offloaded  # noqa: F401
    from moekit.offload.store import StoreError

    progress = not args.quiet and sys.stderr.isatty()
    if not progress:  # transformers' own "Loading weights" bar too (this process is ours)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.prefetch is None:
        args.prefetch = args.device == "cuda" or args.prefetch_predictor is not None
    elif not args.prefetch and args.prefetch_predictor is not None:
        return _err("--prefetch-predictor needs prefetching; drop --no-prefetch")
    try:
        om = load_offloaded(model_dir, budget, store_dir=args.store, policy=args.policy, device=args.device,
                            tier=args.tier, page_cache=args.page_cache, verify=not args.no_verify,
                            progress=progress, prefetch=args.prefetch, horizon=horizon,
                            prefetch_predictor=args.prefetch_predictor or "lookahead",
                            miss_model=None if args.miss_model == "off" else args.miss_model,
                            overlap_misses=args.overlap_misses)
        if many is None and not args.no_predict and om.rates is None:
            om.calibrate()
    except StoreError as exc:
        return _err(str(exc))
    except ValueError as exc:
        msg = str(exc)
        if "below" in msg and "minimum" in msg:
            msg = f"--budget {args.budget}: {msg}"
        return _err(msg)
    try:
        try:
            if many is not None:
                return _run_many(args, om, many, tokenizer)
            result = om.generate(torch.tensor([ids], dtype=torch.long), max_new_tokens=args.max_new_tokens)
        except (ValueError, StoreError) as exc:
            return _err(str(exc))
    finally:
        om.close()
    m = result.metrics
    new_ids = result.generated_ids[0]
    if args.json:
        out = {"generated_ids": new_ids, "prompt_ids": ids, "model": str(model_dir), "store": str(om.store_dir),
               "device": args.device, "tier": args.tier, **m}
        if tokenizer is not None:
            out["text"] = tokenizer.decode(new_ids, skip_special_tokens=True)
        print(json.dumps(out))
        return 0
    if tokenizer is not None:
        print(args.prompt + tokenizer.decode(new_ids, skip_special_tokens=True))
    else:
        print("generated ids: " + ",".join(str(i) for i in new_ids))
    print(f"tokens/s {_num(m['tokens_per_s'])} (decode {_num(m['decode_tokens_per_s'])}, "
          f"I/O bound {_num(m['io_bound_decode_tokens_per_s'])}), {m['new_tokens']} new tokens in {m['seconds']:.2f} s "
          f"(prefill {m['prefill_seconds']:.2f} s, {m['prompt_tokens']} prompt tokens)")
    if m.get("predicted_decode_tokens_per_s") is not None:
        print(f"throughput model: predicted decode tokens/s {_num(m['predicted_decode_tokens_per_s'])} "
              f"(measured {_num(m['decode_tokens_per_s'])}), {m['predicted_bound']}-bound (I/O bound "
              f"{_num(m['predicted_io_bound_tokens_per_s'])}, compute bound "
              f"{_num(m['predicted_compute_bound_tokens_per_s'])})")
    if m.get("prefetch"):
        print(f"prefetch ({m['prefetch_predictor']}): look-ahead {m['prefetch_horizon']} layers, prediction recall "
              f"{_pct(m['prediction_recall'])} (decode {_pct(m['prediction_recall_decode'])}), "
              f"{m['prefetched']} experts read ahead, {m['prefetch_hits']} used, {m['prefetch_dropped']} dropped")
    print(f"hit rate {_pct(m['hit_rate'])} (prefill {_pct(m['hit_rate_prefill'])}, decode {_pct(m['hit_rate_decode'])}), "
          f"policy {m['policy']}")
    print(f"read {_size(m['bytes_read'])} from the store ({m['page_cache']}): {_size(m['bytes_read_per_token'])} per "
          f"token, {_size(m['bytes_per_decode_token'])} per decode token, "
          f"{_size(m['read_bandwidth'])}/s while reading" if m["read_bandwidth"] else
          f"read {_size(m['bytes_read'])} from the store: {_size(m['bytes_read_per_token'])} per token")
    print(f"expert weights held: peak {_size(m['peak_expert_bytes'])} of a {_size(m['budget_bytes'])} budget "
          f"(minimum {_size(m['min_budget_bytes'])}; all experts {_size(m['expert_bytes_total'])})")
    return 0


def _run_many(args, om, prompts: list, tokenizer) -> int:
    """Several prompts through :meth:`OffloadedModel.generate_many` (batched, scheduled or FIFO)."""
    r = om.generate_many(prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                         schedule=args.schedule)
    m = r.metrics
    if args.json:
        reqs = [{"prompt_ids": p, "generated_ids": g} for p, g in zip(prompts, r.generated_ids)]
        if tokenizer is not None:
            for q in reqs:
                q["text"] = tokenizer.decode(q["generated_ids"], skip_special_tokens=True)
        print(json.dumps({"requests": reqs, "batches": r.batches, "model": str(om.model_dir),
                          "store": str(om.store_dir), "device": args.device, "tier": args.tier, **m}))
        return 0
    for i, (p, g) in enumerate(zip(prompts, r.generated_ids)):
        shown = tokenizer.decode(g, skip_special_tokens=True) if tokenizer is not None else ",".join(map(str, g))
        print(f"[{i}] {shown}")
    print(f"{m['num_requests']} prompts in {m['num_batches']} batches of up to {m['batch_size']} ({m['schedule']}): "
          f"{' '.join('[' + ','.join(map(str, b)) + ']' for b in r.batches)}")
    pred = m["predicted_distinct_experts"]
    print(f"tokens/s {_num(m['tokens_per_s'])}, {m['new_tokens']} new tokens in {m['seconds']:.2f} s; distinct experts "
          f"per decode step and layer {_num(m['distinct_experts_per_decode_pass'])}"
          + (f" (predicted per batch {_num(pred)})" if pred is not None else ""))
    print(f"hit rate prefill {_pct(m['hit_rate_prefill'])}, decode {_pct(m['hit_rate_decode'])}, policy {m['policy']}; "
          f"read {_size(m['bytes_read'])}, {_size(m['bytes_per_decode_token'])} per decode token; expert weights "
          f"held: peak {_size(m['peak_expert_bytes'])} of a {_size(m['budget_bytes'])} budget")
    return 0
