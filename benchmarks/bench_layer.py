#!/usr/bin/env python
"""MoELayer on CPU against its peers, on the same weights and input, against the dense floor.

Variants (each built from the weights of one seeded ``MoELayer``; outputs checked before timing):

- ``moekit``         MoELayer with the best CPU backend (``resolve_backend("auto", cpu)``; for
                     ``cpu`` the profiled warm-up must show its CPU Function).
- ``moekit_other_schedule``  the same layer with the ``cpu`` backend's other schedule (workers
                     <-> inline parallel GEMMs), to show what the schedule choice is worth.
- ``hf_eager``       HF transformers' SparseMoeBlock (OLMoE or Mixtral) with
                     ``config._experts_implementation = "eager"`` (per-expert loop, index_add_).
- ``hf_grouped_mm``  the same block with ``_experts_implementation = "grouped_mm"``. Which one ran
                     is verified from the profiled warm-up: ``aten::_grouped_mm`` must appear for
                     grouped_mm and not for eager, ``aten::index_add_`` the other way round.
- ``tutel_cf0``      Tutel ``moe_layer`` (``llama_ffn`` SwiGLU experts), capacity_factor 0 (dropless,
                     padded to the busiest expert).
- ``tutel_cf1.25``   the same with capacity_factor 1.25 (drops overflow; output not compared).
- dense floor        the same FLOPs as one dense chain ``[T*K, D] @ [D, 2F] -> SiLU-GLU -> @ [F, D]``.
                     Three formulations are timed: ``dense_linear`` (``F.linear`` on ``[2F, D]`` and
                     ``[D, F]`` weights, gate/up split by ``chunk``), ``dense_matmul`` (``@`` on
                     pre-transposed ``[D, 2F]``/``[F, D]`` weights) and ``dense_split`` (``F.linear``
                     on separate ``[F, D]`` gate and up weights); the fastest per mode is the floor.

Modes: ``fwd`` is a forward under ``torch.no_grad()``; ``fwdbwd`` is a forward with grad enabled
plus ``backward`` of a fixed random output gradient (grads for the input and every weight,
router included; grads are reset to None between steps). Timing: every variant runs once
per round, rounds interleave the variants (so load from other processes on the machine hits
all of them alike), ``--warmup`` untimed steps first, the median over rounds is reported, and
a variant stops after ``--min-reps`` rounds once it has used ``--variant-budget`` seconds.

Peak memory: the first warm-up step of each variant runs under ``torch.profiler`` with
``profile_memory=True``; the reported peak is the largest net amount of torch CPU tensor memory
allocated during that step above what was live when it began (activations, saved tensors,
outputs, gradients; not weights or the input, which exist before the step).

Allocator settings: how the C allocator serves large blocks decides a good part of a CPU step
(glibc ``mmap``-s every block above 32 MiB fresh and page-faults it in again each step). So
every setting in ``--allocators`` runs as its own child process in which *every* variant,
floor included, runs under that one setting:

- ``default``: the process's allocator as started (glibc with its defaults here);
- ``neutral``: glibc tunables that keep freed memory in the heap (``MALLOC_MMAP_MAX_=0``,
  ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` of 64 GiB / 1 GiB): allocation-neutral;
- ``jemalloc`` / ``tcmalloc``: the library ``LD_PRELOAD``-ed (skipped where not installed:
  ``apt-get install libjemalloc2 libtcmalloc-minimal4``).

The acceptance checks are made on ``neutral`` (the fair setting); the others are reported beside.

Usage::

    python benchmarks/bench_layer.py            # default shapes, default+neutral, ~20 min on 2 cores
    python benchmarks/bench_layer.py --allocators default,neutral,jemalloc,tcmalloc
    python benchmarks/bench_layer.py --quick    # tiny shapes, a smoke run (seconds)

The last line printed is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # checkout, no install: last, so
# its kernels/ folder cannot shadow the kernels distribution that transformers imports

import moekit.experts.cpu as moekit_cpu  # noqa: E402
from moekit.config import MoEConfig  # noqa: E402
from moekit.experts import resolve_backend  # noqa: E402
from moekit.layer import MoELayer  # noqa: E402
from _machine import cpu_model  # noqa: E402  (benchmarks/ is sys.path[0] when a script runs)

ALLOCATORS = {
    "default": {},
    "neutral": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30), "MALLOC_TOP_PAD_": str(1 << 30)},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},
}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
FAIR = "neutral"


@dataclass(frozen=True)
class Shape:
    name: str
    family: str  # "olmoe" or "mixtral": which HF block is the peer
    D: int
    F: int
    E: int
    K: int
    T: int
    norm_topk_prob: bool


SHAPES = {
    "olmoe-T2048": Shape("olmoe-T2048", "olmoe", 1024, 512, 64, 8, 2048, False),
    "olmoe-T4096": Shape("olmoe-T4096", "olmoe", 1024, 512, 64, 8, 4096, False),
    "mixtral-T2048": Shape("mixtral-T2048", "mixtral", 1024, 2048, 8, 2, 2048, True),
}
QUICK_SHAPES = {
    "olmoe-tiny": Shape("olmoe-tiny", "olmoe", 64, 32, 8, 4, 64, False),
    "mixtral-tiny": Shape("mixtral-tiny", "mixtral", 64, 128, 4, 2, 64, True),
}
VARIANTS = ("moekit", "moekit_other_schedule", "hf_eager", "hf_grouped_mm", "tutel_cf0", "tutel_cf1.25")
MODES = ("fwd", "fwdbwd")

# Acceptance for MoELayer (dropless), multiples of the dense floor; plus "no slower than the
# best peer" in each mode on every shape.
TARGETS = {"olmoe": {"fwd": 1.10, "fwdbwd": 1.20}, "mixtral": {"fwd": 1.05, "fwdbwd": 1.05}}
# Relative tolerance (max |a - b| / max |ref|) of fp32 outputs that sum in different orders.
RTOL = 1e-4


# ---- variants ------------------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    module: Optional[torch.nn.Module] = None
    skip: Optional[str] = None  # why it does not run
    expect_ops: Optional[dict] = None  # op name -> must it appear in the profiled warm-up?
    compare: bool = True  # compare its output with moekit's
    note: str = ""


def build_moekit(shape: Shape, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=shape.D, ffn_hidden_size=shape.F, num_experts=shape.E, top_k=shape.K,
                    norm_topk_prob=shape.norm_topk_prob, backend="auto")
    layer = MoELayer(cfg)
    with torch.no_grad():  # a router scale that gives non-degenerate routing
        layer.router.weight.normal_(0.0, shape.D ** -0.5)
    return layer


def build_hf(shape: Shape, src: MoELayer, impl: str) -> torch.nn.Module:
    if shape.family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block

        config = OlmoeConfig(hidden_size=shape.D, intermediate_size=shape.F, num_experts=shape.E,
                             num_experts_per_tok=shape.K, norm_topk_prob=shape.norm_topk_prob,
                             hidden_act="silu")
    else:
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block

        assert shape.norm_topk_prob, "HF Mixtral always renormalises the top-k weights"
        config = MixtralConfig(hidden_size=shape.D, intermediate_size=shape.F, num_local_experts=shape.E,
                               num_experts_per_tok=shape.K, router_jitter_noise=0.0, hidden_act="silu")
    config._experts_implementation = impl  # transformers 5.x switch read by @use_experts_implementation
    block = Block(config)
    with torch.no_grad():
        block.gate.weight.copy_(src.router.weight)
        block.experts.gate_up_proj.copy_(src.experts.w_in)  # [E, 2F, D], gate rows first
        block.experts.down_proj.copy_(src.experts.w_out)  # [E, D, F]
    return block


class TutelBlock(torch.nn.Module):
    """Tutel ``moe_layer`` with its SwiGLU (``llama_ffn``) experts, called on [T, D]."""

    def __init__(self, shape: Shape, src: MoELayer, capacity_factor: float):
        super().__init__()
        from tutel import moe as tutel_moe

        E, D, Fh = shape.E, shape.D, shape.F
        self.layer = tutel_moe.moe_layer(
            gate_type={"type": "top", "k": shape.K, "capacity_factor": capacity_factor},
            model_dim=D,
            experts={"type": "llama_ffn", "count_per_node": E, "hidden_size_per_expert": Fh},
            normalize_gate=shape.norm_topk_prob,  # softmax -> top-k -> (renormalise): as HF
        )
        ex = self.layer.experts
        w_in, w_out = src.experts.w_in.detach(), src.experts.w_out.detach()
        with torch.no_grad():
            # llama_ffn keeps flat parameters of full shapes W_fc1/W_fc2 [E, D, F] (x @ W), W_fc3 [E, F, D]
            assert tuple(ex.W_fc1_full_shape) == (E, D, Fh) and tuple(ex.W_fc3_full_shape) == (E, Fh, D)
            ex.W_fc1.copy_(w_in[:, :Fh, :].transpose(1, 2).reshape(-1))  # gate
            ex.W_fc2.copy_(w_in[:, Fh:, :].transpose(1, 2).reshape(-1))  # up
            ex.W_fc3.copy_(w_out.transpose(1, 2).reshape(-1))  # down
            self.layer.gates[0].wg.weight.copy_(src.router.weight)

    def forward(self, x):
        return self.layer(x.reshape(-1, x.shape[-1])).view(x.shape)


class OtherSchedule(torch.nn.Module):
    """``layer`` with the cpu backend's schedule flipped (workers <-> inline) for its forward;
    the backward follows the parts its forward used."""

    def __init__(self, layer: MoELayer, picked: str):
        super().__init__()
        self.layer, self.picked = layer, picked

    def forward(self, x):
        saved = moekit_cpu.INLINE_MIN_MACS
        moekit_cpu.INLINE_MIN_MACS = 1 << 62 if self.picked == "inline" else 0
        try:
            return self.layer(x)
        finally:
            moekit_cpu.INLINE_MIN_MACS = saved


def picked_schedule(layer: MoELayer, x: torch.Tensor) -> str:
    """Which schedule the cpu backend picks for this layer on this input's real routing."""
    with torch.no_grad():
        counts = layer.router(x.reshape(-1, x.shape[-1])).tokens_per_expert_E.tolist()
    parts = moekit_cpu.plan_parts(counts, layer.config.hidden_size, layer.experts.w_in.shape[1])
    return "inline" if len(parts) == 1 else "workers"


