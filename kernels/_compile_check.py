"""Compile every moekit Triton kernel for a CUDA target on a machine without a GPU.

Triton's NVIDIA backend (ptxas included in the wheel) lowers a kernel to PTX and cubin
without a driver, so the *compiled* code path (types, constexpr branches, layouts, register
allocation) is checked even where the tests can only run the interpreter::

    python -m moekit.kernels._compile_check                 # sm_90, every autotune config
    python -m moekit.kernels._compile_check --arch 80 --quick

Run it with ``TRITON_INTERPRET`` unset (the kernels must be JIT functions, not interpreted).
Prints one line per compiled variant (registers, spills, shared memory) and exits non-zero
if any variant fails to compile.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# pointer arguments that hold indices (int32) or the top-k ids (int64); other pointers hold data
_I32_PTRS = {"padded_slots_ptr", "block_expert_ptr", "poff_ptr", "tpe_ptr", "chunk_counts_ptr", "chunk_start_ptr",
             "totals_ptr", "off_ptr", "sorted_ptr", "padded_ptr", "inv_sorted_ptr", "inv_padded_ptr",
             "counts_ptr"}
_I64_PTRS = {"ids_ptr"}
_F32_PTRS = {"dwp_ptr", "bias_ptr"}
# per-kernel exceptions: (kernel function name, argument) -> type
_OVERRIDES = {("_route_topk_kernel", "ids_ptr"): "*i32", ("_route_topk_kernel", "w_ptr"): "*fp32"}
_FLOAT_SCALARS = {"scale"}
# integer arguments assumed divisible by 16, as the JIT specialises them at run time for model
# sizes (D, F, strides); token counts are do_not_specialize and get no such hint
_DIV16_INTS = {"D", "F", "NOUT", "KD", "M", "NN"}


# opt-in shared memory per block (bytes) of common targets; a config above it fails at launch
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


def _attrs(jit_fn, sig):
    """tt.divisibility=16 on every pointer (torch allocations are aligned) and on model-size ints."""
    attrs = {}
    for i, p in enumerate(jit_fn.params):
        t = sig[p.name]
        if t.startswith("*") or (t == "i32" and (p.name in _DIV16_INTS or p.name.startswith("stride"))):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _signature(jit_fn, constexprs, data_dtype: str):
    sig = {}
    for p in jit_fn.params:
        name = p.name
        if (jit_fn.__name__, name) in _OVERRIDES:
            sig[name] = _OVERRIDES[(jit_fn.__name__, name)]
        elif p.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            if name in _I32_PTRS:
                sig[name] = "*i32"
            elif name in _I64_PTRS:
                sig[name] = "*i64"
            elif name in _F32_PTRS:
                sig[name] = "*fp32"
            else:
                sig[name] = f"*{data_dtype}"
        elif name in _FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    missing = [p.name for p in jit_fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise KeyError(f"{jit_fn.__name__}: no value for constexpr(s) {missing}")
    return sig


def _variants(quick: bool):
    """(kernel, name, constexprs, data dtype) to compile; autotuned kernels add each config."""
    import triton.language as tl

    from . import align, grouped_mlp, routing

    gemm_common = dict(BF16_FIX=False, PREC="ieee", ACC=tl.float32)
    out = []
    out.append((routing._route_topk_kernel, "route_topk sigmoid/group", dict(
        K=8, SCORE=1, HAS_BIAS=True, N_GROUP=8, TOPK_GROUP=4, RENORM=True, EPS=1e-20, BLOCK_T=16, BLOCK_E=256,
        BLOCK_K=8), "fp32"))
    out.append((routing._route_topk_kernel, "route_topk softmax", dict(
        K=2, SCORE=0, HAS_BIAS=False, N_GROUP=1, TOPK_GROUP=1, RENORM=True, EPS=0.0, BLOCK_T=64, BLOCK_E=8,
        BLOCK_K=2), "bf16"))
    out.append((routing._route_topk_kernel, "route_topk softmax_topk", dict(
        K=4, SCORE=2, HAS_BIAS=False, N_GROUP=1, TOPK_GROUP=1, RENORM=False, EPS=0.0, BLOCK_T=64, BLOCK_E=32,
        BLOCK_K=4), "fp32"))
    out.append((align._align_count_kernel, "align count", dict(CHUNK=16, BLOCK_E=256), "fp32"))
    out.append((align._align_scan_kernel, "align scan", dict(BLOCK_C=64, BLOCK_E=64), "fp32"))
    out.append((align._align_offsets_kernel, "align offsets", dict(BLOCK_M=64, BLOCK_E=256, BLOCK_B=32), "fp32"))
    out.append((align._align_scatter_kernel, "align scatter", dict(CHUNK=16, BLOCK_E=256), "fp32"))
    out.append((grouped_mlp._combine_kernel, "combine", dict(TOPK=8, ACC=tl.float32, BF16_FIX=False, BLOCK_T=16,
                                                           BLOCK_D=1024), "bf16"))
    gemms = [
        (grouped_mlp._moe_gemm_in_kernel, "gemm_in swiglu+pre", dict(TOPK=2, GLU=True, ACT=0, SAVE_PRE=True)),
        (grouped_mlp._moe_gemm_in_kernel, "gemm_in gelu", dict(TOPK=2, GLU=False, ACT=1, SAVE_PRE=False)),
        (grouped_mlp._moe_gemm_out_kernel, "gemm_out scaled", dict(HAS_SCALE=True)),
        (grouped_mlp._moe_gemm_dh_kernel, "gemm_dh swiglu", dict(TOPK=2, GLU=True, ACT=0, NEED_DW=True)),
        (grouped_mlp._moe_gemm_dh_kernel, "gemm_dh relu", dict(TOPK=2, GLU=False, ACT=2, NEED_DW=False)),
        (grouped_mlp._moe_wgrad_kernel, "wgrad dW_out", dict(TOPK=2, A_GATHER=True, B_GATHER=False, HAS_SCALE=True)),
        (grouped_mlp._moe_wgrad_kernel, "wgrad dW_in", dict(TOPK=2, A_GATHER=False, B_GATHER=True, HAS_SCALE=False)),
    ]
    for kernel, name, consts in gemms:
        configs = kernel.configs[:1] if quick else kernel.configs
        for cfg in configs:
            c = {**consts, **gemm_common, **cfg.kwargs}
            if "BLOCK_R" not in c:
                c.setdefault("BLOCK_M", 64)
            label = f"{name} " + " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
            out.append((kernel, label, c, "bf16", cfg.num_warps, cfg.num_stages,
                        2 if c.get("GLU") and kernel is grouped_mlp._moe_gemm_in_kernel else 1))
    if not quick:  # fp32 inputs (IEEE dots) for the two forward GEMMs
        for kernel, name, consts in gemms[:1] + gemms[2:3]:
            cfg = kernel.configs[0]
            out.append((kernel, name + " fp32", {**consts, **gemm_common, **cfg.kwargs, "BLOCK_M": 64}, "fp32",
                        cfg.num_warps, cfg.num_stages, 2 if consts.get("GLU") else 1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="one autotune config per kernel")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the compile check needs JIT (not interpreted) kernels")
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    t_all = time.time()
    for item in _variants(args.quick):
        kernel, name, consts, dtype = item[:4]
        num_warps, num_stages = (item[4], item[5]) if len(item) > 4 else (4, 3)
        n_w = item[6] if len(item) > 6 else None
        jit_fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        t0 = time.time()
        try:
            sig = _signature(jit_fn, consts, dtype)
            src = ASTSource(fn=jit_fn, signature=sig, constexprs=consts, attrs=_attrs(jit_fn, sig))
            ck = triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
            md = ck.metadata
            shared = getattr(md, "shared", 0)
            limit = SMEM_LIMIT.get(args.arch)
            if limit is not None and shared > limit:
                from .grouped_mlp import smem_estimate
                est = None if n_w is None else smem_estimate(
                    consts["BLOCK_M"], consts["BLOCK_N"], consts["BLOCK_K"], num_stages, n_w, 4 if dtype == "fp32" else 2)
                if est is not None and est > limit:
                    print(f"skip sm_{args.arch} {name:<60} needs {shared} B shared > {limit} B: "
                          f"pruned at run time (estimate {est} B)", flush=True)
                    continue
                raise RuntimeError(f"needs {shared} B of shared memory, sm_{args.arch} allows {limit} B "
                                   "and the run-time pruning would not catch it")
            ttgir = ck.asm.get("ttgir", "")
            n_async = ttgir.count("async_copy_global_to_local") + ttgir.count("async_tma_copy")
            n_mma = ttgir.count("warp_group_dot") + ttgir.count("ttng.tc_gen5_mma") + ttgir.count("#ttg.nvidia_mma")
            print(f"ok   sm_{args.arch} {name:<60} warps={num_warps} stages={num_stages} "
                  f"shared={getattr(md, 'shared', '?')}B async_copies={n_async} mma_ops={n_mma} "
                  f"({time.time() - t0:.1f}s)", flush=True)
        except Exception as e:  # report every failure, then exit non-zero
            failures += 1
            msg = str(e).strip().splitlines()
            print(f"FAIL sm_{args.arch} {name}: {type(e).__name__}: {' | '.join(msg[-6:])[:1500]}", flush=True)
    print(f"{'all compiled' if not failures else f'{failures} failed'} in {time.time() - t_all:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
