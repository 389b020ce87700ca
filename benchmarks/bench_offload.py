"""Offloaded inference benchmarks (issue #10).

``--replay`` (target 1, :func:`replay_target`): replays the shared Qwen3 and Gemma routing
traces at 500/1000/2000/4000 MiB through every cache policy, the global LRU (the recording
device's cache) and global Belady; prints a table and ends with one JSON line.

    python benchmarks/bench_offload.py --replay [--traces ../shared/traces]

``--e2e`` (target 2, :func:`e2e_target`): an OLMoE-like model with random weights (fp32, 8 layers
x 64 experts, top-8; experts 1.7 GiB) saved with ``save_pretrained`` under ``--cache-dir``;
greedy decode with the page cache defeated, each variant in a fresh process, interleaved:
``moekit`` (load_offloaded as ``moekit run`` runs it on a CPU: default policy, overlapped
misses, no prefetch; ``--variants`` adds ``moekit-prefetch``, ``moekit-wholepath``,
``lru-overlap``), ``lru`` (per-layer LRU, on demand, no prefetch: the baseline) at the same expert budget, and ``accelerate``
(transformers ``from_pretrained(device_map="auto", max_memory={"cpu": budget + dense bytes},
offload_folder=...)``). Reports tokens/s, ratios, bytes from the device per token (/proc/self/io),
the I/O bound and the throughput model's prediction; ends with one JSON line.

    python benchmarks/bench_offload.py --e2e [--quick] [--budget-fraction 0.2] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from _machine import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

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


# --- token scheduling (ExpertFlow): FIFO vs scheduled batches, replayed ------------------
SCHED_SEGMENT, SCHED_PROMPT, SCHED_BATCH, SCHED_SEEDS = 12, 4, 4, 3
MIXTRAL_CATEGORIES = ("coding", "math", "reasoning", "writing")
MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2          # one Mixtral-8x7B expert in bf16 (w1, w2, w3)


def _sched_requests(ids_TLK, segment: int, seed: int) -> list:
    """Consecutive ``segment``-token slices of a token stream ``[T, L, K]`` as requests, in a random
    arrival order (``seed``): a server's arrival order says nothing about content."""
    import numpy as np

    R = ids_TLK.shape[0] // segment
    perm = np.random.default_rng(seed).permutation(R)
    return [ids_TLK[r * segment:(r + 1) * segment] for r in perm]


def _sched_work(reqs, prompt: int, batch: int, mode: str, E: int) -> tuple[list, list]:
    """(work for ``schedule.batch_accesses``, decode passes' batches) of one serving mode:

    * ``fifo`` / ``static``: request-level batches (``static``: :func:`schedule` on each request's
      prompt routes, what ``generate_many`` does with its own signature), each batch prefilled then
      decoded to its end before the next (one ``generate`` call per batch);
    * ``step-fifo`` / ``step-sched`` / ``step-oracle``: every request prefilled in FIFO batches, then
      per decode step one pass per batch, the batches formed anew each step (ExpertFlow's token
      scheduler): ``step-fifo`` the FIFO batches every step, ``step-sched`` :func:`schedule` on each
      request's previous token's routes (known: it was routed), ``step-oracle`` on the token's own
      routes (not knowable before it is routed: the most scheduling could save)."""
    from moekit.offload.schedule import fifo_batches, route_sets, schedule

    R, S = len(reqs), reqs[0].shape[0]
    work, dec_batches = [], []
    if mode in ("fifo", "static"):
        sig = [route_sets(r[:prompt], E) for r in reqs]
        bs = fifo_batches(R, batch) if mode == "fifo" else schedule(sig, batch)
        for b in bs:
            work.append(("prefill", [(r, t) for r in b for t in range(prompt)]))
            for t in range(prompt, S):
                work.append(("decode", [(r, t) for r in b]))
                dec_batches.append(b)
        return work, dec_batches
    for b in fifo_batches(R, batch):
        work.append(("prefill", [(r, t) for r in b for t in range(prompt)]))
    for t in range(prompt, S):
        if mode == "step-fifo":
            bs = fifo_batches(R, batch)
        else:
            src = t - 1 if mode == "step-sched" else t
            bs = schedule([route_sets(r[src:src + 1], E) for r in reqs], batch)
        for b in bs:
            work.append(("decode", [(r, t) for r in b]))
            dec_batches.append(b)
    return work, dec_batches


SCHED_MODES = ("fifo", "static", "step-fifo", "step-sched", "step-oracle")