def tutel_status() -> tuple[bool, str]:
    try:
        import tutel
        from tutel import moe  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build raising at import
        return False, f"not importable: {type(exc).__name__}: {exc}"
    try:
        from importlib.metadata import version
        ver = version("tutel")
    except Exception:  # installed without metadata
        ver = getattr(tutel, "__version__", "?")
    return True, f"tutel {ver} imported from {Path(tutel.__file__).parent}"


def build_variants(shape: Shape, layer: MoELayer, x: torch.Tensor, names: list[str], tutel_ok: bool,
                   tutel_msg: str):
    out = []
    backend = resolve_backend(layer.config.backend, torch.device("cpu"))
    picked = picked_schedule(layer, x)
    for name in names:
        if name == "moekit":
            expect = {"_CPUExperts": True} if backend == "cpu" else None
            out.append(Variant(name, layer, expect_ops=expect, note=f"backend={backend}, schedule={picked}"))
        elif name == "moekit_other_schedule":
            if backend != "cpu" or torch.get_num_threads() == 1:
                out.append(Variant(name, skip="needs the cpu backend with >1 thread"))
                continue
            other = "workers" if picked == "inline" else "inline"
            out.append(Variant(name, OtherSchedule(layer, picked), expect_ops={"_CPUExperts": True},
                               note=f"backend=cpu, schedule={other}"))
        elif name in ("hf_eager", "hf_grouped_mm"):
            impl = name[3:]
            ran = {"aten::_grouped_mm": impl == "grouped_mm", "aten::index_add_": impl == "eager"}
            out.append(Variant(name, build_hf(shape, layer, impl), expect_ops=ran,
                               note=f"_experts_implementation={impl}"))
        elif name.startswith("tutel_cf"):
            cf = float(name[len("tutel_cf"):])
            if not tutel_ok:
                out.append(Variant(name, skip=f"Tutel {tutel_msg}"))
                continue
            out.append(Variant(name, TutelBlock(shape, layer, cf), compare=(cf == 0),
                               note=f"llama_ffn experts, capacity_factor={cf}, normalize_gate={shape.norm_topk_prob}"))
        else:
            raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return out


