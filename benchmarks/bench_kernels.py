#!/usr/bin/env python
"""Triton grouped expert MLP (``moekit.kernels.moe_mlp``) against its peers and the dense ceiling.

Variants, all computing ``y[t] = sum_k w[t,k] * down_e(silu(gate_e(x[t])) * up_e(x[t]))`` on the
same bf16 weights, routing and input (outputs checked against the loop before timing):

- ``triton``      ``moekit.kernels.moe_mlp`` (align + gathered grouped GEMM with fused SwiGLU +
                  grouped GEMM with the routing weight in the epilogue + deterministic combine;
                  its own backward).
- ``grouped_mm``  ``torch.nn.functional.grouped_mm`` over expert-sorted rows (torch sort/gather,
                  two grouped GEMMs, SwiGLU, weighted ``index_add_`` combine; autograd backward).
- ``loop``        a per-expert loop (``moekit.kernels.moe_mlp_ref``: one matmul pair per expert).
- ``dense``       the ceiling: one dense cuBLAS chain with the same FLOPs,
                  ``[N, D] @ [D, 2F] -> SwiGLU -> @ [F, D]`` with N = T*K rows.

FLOPs counted (for every variant alike): forward ``2*N*D*2F + 2*N*F*D``; forward+backward
3x that. TFLOP/s = FLOPs / median time. Modes: ``fwd`` (no grad) and ``fwdbwd`` (forward with
grad + backward of a fixed output gradient; grads for x, the routing weights and both weight
stacks). Routing: softmax top-k of random logits (about uniform load).

Targets (issue #3, for a later session with a GPU): at T >= 4096 triton >= 85% of dense and
>= grouped_mm; at T = 128 triton >= 1.5x the loop. The script reports each ratio and whether
the target holds.

Usage::

    python benchmarks/bench_kernels.py                     # all shapes, T in {128, 4096, 16384}, needs CUDA
    python benchmarks/bench_kernels.py --shapes mixtral --tokens 4096
    python benchmarks/bench_kernels.py --cpu-smoke         # tiny shapes under TRITON_INTERPRET=1 (no GPU)

Without CUDA (and without ``--cpu-smoke``) it prints a message and exits 0. The last line
printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

SHAPES = {  # name: (D, F, E, K)
    "mixtral": (4096, 14336, 8, 2),
    "qwen2_moe": (2048, 1408, 60, 4),
    "deepseek_v3": (7168, 2048, 256, 8),
}
SMOKE_SHAPES = {"smoke_a": (64, 48, 4, 2), "smoke_b": (96, 32, 6, 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=None,
                   help=f"comma list from {', '.join(SHAPES)} "
                        f"(default: all; with --cpu-smoke: {', '.join(SMOKE_SHAPES)})")
    p.add_argument("--tokens", default=None, help="comma list of T (default 128,4096,16384; with --cpu-smoke 8,32)")
    p.add_argument("--modes", default="fwd,fwdbwd", help="comma list from fwd, fwdbwd")
    p.add_argument("--variants", default="triton,grouped_mm,loop,dense")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--skip-loop-above", type=int, default=1 << 30,
                   help="skip the loop baseline for T above this (it is slow at large T)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1: proves the script runs, numbers mean nothing")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    sys.path.append(str(Path(__file__).resolve().parents[1]))  # checkout, no install: last, so
    # its kernels/ folder cannot shadow the kernels distribution that transformers imports
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}")
    if not args.cpu_smoke and not torch.cuda.is_available():
        msg = ("no CUDA device: nothing to measure. Run this on a GPU machine, or pass --cpu-smoke to check "
               "the script itself under the Triton interpreter (tiny shapes, meaningless numbers).")
        print(msg)
        print(json.dumps({"bench": "kernels", "status": "skipped", "reason": "no CUDA", "command": command}))
        return 0
    from moekit.kernels import HAS_TRITON, moe_mlp, moe_mlp_ref

    if not HAS_TRITON:
        print("triton is not installed: install triton>=3.8")
        print(json.dumps({"bench": "kernels", "status": "skipped", "reason": "no triton", "command": command}))
        return 0
    import triton

    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    table = SMOKE_SHAPES if args.cpu_smoke else SHAPES
    names = args.shapes.split(",") if args.shapes else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"unknown shape(s) {unknown}; choose from {sorted(table)}")
        return 2
    shapes = {n: table[n] for n in names}
    tokens = [int(t) for t in (args.tokens or ("8,32" if args.cpu_smoke else "128,4096,16384")).split(",")]
    modes = args.modes.split(",")
    variants = args.variants.split(",")
    machine = {
        "device": (torch.cuda.get_device_name() if device == "cuda"
                   else f"CPU ({platform.processor() or platform.machine()}, interpreter)"),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "host": platform.node(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "dtype": str(dtype).replace("torch.", ""),
    }
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))

    results = []
    for name, (D, F, E, K) in shapes.items():
        for T in tokens:
            case = run_case(torch, moe_mlp, moe_mlp_ref, name, D, F, E, K, T, modes, variants, device, dtype, args)
            results.append(case)
            print_case(case)
    verdict = targets(results) if not args.cpu_smoke else {
        "checks": [], "lines": ["targets: not evaluated in a --cpu-smoke run (interpreter timings mean nothing)"]}
    for line in verdict["lines"]:
        print(line)
    out = {"bench": "kernels", "status": "ok", "command": command, "machine": machine, "results": results,
           "targets": verdict["checks"], "smoke": bool(args.cpu_smoke)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


# ---------------------------------------------------------------------------------------------
def grouped_mm_moe(torch, x, ids, w, w_in, w_out):
    """Baseline with torch.nn.functional.grouped_mm (sort rows by expert, two grouped GEMMs)."""
    import torch.nn.functional as Fn

    T, K = ids.shape
    E, H, D = w_in.shape
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    n_drop = int((flat < 0).sum())
    order = order[n_drop:]
    tok = order // K
    counts = torch.bincount(flat[order], minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x.index_select(0, tok)
    a = Fn.grouped_mm(xs, w_in.transpose(-2, -1), offs=offs)
    gate, up = a.chunk(2, dim=-1)
    h = (Fn.silu(gate) * up).contiguous()
    o = Fn.grouped_mm(h, w_out.transpose(-2, -1), offs=offs)
    o = o * w.reshape(-1)[order].to(o.dtype)[:, None]
    return torch.zeros_like(x).index_add_(0, tok, o)


def dense_chain(torch, x_ND, w1_DH, w2_FD):
    import torch.nn.functional as Fn

    a = x_ND @ w1_DH
    gate, up = a.chunk(2, dim=-1)
    return (Fn.silu(gate) * up) @ w2_FD


def run_case(torch, moe_mlp, moe_mlp_ref, name, D, F, E, K, T, modes, variants, device, dtype, args):
    # generated on the device (DeepSeek-V3's expert weights would take minutes and 45 GB on the host)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, D, generator=g, device=device).to(dtype)
    logits = torch.randn(T, E, generator=g, device=device)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    w_in = (torch.randn(E, 2 * F, D, generator=g, device=device, dtype=dtype) / D ** 0.5)
    w_out = (torch.randn(E, D, F, generator=g, device=device, dtype=dtype) / F ** 0.5)
    N = T * K
    flops_fwd = 2 * N * D * 2 * F + 2 * N * F * D
    case = {"shape": name, "D": D, "F": F, "E": E, "K": K, "T": T, "flops_fwd": flops_fwd, "variants": {}}
    impls = {
        "triton": lambda a, b, c, d: moe_mlp(a, ids, b, c, d, "swiglu"),
        "grouped_mm": lambda a, b, c, d: grouped_mm_moe(torch, a, ids, b, c, d),
        "loop": lambda a, b, c, d: moe_mlp_ref(a, ids, b, c, d, "swiglu"),
    }
    # correctness first (against the loop, fp32 accumulation differences only)
    with torch.no_grad():
        y_ref = moe_mlp_ref(x, ids, w, w_in, w_out, "swiglu").float()
        scale = y_ref.abs().max().item() or 1.0
        for v in ("triton", "grouped_mm"):
            if v in variants:
                try:
                    err = (impls[v](x, w, w_in, w_out).float() - y_ref).abs().max().item() / scale
                    case["variants"].setdefault(v, {})["rel_err_vs_loop"] = err
                except Exception as e:  # grouped_mm may be missing / unsupported on this GPU
                    case["variants"].setdefault(v, {})["error"] = f"{type(e).__name__}: {e}"[:300]
    dy = torch.randn(T, D, generator=g, device=device, dtype=dtype)
    for mode in modes:
        flops = flops_fwd * (3 if mode == "fwdbwd" else 1)
        for v in variants:
            entry = case["variants"].setdefault(v, {})
            if "error" in entry:
                continue
            if v == "loop" and T > args.skip_loop_above:
                entry[mode] = {"skipped": f"T > {args.skip_loop_above}"}
                continue
            if v == "dense":
                fn = make_dense(torch, N, D, F, device, dtype, mode, g)
            else:
                fn = make_step(torch, impls[v], x, w, w_in, w_out, dy, mode)
            try:
                t = time_fn(torch, fn, device, args.warmup, args.reps)
            except Exception as e:  # e.g. out of memory at the largest shapes: report, go on
                entry[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
                fn = None
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                for t_ in (x, w, w_in, w_out):
                    t_.grad = None
            entry[mode] = {"ms": t * 1e3, "tflops": flops / t / 1e12}
    for t_ in (x, w, w_in, w_out):
        t_.requires_grad_(False)
    return case


def make_step(torch, impl, x, w, w_in, w_out, dy, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                impl(x, w, w_in, w_out)
        return step
    # the inputs themselves are the leaves (no copies: DeepSeek-V3's expert weights are 22 GiB)
    leaves = [t.requires_grad_() for t in (x, w, w_in, w_out)]

    def step():
        for t in leaves:
            t.grad = None
        y = impl(*leaves)
        y.backward(dy)
    return step


def make_dense(torch, N, D, F, device, dtype, mode, g):
    x = torch.randn(N, D, generator=g, device=device, dtype=dtype)
    w1 = torch.randn(D, 2 * F, generator=g, device=device, dtype=dtype) / D ** 0.5
    w2 = torch.randn(F, D, generator=g, device=device, dtype=dtype) / F ** 0.5
    dy = torch.randn(N, D, generator=g, device=device, dtype=dtype)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                dense_chain(torch, x, w1, w2)
        return step
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2)]

    def step():
        for t in leaves:
            t.grad = None
        dense_chain(torch, *leaves).backward(dy)
    return step


def time_fn(torch, fn, device, warmup, reps):
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tf(case, v, mode):
    return case["variants"].get(v, {}).get(mode, {}).get("tflops")


def _ms(case, v, mode):
    return case["variants"].get(v, {}).get(mode, {}).get("ms")


def print_case(case):
    head = f"{case['shape']:<12} T={case['T']:<6} D={case['D']} F={case['F']} E={case['E']} K={case['K']}"
    print(head)
    for v, entry in case["variants"].items():
        if "error" in entry:
            print(f"  {v:<11} ERROR {entry['error']}")
            continue
        parts = []
        for mode in ("fwd", "fwdbwd"):
            m = entry.get(mode)
            if m and "ms" in m:
                parts.append(f"{mode} {m['ms']:9.3f} ms {m['tflops']:8.2f} TFLOP/s")
            elif m:
                parts.append(f"{mode} {m.get('skipped') or 'ERROR ' + m.get('error', '?')}")
        err = entry.get("rel_err_vs_loop")
        print(f"  {v:<11} " + " | ".join(parts) + (f"  (rel err vs loop {err:.1e})" if err is not None else ""))
    for mode in ("fwd", "fwdbwd"):
        tri = _tf(case, "triton", mode)
        if tri is None:
            continue
        ratios = []
        for v in ("dense", "grouped_mm"):
            other = _tf(case, v, mode)
            if other:
                ratios.append(f"triton/{v} {tri / other:.2f}")
        loop_ms, tri_ms = _ms(case, "loop", mode), _ms(case, "triton", mode)
        if loop_ms:
            ratios.append(f"speedup over loop {loop_ms / tri_ms:.2f}x")
        print(f"  ratios {mode}: " + ", ".join(ratios))


def targets(results):
    checks, lines = [], ["targets (issue #3):"]
    for case in results:
        for mode in ("fwd", "fwdbwd"):
            tri = _tf(case, "triton", mode)
            if tri is None:
                continue
            tag = f"{case['shape']} T={case['T']} {mode}"
            if case["T"] >= 4096:
                dense, gmm = _tf(case, "dense", mode), _tf(case, "grouped_mm", mode)
                if dense:
                    ok = tri >= 0.85 * dense
                    checks.append({"case": tag, "target": ">= 0.85 dense", "ratio": tri / dense, "ok": ok})
                if gmm:
                    ok = tri >= gmm
                    checks.append({"case": tag, "target": ">= grouped_mm", "ratio": tri / gmm, "ok": ok})
            if case["T"] <= 128:
                loop_ms, tri_ms = _ms(case, "loop", mode), _ms(case, "triton", mode)
                if loop_ms:
                    ok = loop_ms / tri_ms >= 1.5
                    checks.append({"case": tag, "target": ">= 1.5x loop", "ratio": loop_ms / tri_ms, "ok": ok})
    for c in checks:
        lines.append(f"  {'PASS' if c['ok'] else 'MISS'} {c['case']:<32} {c['target']:<14} ratio {c['ratio']:.2f}")
    if not checks:
        lines.append("  (no case with a target in this run)")
    return {"checks": checks, "lines": lines}


if __name__ == "__main__":
    sys.exit(main())