def schedule_target(traces_dir: Path, budgets_mib=BUDGETS_MIB, segment: int = SCHED_SEGMENT,
                    prompt: int = SCHED_PROMPT, batch: int = SCHED_BATCH, seeds: int = SCHED_SEEDS,
                    policies=("predictive", "lru")) -> dict:
    """Token scheduling on the real traces: distinct experts per decode pass and layer, and the
    decode hit rate and MiB read per decode token at ``budgets_mib`` per mode (``_sched_work``),
    mean over ``seeds`` arrival orders. Qwen/Gemma: the one recorded sequence (prompt + 128 decode
    tokens) cut into ``segment``-token requests (first ``prompt`` tokens their prompt). Mixtral
    (distinct experts, and hit rates at 4 / 6 of 8 slots per layer): 8 random 32-token slices of
    each of the four MT-Bench category traces, mixed."""
    import numpy as np

    from moekit.offload.schedule import batch_accesses
    from moekit.offload.simulate import expert_bytes_of, load_trace, replay_accesses

    cases = []
    for name in ("qwen", "gemma"):
        path = traces_dir / f"{name}.route.csv"
        if not path.exists():
            print(f"skip {name}: {path} absent", file=sys.stderr)
            continue
        tr = load_trace(path)
        ids = np.stack(tr.topk_ids).transpose(1, 0, 2)
        budgets = {f"{m} MiB": m * MiB for m in budgets_mib}
        cases.append((name, [_sched_requests(ids, segment, s) for s in range(seeds)], prompt, tr.num_experts,
                      tr.top_k, expert_bytes_of(tr), budgets))
    mix = [traces_dir / "mixtral" / f"experts_{c}_mixtral.json" for c in MIXTRAL_CATEGORIES]
    if all(p.exists() for p in mix):
        streams = [np.stack(load_trace(p).topk_ids).transpose(1, 0, 2) for p in mix]
        L = streams[0].shape[1]
        per_seed = []
        for s in range(seeds):
            rng = np.random.default_rng(100 + s)
            reqs = []
            for st in streams:
                starts = rng.choice(st.shape[0] // 32, 8, replace=False)
                reqs += [st[a * 32:(a + 1) * 32] for a in starts]
            per_seed.append([reqs[i] for i in rng.permutation(len(reqs))])
        eb = [MIXTRAL_EXPERT_BYTES] * L
        cases.append(("mixtral-mixed", per_seed, 8, 8, 2, eb,
                      {f"{n}/8 slots": n * L * MIXTRAL_EXPERT_BYTES for n in (4, 6)}))
    out = {"segment_tokens": segment, "prompt_tokens": prompt, "batch": batch, "seeds": seeds, "traces": {}}
    for name, per_seed, P, E, K, eb, budgets in cases:
        res: dict = {}
        for mode in SCHED_MODES:
            distinct, rows = [], {f"{b}/{p}": [] for b in budgets for p in policies}
            for reqs in per_seed:
                work, _ = _sched_work(reqs, P, batch, mode, E)
                acc = batch_accesses(reqs, work)
                dec = [len(a.experts) for a in acc if a.phase == "decode"]
                distinct.append(float(np.mean(dec)))
                n_tok = sum(r.shape[0] - P for r in reqs)
                for bname, bb in budgets.items():
                    for p in policies:
                        r = replay_accesses(acc, bb, eb, E, K, p, decode_tokens=n_tok)
                        rows[f"{bname}/{p}"].append((r.hit_rate_decode, r.bytes_per_decode_token))
            res[mode] = {"distinct_experts_per_pass_layer": float(np.mean(distinct)),
                         **{k: {"hit_rate_decode": float(np.mean([h for h, _ in v])),
                                "mib_per_decode_token": float(np.mean([b for _, b in v])) / MiB}
                            for k, v in rows.items()}}
        out["traces"][name] = {"requests": len(per_seed[0]), "budgets": list(budgets), "modes": res}
        print(f"\n{name}: {len(per_seed[0])} requests of {per_seed[0][0].shape[0]} tokens ({P} prompt), batch "
              f"{batch}, mean of {seeds} arrival orders; decode hit % (MiB read per decode token)")
        head = f"{'mode':<12}{'distinct/pass/layer':>20}" + "".join(f"{k:>24}" for k in rows)
        print(head)
        print("-" * len(head))
        for mode, d in res.items():
            cells = "".join(f"{100 * d[k]['hit_rate_decode']:>15.1f} ({d[k]['mib_per_decode_token']:>5.1f})"
                            for k in rows)
            print(f"{mode:<12}{d['distinct_experts_per_pass_layer']:>20.2f}{cells}")
    return out


# --- target 2: end to end, disk -> RAM ----------------------------------------------------
# The model: OLMoE's layout (every layer MoE, 64 experts, top-8, no shared expert), scaled so
# that it runs in minutes on a 2-core box while its experts are several times the budget.
E2E_CONFIGS = {
    "full": dict(hidden_size=768, intermediate_size=384, num_hidden_layers=8, num_experts=64, num_experts_per_tok=8,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "quick": dict(hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_experts=16, num_experts_per_tok=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}
E2E_PROMPT_LEN = 16
VARIANTS = ("moekit", "lru", "accelerate")
MOEKIT_VARIANTS = ("moekit", "moekit-prefetch", "lru", "moekit-wholepath", "lru-overlap")  # optional:
# prefetch (router look-ahead) or whole-path prefetch on top of the defaults; lru-overlap is the baseline's
# policy with the runtime's overlapped miss reads (see _moekit_options)
EXTRA_VARIANTS = ("moekit-prefetch", "moekit-wholepath", "lru-overlap")


def machine_info() -> dict:
    import os
    import platform

    import torch

    cpu = cpu_model()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {}
    for pkg in ("transformers", "accelerate", "safetensors"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:
            versions[pkg] = None
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "mem_total_bytes": mem, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), **versions, "python": platform.python_version(),
            "platform": platform.platform()}


def _files_under(*dirs) -> list[Path]:
    out = []
    for d in dirs:
        d = Path(d)
        if d.is_file():
            out.append(d)
        elif d.is_dir():
            out += [p for p in d.rglob("*") if p.is_file()]
    return out


def drop_page_cache(*dirs, sync: bool = True) -> int:
    """``POSIX_FADV_DONTNEED`` on every file under ``dirs`` (after ``fsync`` unless ``sync`` is
    false): their pages leave the page cache, so the next read of them goes to the device.
    Returns the number of files."""
    import os

    n = 0
    for p in _files_under(*dirs):
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if sync:  # dirty pages (a file just written) would stay cached: write them back first
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


def proc_io() -> dict:
    """This process's /proc/self/io: ``read_bytes`` is what it caused to be fetched from the
    storage layer (page-cache hits and mmap'd pages already resident do not count)."""
    out = {}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            k, v = line.split(":")
            out[k.strip()] = int(v)
    except OSError:
        pass
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM; ``ru_maxrss`` would carry the parent's peak
    over ``execve``). File pages mapped and touched (accelerate's mmap'd reads) count too."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_e2e_model(cache_dir: Path, size: str, seed: int = 0) -> Path:
    """An OLMoE-like model with random weights (fp32), saved with ``save_pretrained`` into
    ``cache_dir/olmoe-<size>-<hash>`` (reused when already there)."""
    import hashlib

    import torch
    import transformers as T

    cfg_kw = dict(E2E_CONFIGS[size], max_position_embeddings=512, initializer_range=0.02, tie_word_embeddings=False,
                  norm_topk_prob=False, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    tag = hashlib.sha256(json.dumps([cfg_kw, seed, T.__version__], sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cache_dir) / f"olmoe-{size}-{tag}"
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return out
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(T.OlmoeConfig(**cfg_kw), dtype=torch.float32)
    with torch.no_grad():  # routers wider than the init so tokens spread over the experts
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)
    return out


def _prompt(size: str) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, E2E_CONFIGS[size]["vocab_size"], (E2E_PROMPT_LEN,), generator=g).tolist()


def _moekit_options(variant: str) -> dict:
    """load_offloaded keyword arguments of a variant: ``moekit`` = what ``moekit run`` does by
    default on a CPU (default policy, overlapped misses, no prefetch); ``moekit-prefetch`` /
    ``moekit-wholepath`` add look-ahead / whole-path prefetch; ``lru`` = the baseline, per-layer
    LRU on demand (each miss read before the layer computes, no prefetch); ``lru-overlap`` = LRU
    with overlapped misses."""
    if variant.startswith("lru"):
        return {"policy": "lru", "prefetch": False, "overlap_misses": variant == "lru-overlap"}
    opts: dict = {"prefetch": variant != "moekit"}
    if variant == "moekit-wholepath":
        opts["prefetch_predictor"] = "wholepath"
    return opts


def run_variant(variant: str, model_dir: Path, store_dir: Path, budget: int, accel_mem: int, offload_dir: Path,
                new_tokens: int, size: str) -> dict:
    """One variant in this process (the parent runs each in a fresh one): load, drop the page
    cache of every file involved, greedy-generate, measure."""
    import gc

    import torch

    prompt = _prompt(size)
    res: dict = {"variant": variant}
    if variant in MOEKIT_VARIANTS:
        from moekit.offload.runner import load_offloaded

        opts = _moekit_options(variant)
        res["options"] = {**opts, "page_cache": "drop", "verify": False}
        t0 = time.perf_counter()
        om = load_offloaded(model_dir, budget, store_dir=store_dir, page_cache="drop", verify=False, progress=False,
                            **opts)
        res["load_seconds"] = time.perf_counter() - t0
        if hasattr(om, "calibrate"):  # the throughput model's rates: probes before the run, not timed in it
            t0 = time.perf_counter()
            om.calibrate()
            res["calibrate_seconds"] = time.perf_counter() - t0
        drop_page_cache(model_dir, store_dir)
        log: list = []   # (phase, layer, experts) of every cache access: Belady's hindsight below
        access = om.cache.access

        def _logged(layer, experts):
            log.append((om.cache.phase, int(layer), sorted({int(e) for e in experts})))
            return access(layer, experts)
        om.cache.access = _logged
        io0 = proc_io()
        r = om.generate(prompt, max_new_tokens=new_tokens)
        io1 = proc_io()
        om.cache.access = access
        res["belady"] = _belady_replay(om, log, budget)
        res["prediction"] = _predict(om, r.metrics, om.cache.stats["decode"], len(r.generated_ids[0]))
        m = r.metrics
        res.update(tokens=r.generated_ids[0], metrics={k: v for k, v in m.items()},
                   seconds=m["seconds"], prefill_seconds=m["prefill_seconds"], decode_seconds=m["decode_seconds"],
                   read_seconds=m.get("read_seconds"), read_bandwidth=m.get("read_bandwidth"),
                   cache_bytes_read=m["bytes_read"], peak_expert_bytes=m["peak_expert_bytes"])
        st = om.cache.stats["decode"]
        res["decode_bytes_loaded"] = st.bytes_loaded + st.prefetch_bytes
        om.close()
    else:
        import transformers as T

        try:
            import accelerate  # noqa: F401
        except ImportError:
            return {"variant": variant, "skipped": "accelerate is not installed (pip install '.[bench]')"}
        offload_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, device_map="auto",
                                                       max_memory={"cpu": int(accel_mem)}, offload_folder=str(offload_dir))
        model.eval()
        res["load_seconds"] = time.perf_counter() - t0
        dm = dict(getattr(model, "hf_device_map", {}) or {})
        res["device_map"] = {str(k): str(v) for k, v in dm.items()}
        # what accelerate keeps where: parameters materialised in RAM vs on the meta device
        # (those are re-read from offload_folder on every forward of their module)
        in_ram = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type != "meta")
        on_disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "meta")
        res["accelerate_param_bytes_in_ram"], res["accelerate_param_bytes_offloaded"] = int(in_ram), int(on_disk)
        offloaded = [m for m in model.modules()
                     if getattr(getattr(m, "_hf_hook", None), "offload", False)]
        res["accelerate_offloaded_modules"] = len(offloaded)
        every_file = _files_under(offload_dir, model_dir)

        def _files_of(m) -> list:
            """The files accelerate reads this module's offloaded weights from."""
            wm = getattr(m._hf_hook, "weights_map", None)
            index = getattr(getattr(wm, "dataset", None), "index", None)
            prefix = getattr(wm, "prefix", "")
            if not isinstance(index, dict):
                return every_file
            fs = {v.get("safetensors_file") or str(Path(offload_dir) / f"{k}.dat")
                  for k, v in index.items() if k.startswith(prefix)}
            return sorted(fs) or every_file

        def _dropper(files):
            def _drop(module, args, output):   # the same page-cache defeat as moekit's "drop" mode
                drop_page_cache(*files, sync=False)
            return _drop
        n_files = set()
        for m in offloaded:
            fs = _files_of(m)
            n_files.update(map(str, fs))
            m.register_forward_hook(_dropper(fs))
        res["accelerate_offload_files"] = len(n_files)
        drop_page_cache(model_dir, offload_dir)
        x = torch.tensor([prompt])
        n_fwd = [0, None]

        def _count(module, args, output):
            n_fwd[0] += 1
            if n_fwd[0] == 1:
                n_fwd[1] = time.perf_counter()
        model.register_forward_hook(_count)
        io0 = proc_io()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(x),
                                 pad_token_id=0)
        t1 = time.perf_counter()
        io1 = proc_io()
        res.update(tokens=out[0, len(prompt):].tolist(), seconds=t1 - t0, prefill_seconds=n_fwd[1] - t0,
                   decode_seconds=t1 - n_fwd[1])
        del model
    gc.collect()
    n = len(res["tokens"])
    res["new_tokens"] = n
    res["tokens_per_s"] = n / res["seconds"]
    res["decode_tokens_per_s"] = (n - 1) / res["decode_seconds"] if n > 1 else None
    res["disk_read_bytes"] = io1.get("read_bytes", 0) - io0.get("read_bytes", 0)
    res["disk_read_bytes_per_token"] = res["disk_read_bytes"] / n
    res["peak_rss_bytes"] = peak_rss_bytes()
    return res