# ---- steps ---------------------------------------------------------------------------------------

def make_steps(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Callable]:
    x_req = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            return module(x)

    def fwdbwd():
        y = module(x_req)
        y.backward(grad_out)
        g = x_req.grad
        x_req.grad = None
        for p in params:
            p.grad = None
        return g

    return {"fwd": fwd, "fwdbwd": fwdbwd}


def dense_steps(shape: Shape, seed: int = 1) -> dict[str, dict[str, Callable]]:
    """The dense floor: one chain over T*K rows with the same FLOPs as the routed experts."""
    g = torch.Generator().manual_seed(seed)
    N, D, Fh = shape.T * shape.K, shape.D, shape.F
    x = torch.randn(N, D, generator=g)
    w_in = torch.randn(2 * Fh, D, generator=g) * D ** -0.5  # [2F, D], F.linear layout
    w_out = torch.randn(D, Fh, generator=g) * Fh ** -0.5  # [D, F]
    w_in_t, w_out_t = w_in.t().contiguous(), w_out.t().contiguous()  # [D, 2F], [F, D]
    w_gate, w_up = w_in[:Fh].contiguous(), w_in[Fh:].contiguous()  # [F, D] each
    grad_out = torch.randn(N, D, generator=g)

    def chain_linear(x, a, b):
        gate, up = F.linear(x, a).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, b)

    def chain_matmul(x, a, b):
        gate, up = (x @ a).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ b

    def chain_split(x, a, b, c):  # separate gate / up weights: no chunk, so no cat in backward
        return F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c)

    forms = {}
    for name, chain, weights in (("dense_linear", chain_linear, (w_in, w_out)),
                                 ("dense_matmul", chain_matmul, (w_in_t, w_out_t)),
                                 ("dense_split", chain_split, (w_gate, w_up, w_out))):
        leaves = [t.clone().requires_grad_(True) for t in (x, *weights)]

        def fwd(chain=chain, weights=weights):
            with torch.no_grad():
                return chain(x, *weights)

        def fwdbwd(chain=chain, leaves=leaves):
            chain(*leaves).backward(grad_out)
            for t in leaves:
                t.grad = None

        forms[name] = {"fwd": fwd, "fwdbwd": fwdbwd}
    return forms


def profiled_step(step: Callable) -> tuple[float, set[str], object, float]:
    """Run ``step`` once under the memory profiler: (peak MiB, op names seen, result, seconds)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - t0
    # every allocation / free the CPU allocator reported (prof.events() keeps only those
    # outside an op), in time order; frees of blocks allocated before the step are not reported
    live = peak = 0
    mem = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(mem, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    ops = {e.name for e in prof.events()}
    return peak / 2 ** 20, ops, result, seconds


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


# ---- timing --------------------------------------------------------------------------------------

def time_interleaved(steps: dict[str, Callable], reps: int, min_reps: int, budget_s: float) -> dict[str, list[float]]:
    """Round-robin: each round runs every still-active step once (rotating the start)."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    spent = {k: 0.0 for k in steps}
    names = list(steps)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(reps):
            active = [n for n in names if len(times[n]) < min_reps or spent[n] < budget_s]
            if not active:
                break
            shift = r % len(active)
            for n in active[shift:] + active[:shift]:
                t0 = time.perf_counter()
                steps[n]()
                dt = time.perf_counter() - t0
                times[n].append(dt)
                spent[n] += dt
    finally:
        if gc_was:
            gc.enable()
    return times


def machine_info() -> dict:
    cpu = cpu_model()
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "transformers": tf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---- main ----------------------------------------------------------------------------------------