def _belady_replay(om, log: list, budget: int) -> dict:
    """The run's own accesses replayed through per-layer Belady (the offline optimum for these
    quotas): the fewest decode bytes any eviction policy could have read on this routing."""
    from moekit.offload.cache import ExpertCache

    idx = om.store.index
    future = [[ex for _, l, ex in log if l == layer] for layer in range(len(idx.layers))]
    try:
        c = ExpertCache(budget, idx.expert_bytes, idx.num_experts, idx.top_k, policy="belady", future=future)
    except Exception as exc:
        return {"error": repr(exc)}
    for phase, layer, ex in log:
        c.set_phase(phase)
        c.access(layer, ex)
    d = c.stats["decode"]
    return {"hit_rate_decode": d.hit_rate, "decode_bytes_loaded": d.bytes_loaded}


def _predict(om, metrics: dict, decode_stats, n_new: int) -> dict:
    """The throughput model (moekit.offload.throughput, another part of issue #10) on this run:
    rates from ``calibrate`` (probes after the run, not counted in it), the run's decode hit
    rate and prefetch reads per token; or the runner's own prediction when its metrics carry one."""
    if metrics.get("predicted_decode_tokens_per_s"):
        return {"source": "OffloadedModel.calibrate() before the run + metrics['predicted_decode_tokens_per_s']",
                "decode_tokens_per_s": metrics["predicted_decode_tokens_per_s"],
                "bound": metrics.get("predicted_bound"), "io_bound_tokens_per_s": metrics.get("predicted_io_bound_tokens_per_s"),
                "rates": metrics.get("calibrated_rates")}
    try:
        from moekit.offload import throughput as tp

        rates = tp.calibrate(om)
        steps = max(n_new - 1, 1)
        p = tp.predict_decode(tp.ModelShape.of_store(om.store.index), rates, hit_rate=metrics["hit_rate_decode"] or 0.0,
                              prefetch_reads=decode_stats.prefetched / steps,
                              overlap_misses=getattr(om.runtime, "overlap_misses", False))
        return {"source": "throughput.calibrate + predict_decode", "decode_tokens_per_s": p.tokens_per_s,
                "bound": p.bound, "io_bound_tokens_per_s": p.io_bound_tokens_per_s,
                "rates": {k: v for k, v in vars(rates).items()}}
    except Exception as exc:  # the module is absent or its hooks are not in the runner yet
        return {"error": f"{type(exc).__name__}: {exc}"}