def run_shape(shape: Shape, variant_names: list[str], modes: list[str], args, tutel) -> dict:
    print(f"\n== {shape.name}: D={shape.D} F={shape.F} E={shape.E} K={shape.K} T={shape.T} "
          f"norm_topk_prob={shape.norm_topk_prob} (dropless unless noted)", flush=True)
    layer = build_moekit(shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, shape.T, shape.D, generator=g)
    grad_out = torch.randn(1, shape.T, shape.D, generator=g)
    variants = build_variants(shape, layer, x, variant_names, *tutel)
    res: dict = {"shape": asdict(shape), "variants": {}, "floor": {}}

    # correctness before timing: forward output and input gradient vs moekit
    ref_y = ref_gx = None
    steps: dict[str, dict[str, Callable]] = {}
    first_s: dict[tuple[str, str], float] = {}  # seconds of the profiled first warm-up step
    for v in variants:
        entry = res["variants"].setdefault(v.name, {"note": v.note})
        if v.skip:
            entry["skipped"] = v.skip
            print(f"  {v.name:14s} SKIPPED: {v.skip}")
            continue
        steps[v.name] = make_steps(v.module, x, grad_out)
        for mode in modes:
            peak, ops, out, first_s[v.name, mode] = profiled_step(steps[v.name][mode])
            entry[f"{mode}_peak_mib"] = round(peak, 2)
            for op, expected in (v.expect_ops or {}).items():  # which implementation really ran
                ran = op in ops
                entry.setdefault(f"{mode}_ops_seen", {})[op] = ran
                if ran != expected:
                    raise RuntimeError(f"{shape.name}/{v.name}/{mode}: {op} "
                                       f"{'ran' if ran else 'did not run'}, expected the opposite")
            if v.name == "moekit":
                ref_y, ref_gx = (out, None) if mode == "fwd" else (ref_y, out)
            elif v.compare:
                ref = ref_y if mode == "fwd" else ref_gx
                if ref is not None:
                    err = rel_err(out, ref)
                    entry[f"{mode}_rel_err_vs_moekit"] = err
                    if not err <= RTOL:
                        raise RuntimeError(f"{shape.name}/{v.name}/{mode}: output differs from moekit "
                                           f"(max rel err {err:.2e} > {RTOL})")
        entry["verified"] = ("output and input grad match moekit" if v.compare and "moekit" in steps
                             else "not compared (drops tokens)" if not v.compare else "reference")
        print(f"  {v.name:14s} {v.note}; {entry['verified']}; "
              + ", ".join(f"{k}={entry[k]:.1e}" for k in entry if k.endswith("rel_err_vs_moekit")), flush=True)

    for name, form in dense_steps(shape).items():
        for mode in modes:
            peak, _, _, first_s[name, mode] = profiled_step(form[mode])
            res["floor"].setdefault(name, {})[f"{mode}_peak_mib"] = round(peak, 2)
        steps[name] = form

    for mode in modes:
        mode_steps = {n: s[mode] for n, s in steps.items()}
        for _ in range(args.warmup - 1):  # the profiled step was the first warm-up
            for n, s in mode_steps.items():
                if first_s[n, mode] < args.slow_step:
                    s()
        load0 = os.getloadavg()[0]
        times = time_interleaved(mode_steps, args.reps, args.min_reps, args.variant_budget)
        load1 = os.getloadavg()[0]
        res.setdefault("loadavg_1min", {})[mode] = [round(load0, 2), round(load1, 2)]
        for n, ts in times.items():
            tgt = res["floor"][n] if n.startswith("dense_") else res["variants"][n]
            tgt[f"{mode}_ms"] = round(statistics.median(ts) * 1e3, 2)
            tgt[f"{mode}_reps"] = len(ts)
            tgt[f"{mode}_ms_all"] = [round(t * 1e3, 2) for t in ts]
        best = min((n for n in res["floor"] if n.startswith("dense_")), key=lambda n: res["floor"][n][f"{mode}_ms"])
        floor_ms = res["floor"][best][f"{mode}_ms"]
        res["floor"][mode] = {"ms": floor_ms, "form": best, "peak_mib": res["floor"][best][f"{mode}_peak_mib"]}
        for n, e in res["variants"].items():
            if f"{mode}_ms" in e:
                e[f"{mode}_x_floor"] = round(e[f"{mode}_ms"] / floor_ms, 3)
    print_table(shape, res, modes)
    return res


def print_table(shape: Shape, res: dict, modes: list[str]) -> None:
    hdr = f"  {'variant':16s}" + "".join(f" {m + ' ms':>11s} {m + ' x':>9s} {m + ' MiB':>11s}" for m in modes)
    print(hdr)
    fl = res["floor"]
    row = f"  {'dense floor':16s}"
    for m in modes:
        row += f" {fl[m]['ms']:11.1f} {1.0:9.3f} {fl[m]['peak_mib']:11.1f}"
    print(row + "   (" + ", ".join(f"{m}: {fl[m]['form']}" for m in modes) + ")")
    for n, e in res["variants"].items():
        if "skipped" in e:
            print(f"  {n:16s} skipped: {e['skipped']}")
            continue
        row = f"  {n:16s}"
        for m in modes:
            row += f" {e[m + '_ms']:11.1f} {e[m + '_x_floor']:9.3f} {e[m + '_peak_mib']:11.1f}"
        print(row)
    print(f"  load average (1 min) before/after timing: {res['loadavg_1min']}", flush=True)