def measure_disk_bandwidth(store_dir: Path, seconds: float = 3.0, seed: int = 0) -> dict:
    """Bytes/s reading whole expert blobs in random order from the store with the page cache
    dropped (moekit's ``drop`` mode, one reader): the device's rate for this access pattern."""
    import random

    from moekit.offload.store import DiskStore

    drop_page_cache(store_dir)
    with DiskStore(store_dir, page_cache="drop", verify=False) as st:
        keys = [(l, e) for l, ent in enumerate(st.index.layers) for e in range(ent.num_experts)]
        random.Random(seed).shuffle(keys)
        io0 = proc_io()
        t0 = time.perf_counter()
        n = 0
        for k in keys:
            st.read(*k)
            n += 1
            if time.perf_counter() - t0 > seconds:
                break
        dt = time.perf_counter() - t0
        io1 = proc_io()
        return {"blobs": n, "bytes": st.bytes_read, "seconds": dt, "bytes_per_s": st.bytes_read / dt,
                "disk_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
                "blob_bytes": st.index.layers[0].blob_bytes}


def _dense_bytes(model_dir: Path) -> int:
    """Bytes of every checkpoint tensor that is not a routed expert."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                if ".experts." not in k:
                    sl = h.get_slice(k)
                    n = 1
                    for s in sl.get_shape():
                        n *= s
                    total += n * 4
    return total


def e2e_target(size: str = "full", cache_dir: Path = Path("/tmp/moekit-bench-offload"), budget_fraction: float = 0.2,
               new_tokens: int = 32, rounds: int = 1, variants=VARIANTS) -> dict:
    """Target 2: every variant in a fresh process, interleaved over ``rounds`` (order rotated),
    the page cache of every file involved dropped before each and during each (moekit: its
    ``drop`` mode; accelerate: a forward hook on each offloaded module)."""
    import subprocess

    from moekit.offload.store import ensure_store, open_store

    model_dir = build_e2e_model(cache_dir, size)
    store_dir = ensure_store(model_dir, Path(str(model_dir) + ".moekit-experts"), progress=False)
    with open_store(store_dir, model_dir=model_dir, page_cache="keep", verify=False) as st:
        total, index = st.index.total_bytes, st.index
    min_budget = sum(index.top_k * b for b in index.expert_bytes)
    budget = max(int(total * budget_fraction), min_budget)
    dense = _dense_bytes(model_dir)
    accel_mem = budget + dense
    offload_dir = Path(str(model_dir) + ".accelerate-offload")
    cfg = E2E_CONFIGS[size]
    info = {"size": size, "model_dir": str(model_dir), "config": cfg, "dtype": "float32",
            "expert_bytes_total": total, "expert_blob_bytes": index.expert_bytes[0], "dense_bytes": dense,
            "budget_bytes": budget, "budget_fraction_of_experts": budget / total, "min_budget_bytes": min_budget,
            "accelerate_max_memory_cpu": accel_mem, "new_tokens": new_tokens, "prompt_tokens": E2E_PROMPT_LEN,
            "rounds": rounds}
    print(f"model {model_dir.name}: experts {total / MiB:.0f} MiB ({index.expert_bytes[0] / MiB:.2f} MiB each), "
          f"dense {dense / MiB:.0f} MiB, budget {budget / MiB:.0f} MiB ({budget / total:.2f} of the experts, "
          f"minimum {min_budget / MiB:.0f} MiB); accelerate max_memory cpu {accel_mem / MiB:.0f} MiB", flush=True)
    disk = measure_disk_bandwidth(store_dir, seconds=1.0 if size == "quick" else 4.0)
    print(f"disk: {disk['bytes_per_s'] / 1e6:.0f} MB/s reading {disk['blobs']} random expert blobs, page cache "
          f"dropped (read_bytes from the device {disk['disk_read_bytes'] / max(disk['bytes'], 1):.2f}x)", flush=True)
    runs: dict[str, list] = {v: [] for v in variants}
    for r in range(rounds):
        order = list(variants[r % len(variants):]) + list(variants[:r % len(variants)])
        for v in order:
            drop_page_cache(model_dir, store_dir, offload_dir)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--e2e-worker", v, "--model-dir", str(model_dir),
                   "--store-dir", str(store_dir), "--budget-bytes", str(budget), "--accel-mem", str(accel_mem),
                   "--offload-dir", str(offload_dir), "--new-tokens", str(new_tokens), "--size", size]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"variant {v} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs[v].append(res)
            if "skipped" in res:
                print(f"round {r} {v}: skipped ({res['skipped']})", flush=True)
            else:
                print(f"round {r} {v}: {res['tokens_per_s']:.3f} tok/s (decode {res['decode_tokens_per_s'] or 0:.3f}), "
                      f"{res['disk_read_bytes_per_token'] / MiB:.1f} MiB from disk per token, peak RSS "
                      f"{res['peak_rss_bytes'] / MiB:.0f} MiB", flush=True)
    return _e2e_summary(info, disk, runs, model_dir, budget)


def _e2e_summary(info: dict, disk: dict, runs: dict, model_dir: Path, budget: int) -> dict:
    import statistics

    ok = {v: [r for r in rs if "skipped" not in r] for v, rs in runs.items()}
    summ: dict = {}
    for v, rs in ok.items():
        if not rs:
            summ[v] = {"skipped": runs[v][0]["skipped"]} if runs[v] else {"skipped": "not run"}
            continue
        med = lambda k: statistics.median(r[k] for r in rs if r.get(k) is not None)  # noqa: E731
        s = {"tokens_per_s": med("tokens_per_s"), "decode_tokens_per_s": med("decode_tokens_per_s"),
             "disk_read_bytes_per_token": med("disk_read_bytes_per_token"), "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
             "load_seconds": med("load_seconds"), "per_round_tokens_per_s": [r["tokens_per_s"] for r in rs]}
        if v != "accelerate":
            ms = [r["metrics"] for r in rs]
            s["prefetch_metrics"] = {k: ms[0].get(k) for k in ("prefetch", "prefetch_predictor", "prefetched",
                                                              "prefetch_hits", "prefetch_dropped", "wholepath_guesses",
                                                              "prediction_recall_decode") if k in ms[0]}
            s.update(options=rs[0]["options"], hit_rate_decode=statistics.median(m["hit_rate_decode"] for m in ms),
                     bytes_per_decode_token=statistics.median(m["bytes_per_decode_token"] for m in ms),
                     bytes_read_per_token=statistics.median(m["bytes_read_per_token"] for m in ms),
                     read_bandwidth=statistics.median(m["read_bandwidth"] for m in ms if m["read_bandwidth"]),
                     read_seconds_share_of_decode=statistics.median(
                         rs[i]["metrics"]["read_seconds"] / rs[i]["seconds"] for i in range(len(rs))),
                     peak_expert_bytes=max(m["peak_expert_bytes"] for m in ms))
            # a decode step's measured terms beside the throughput model's (ms, medians over rounds)
            terms = [f"decode_{k}_seconds" for k in ("step", "demand_read", "expert_compute", "prefetch_wait", "other")]
            terms += [f"predicted_{k}_seconds" for k in ("step", "dense", "expert_compute",
                                                         "demand_read", "prefetch_read")]
            s["decode_step_breakdown_ms"] = {k: 1000 * statistics.median(m[k] for m in ms)
                                             for k in terms if all(m.get(k) is not None for m in ms)}
            # the I/O bound: the measured device rate over the bytes a decode token needs
            s["io_bound_decode_tokens_per_s"] = disk["bytes_per_s"] / s["bytes_per_decode_token"] \
                if s["bytes_per_decode_token"] else None
            s["fraction_of_io_bound"] = s["decode_tokens_per_s"] / s["io_bound_decode_tokens_per_s"] \
                if s["io_bound_decode_tokens_per_s"] else None
        else:
            r0 = rs[0]
            s.update({k: r0[k] for k in ("accelerate_param_bytes_in_ram", "accelerate_param_bytes_offloaded",
                                         "accelerate_offloaded_modules", "device_map")})
            s["io_bound_decode_tokens_per_s"] = disk["bytes_per_s"] / s["disk_read_bytes_per_token"] \
                if s["disk_read_bytes_per_token"] else None
        summ[v] = s
    toks = {v: rs[0]["tokens"] for v, rs in ok.items() if rs}
    all_tok = [r["tokens"] for rs in ok.values() for r in rs]
    same = all(t == all_tok[0] for t in all_tok) if all_tok else None
    ratios = {}
    if "moekit" in summ and "tokens_per_s" in summ["moekit"]:
        mk = summ["moekit"]
        for other in ("lru", "accelerate") + EXTRA_VARIANTS:
            if "tokens_per_s" in summ.get(other, {}):
                ratios[f"moekit_over_{other}"] = mk["tokens_per_s"] / summ[other]["tokens_per_s"]
                ratios[f"moekit_over_{other}_decode"] = mk["decode_tokens_per_s"] / summ[other]["decode_tokens_per_s"]
    for v in EXTRA_VARIANTS:
        if "tokens_per_s" in summ.get(v, {}) and "tokens_per_s" in summ.get("lru", {}):
            ratios[f"{v}_over_lru"] = summ[v]["tokens_per_s"] / summ["lru"]["tokens_per_s"]
            ratios[f"{v}_over_lru_decode"] = summ[v]["decode_tokens_per_s"] / summ["lru"]["decode_tokens_per_s"]
    pred, how = (None, "moekit variant not run")
    if ok.get("moekit"):
        ps = [r["prediction"] for r in ok["moekit"]]
        if all("decode_tokens_per_s" in p for p in ps):
            pred = {"decode_tokens_per_s": statistics.median(p["decode_tokens_per_s"] for p in ps),
                    "per_round": [p["decode_tokens_per_s"] for p in ps], "bound": ps[0].get("bound")}
            how = ps[0]["source"]
            pred["over_measured_decode"] = pred["decode_tokens_per_s"] / summ["moekit"]["decode_tokens_per_s"]
        else:
            how = "; ".join(sorted({p.get("error", "") for p in ps}))
    for v in MOEKIT_VARIANTS:
        if ok.get(v):
            bl = [r["belady"] for r in ok[v] if "hit_rate_decode" in r.get("belady", {})]
            if bl:
                summ[v]["belady_hit_rate_decode_same_routing"] = statistics.median(b["hit_rate_decode"] for b in bl)
    checks = {
        "same_tokens": same,
        "moekit_ge_1.5x_lru": ratios.get("moekit_over_lru", 0) >= 1.5 if "moekit_over_lru" in ratios else None,
        "moekit_ge_3x_accelerate": ratios.get("moekit_over_accelerate", 0) >= 3 if "moekit_over_accelerate" in ratios else None,
        "moekit_ge_70pct_io_bound": (summ["moekit"].get("fraction_of_io_bound") or 0) >= 0.7 if "moekit" in ok and ok["moekit"] else None,
    }
    if pred:
        checks["prediction_within_10pct"] = abs(pred["over_measured_decode"] - 1) <= 0.10
    print(f"\n{'variant':<12}{'tok/s':>9}{'decode tok/s':>14}{'MiB disk/tok':>14}{'hit(dec)':>10}{'peak RSS MiB':>14}")
    for v, s in summ.items():
        if "skipped" in s:
            print(f"{v:<12} skipped: {s['skipped']}")
            continue
        hr = s.get("hit_rate_decode")
        print(f"{v:<12}{s['tokens_per_s']:>9.3f}{s['decode_tokens_per_s']:>14.3f}"
              f"{s['disk_read_bytes_per_token'] / MiB:>14.1f}{'' if hr is None else f'{hr:.3f}':>10}"
              f"{s['peak_rss_bytes'] / MiB:>14.0f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if "moekit" in summ and summ["moekit"].get("fraction_of_io_bound") is not None:
        print(f"moekit I/O bound {summ['moekit']['io_bound_decode_tokens_per_s']:.3f} decode tok/s; reached "
              f"{summ['moekit']['fraction_of_io_bound']:.0%}")
    print(f"same tokens in every variant and round: {same}; throughput model: {pred if pred else how}")
    print("checks:", checks)
    return {"info": info, "disk": disk, "variants": summ, "ratios": ratios, "tokens": toks,
            "throughput_model": {"prediction": pred, "how": how}, "checks": checks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replay", action="store_true", help="target 1: trace replay at 500/1000/2000/4000 MiB")
    ap.add_argument("--traces", type=Path, default=REPO.parent / "shared" / "traces",
                    help="folder holding qwen.route.csv and gemma.route.csv (default: ../shared/traces)")
    ap.add_argument("--e2e", action="store_true", help="target 2: end to end disk -> RAM, moekit vs LRU vs accelerate")
    ap.add_argument("--schedule", action="store_true",
                    help="token scheduling: FIFO vs scheduled batches replayed on the traces (distinct experts, hits)")
    ap.add_argument("--batch", type=int, default=SCHED_BATCH, help="with --schedule: requests per batch")
    ap.add_argument("--quick", action="store_true", help="with --e2e: a tiny model, a few tokens (smoke test)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/moekit-bench-offload"),
                    help="with --e2e: where the saved model, its store and accelerate's offload folder are kept")
    ap.add_argument("--budget-fraction", type=float, default=0.2, help="with --e2e: budget / all experts' bytes")
    ap.add_argument("--new-tokens", type=int, default=None, help="with --e2e: tokens to generate (default 32; quick 4)")
    ap.add_argument("--rounds", type=int, default=None, help="with --e2e: interleaved rounds (default 2; quick 1)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="with --e2e: comma-separated subset of "
                    + ",".join(VARIANTS + EXTRA_VARIANTS))
    # internal: one variant in a fresh process (the --e2e parent starts these)
    ap.add_argument("--e2e-worker", choices=VARIANTS + EXTRA_VARIANTS, help=argparse.SUPPRESS)
    for a, t in (("--model-dir", Path), ("--store-dir", Path), ("--offload-dir", Path), ("--budget-bytes", int),
                 ("--accel-mem", int), ("--size", str)):
        ap.add_argument(a, type=t, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.e2e_worker:
        res = run_variant(args.e2e_worker, args.model_dir, args.store_dir, args.budget_bytes, args.accel_mem,
                          args.offload_dir, args.new_tokens, args.size)
        print(json.dumps(res))
        return 0
    if args.replay + args.e2e + args.schedule != 1:
        ap.error("choose one mode: --replay, --e2e or --schedule")
    t0 = time.time()
    if args.schedule:
        res = schedule_target(args.traces, batch=args.batch)
        res["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"bench": "offload_schedule", **res}))
        return 0
    if args.e2e:

        print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
        mach = machine_info()
        print("machine:", mach, flush=True)
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        if not set(variants) <= set(VARIANTS + MOEKIT_VARIANTS):
            ap.error(f"--variants must be a subset of {','.join(VARIANTS + EXTRA_VARIANTS)}, got {args.variants}")
        res = e2e_target("quick" if args.quick else "full", args.cache_dir, args.budget_fraction,
                         args.new_tokens or (4 if args.quick else 32), args.rounds or (1 if args.quick else 2),
                         variants)
        res["seconds"] = round(time.time() - t0, 1)
        print(json.dumps({"bench": "offload_e2e", "command": " ".join(sys.argv), "machine": mach, **res}))
        return 0
    res = replay_target(args.traces)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps({"bench": "offload_replay", **res}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