def markdown(results: dict, modes: list[str]) -> str:
    """One markdown table per shape (for benchmarks/RESULTS.md)."""
    out = []
    for sname, r in results.items():
        sh = r["shape"]
        out.append(f"**{sname}** (D={sh['D']}, F={sh['F']}, E={sh['E']}, K={sh['K']}, T={sh['T']}, "
                   f"norm_topk_prob={sh['norm_topk_prob']}); floor: "
                   + ", ".join(f"{m} `{r['floor'][m]['form']}`" for m in modes) + "\n")
        out.append("| variant | " + " | ".join(f"{m} x floor | {m} ms | {m} peak MiB" for m in modes) + " |")
        out.append("|---|" + "---:|---:|---:|" * len(modes))
        out.append("| dense floor | " + " | ".join(
            f"1.00 | {r['floor'][m]['ms']:.1f} | {r['floor'][m]['peak_mib']:.0f}" for m in modes) + " |")
        for n, e in r["variants"].items():
            if "skipped" in e:
                out.append(f"| {n} | " + " | ".join("skipped | | " for _ in modes) + " |")
                continue
            out.append(f"| {n} | " + " | ".join(
                f"{e[m + '_x_floor']:.2f} | {e[m + '_ms']:.1f} | {e[m + '_peak_mib']:.0f}" for m in modes) + " |")
        out.append(f"\nload average (1 min) before/after the timed rounds: "
                   + ", ".join(f"{m} {v[0]}/{v[1]}" for m, v in r["loadavg_1min"].items()) + "\n")
    return "\n".join(out)


def acceptance(results: dict, modes: list[str]) -> list[dict]:
    checks = []
    for sname, r in results.items():
        family = r["shape"]["family"]
        mk = r["variants"].get("moekit")
        if not mk or "skipped" in mk:
            continue
        for m in modes:
            x = mk[f"{m}_x_floor"]
            lim = TARGETS[family][m]
            checks.append({"shape": sname, "mode": m, "check": f"moekit <= {lim}x floor",
                           "value": x, "ok": x <= lim})
            peers = {n: e[f"{m}_ms"] for n, e in r["variants"].items()
                     if not n.startswith("moekit") and f"{m}_ms" in e}
            if peers:
                best = min(peers, key=peers.get)
                checks.append({"shape": sname, "mode": m, "check": f"moekit <= best peer ({best})",
                               "value": round(mk[f"{m}_ms"] / peers[best], 3), "ok": mk[f"{m}_ms"] <= peers[best]})
    return checks


def allocator_env(name: str) -> tuple[Optional[dict], str]:
    """The environment additions of allocator setting ``name`` (None and why when unavailable)."""
    if name not in ALLOCATORS:
        raise SystemExit(f"unknown allocator {name!r}; choose from {list(ALLOCATORS)}")
    spec = dict(ALLOCATORS[name])
    if "LD_PRELOAD" in spec:
        found = [str(Path(d) / spec["LD_PRELOAD"]) for d in LIB_DIRS if (Path(d) / spec["LD_PRELOAD"]).exists()]
        if not found:
            return None, f"{spec['LD_PRELOAD']} not found in {', '.join(LIB_DIRS)}"
        spec["LD_PRELOAD"] = found[0]
    return spec, " ".join(f"{k}={v}" for k, v in spec.items()) or "(as started)"


def allocator_in_effect(name: str) -> str:
    """What this (child) process really runs with: the preloaded library must be mapped."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if "LD_PRELOAD" in env:
        maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
        lib = Path(env["LD_PRELOAD"]).name
        if lib not in maps:
            raise RuntimeError(f"allocator {name}: {lib} is not mapped into the process")
    return " ".join(f"{k}={v}" for k, v in sorted(env.items())) or "glibc defaults"


def run_child(args, modes, variant_names) -> dict:
    """All shapes and variants in this process, under the allocator it was started with."""
    torch.set_num_threads(args.threads)
    pool = QUICK_SHAPES if args.quick else SHAPES
    shape_names = args.shapes.split(",") if args.shapes else list(pool)
    tutel = tutel_status()
    alloc = allocator_in_effect(args.child)
    print(f"allocator {args.child}: {alloc}")
    print(f"tutel: {tutel[1]}")
    results = {}
    for name in shape_names:
        if name not in pool:
            raise SystemExit(f"unknown shape {name!r}; choose from {list(pool)}")
        results[name] = run_shape(pool[name], variant_names, modes, args, tutel)
    return {"allocator": args.child, "allocator_env": alloc, "tutel": {"available": tutel[0], "status": tutel[1]},
            "machine": machine_info(), "results": results}


def spawn(name: str, argv: list[str]) -> dict:
    """Run this script as a child under allocator setting ``name``; stream its output."""
    import subprocess

    extra, desc = allocator_env(name)
    if extra is None:
        print(f"\n#### allocator {name}: skipped ({desc})", flush=True)
        return {"allocator": name, "skipped": desc}
    env = {k: v for k, v in os.environ.items() if not (k.startswith("MALLOC_") or k == "LD_PRELOAD")}
    env.update(extra)
    print(f"\n#### allocator {name}: {desc}", flush=True)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv, "--child", name], env=env,
                            stdout=subprocess.PIPE, text=True)
    last = ""
    for line in proc.stdout:
        if line.startswith("{"):
            last = line
        else:
            print(f"[{name}] {line}", end="", flush=True)
    if proc.wait() != 0 or not last:
        raise RuntimeError(f"allocator {name}: the child run failed (exit {proc.returncode})")
    return json.loads(last)


def side_by_side(runs: dict, modes: list[str]) -> str:
    """moekit and each peer as multiples of the floor, per allocator setting (markdown)."""
    names = [n for n, r in runs.items() if "results" in r]
    out = ["| shape | variant | " + " | ".join(f"{a} {m}" for a in names for m in modes) + " |",
           "|---|---|" + "---:|" * (len(names) * len(modes))]
    first = runs[names[0]]["results"] if names else {}
    for sname, r in first.items():
        for v in r["variants"]:
            cells = []
            for a in names:
                e = runs[a]["results"][sname]["variants"][v]
                cells += ["skipped" if "skipped" in e else f"{e[m + '_x_floor']:.2f}" for m in modes]
            out.append(f"| {sname} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: Optional[list[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps: a smoke run")
    p.add_argument("--shapes", default=None, help=f"comma list of {list(SHAPES)} (default: all)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of variants")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allocators", default="default,neutral",
                   help=f"comma list of allocator settings from {list(ALLOCATORS)}; each runs every variant "
                        f"in its own child process (default: default,neutral)")
    p.add_argument("--markdown", action="store_true", help="also print markdown tables before the JSON")
    p.add_argument("--reps", type=int, default=9, help="max timed rounds per mode")
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (the first is profiled)")
    p.add_argument("--variant-budget", type=float, default=20.0,
                   help="seconds of timed steps after which a variant stops at --min-reps")
    p.add_argument("--slow-step", type=float, default=5.0,
                   help="a step that took longer in its profiled warm-up gets no further warm-up")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.min_reps, args.warmup = 2, 1, 1
    modes = args.modes.split(",")
    variant_names = args.variants.split(",")
    if args.child:
        print(json.dumps(run_child(args, modes, variant_names), separators=(",", ":")))
        return {}

    info = machine_info()
    command = " ".join(shlex.quote(a) for a in [sys.executable, str(Path(__file__)), *argv])
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    t0 = time.time()
    child_argv = [a for a in argv if not a.startswith("--allocators") and a != "--markdown"]
    if "--allocators" in argv:  # drop its value too
        i = argv.index("--allocators")
        child_argv = [a for j, a in enumerate(argv) if j not in (i, i + 1) and a != "--markdown"]
    runs = {name: spawn(name, child_argv) for name in args.allocators.split(",")}
    fair = FAIR if "results" in runs.get(FAIR, {}) else next((n for n, r in runs.items() if "results" in r), None)
    checks = {n: acceptance(r["results"], modes) for n, r in runs.items() if "results" in r} if not args.quick else {}
    for name, cs in checks.items():
        print(f"\nacceptance under allocator {name}{' (the fair setting)' if name == fair else ''}:")
        for c in cs:
            print(f"  {'PASS' if c['ok'] else 'MISS'}  {c['shape']:14s} {c['mode']:7s} {c['check']}: {c['value']}")
    print("\nmultiples of the dense floor, per allocator setting:\n" + side_by_side(runs, modes))
    if args.markdown:
        for name, r in runs.items():
            if "results" in r:
                print(f"\n#### allocator {name} ({r['allocator_env']})\n\n" + markdown(r["results"], modes))
    summary = {
        "bench": "bench_layer", "command": command, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": info, "wall_s": round(time.time() - t0, 1), "fair_allocator": fair,
        "allocators": runs, "acceptance": checks.get(fair, []), "acceptance_by_allocator": checks,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return summary


if __name__ == "__main__":
    main()
