"""Grouped expert MLP (forward + backward) over the block-aligned layout of ``align.py``.

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (GLU) or F (plain) rows of
``w_in``, E experts, K top-k, N = T*K flat slots (slot ``n = t*K + k``), P padded rows
(``align.padded_size``), BM = ``block_m``.

    y[t] = sum_k w[t,k] * (act(x[t] @ W_in[e]^T) @ W_out[e]^T),  e = ids[t,k], skipping -1

GLU activations ("swiglu", "geglu") split the H = 2F rows of ``W_in[e]`` as
``[gate (rows 0..F); up (rows F..2F)]`` (HF v5 ``gate_up_proj``): act = f(gate) * up with
f = silu / exact-erf gelu. Plain activations ("gelu", "relu", "silu") have H = F.

Forward (three launches after ``moe_align``):

* ``_moe_gemm_in_kernel``: per (BM-row block, BLOCK_N columns of F): gathers the block's
  token rows of ``x`` straight from ``x_TD`` (row = slot // K, no permuted copy), multiplies
  by ``W_in[e]^T`` (gate and up accumulators side by side), applies the activation in the
  epilogue; writes ``h_PF`` (and, when a backward will follow, the pre-activations
  ``pre_PH``) in padded order.
* ``_moe_gemm_out_kernel``: ``h_PF @ W_out[e]^T`` with the routing weight (cast to x's
  dtype) applied in the epilogue, stored at the row of its *slot* in ``y_slot_ND``
  (token-major; every kept slot written exactly once, no atomics).
* ``_combine_kernel``: ``y[t] = sum_k y_slot[t*K+k]`` in fixed k order (fp32 accumulation),
  masked on dropped slots: deterministic, no scatter-add race.

Backward (``dy_TD`` given):

* ``_moe_gemm_dh_kernel``: ``g = dy[token] @ W_out[e]`` (gathered on the fly), epilogue:
  ``d topk_weights`` partial sums ``<g, h>`` per F tile (summed over tiles by torch, fixed
  order), ``dh = w * g``, activation backward -> ``dpre_PH``.
* ``_moe_gemm_out_kernel`` reused: ``dx_slot = dpre_PH @ W_in[e]`` -> slot rows; combine ->
  ``dx_TD``.
* ``_moe_wgrad_kernel`` (grouped weight-gradient GEMM over each expert's ragged segment):
  ``dW_out[e] = sum_rows (w * dy[token])^T h`` and ``dW_in[e] = sum_rows dpre^T x[token]``;
  an expert with no rows gets zeros.

Precision: fp32 accumulation (fp64 for fp64 inputs); pre-activations, ``h`` and expert
outputs are rounded to x's dtype where the pure-torch reference rounds them; fp32 ``tl.dot``
uses IEEE products unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

``moe_mlp`` is registered as ``torch.library.custom_op`` ``moekit::moe_mlp_fwd`` /
``moekit::moe_mlp_bwd`` with fake implementations and ``register_autograd``, so
``torch.compile`` traces through it. GEMM autotuning is keyed on (D, F or H, BM, dtypes) only;
the token-count arguments are ``do_not_specialize``: a new T does not recompile or re-tune
(only a new ``block_m`` bucket, see :func:`pick_block_m`, does). The row-block GEMMs run on a
1-D grid in grouped ("swizzled") order for L2 reuse.

Interpreter only (``TRITON_INTERPRET=1``, bf16): two bugs of Triton 3.9's interpreter are
worked around behind the ``BF16_FIX`` constexpr (see ``_triton_compat.interpreter_bf16_fix``);
compiled kernels never take that branch.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as Fn

from ._triton_compat import (HAS_TRITON, INTERPRET, cdiv, check_runnable, dot_precision, tl,
                             interpreter_bf16_fix, triton)
from .activations import ACTIVATIONS, activation_ref, check_activation
from .align import moe_align, padded_size

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ---------------------------------------------------------------------------------------
# autotune configs: one large-ish config under the interpreter (fewer, bigger programs, but
# small enough that the K loops and edge masks run several iterations in tests)
# ---------------------------------------------------------------------------------------
def _gemm_configs():
    if not HAS_TRITON:
        return []
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bn, bk, w, s in [(64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 4), (128, 64, 8, 3),
                                 (128, 128, 8, 3), (256, 64, 8, 3)]]


def _wgrad_configs():
    if not HAS_TRITON:
        return []
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_R": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, num_warps=w, num_stages=s)
            for bm, bn, br, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 4, 4), (128, 128, 32, 8, 3),
                                     (128, 128, 64, 8, 3), (64, 128, 64, 4, 4)]]


def smem_estimate(block_m: int, block_n: int, block_k: int, stages: int, n_weight_tiles: int, elem_bytes: int) -> int:
    """Shared memory of a pipelined row-block GEMM: per stage one [BM, BK] activation tile and
    ``n_weight_tiles`` [BK, BN] weight tiles (2 for the GLU forward: gate and up)."""
    return stages * (block_m * block_k + n_weight_tiles * block_k * block_n) * elem_bytes


def _smem_limit(device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def _prune_by_smem(n_weight_tiles_arg: str = ""):
    """early_config_prune for the row-block GEMMs: drop configs whose pipelined tiles cannot
    fit the device's shared memory (keeps the smallest config if none fits)."""
    def prune(configs, named_args, **kwargs):
        ref = next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
        if ref is None or ref.device.type != "cuda":
            return configs
        limit = _smem_limit(ref.device)
        bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
        n_w = 2 if (n_weight_tiles_arg and kwargs.get(n_weight_tiles_arg, False)) else 1
        fits = [c for c in configs
                if smem_estimate(bm, c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, n_w,
                                 ref.element_size()) <= limit]
        return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] * c.num_stages)]
    return {"early_config_prune": prune}


def _combine_blocks(T: int, D: int) -> Tuple[int, int]:
    if INTERPRET:
        return 64, 128
    return 16, min(1024, max(64, triton.next_power_of_2(D)))


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _cast(x, DT: tl.constexpr, BF16_FIX: tl.constexpr):
    """x.to(DT). With BF16_FIX (interpreter + bf16 only): round-to-nearest-even by hand, since
    Triton 3.9's interpreter truncates fp32 -> bf16 (compiled Triton rounds to nearest even).
    Call sites read ``_cast(x, DT, True) if BF16_FIX else x.to(DT)`` so that the nested call
    (costly in the interpreter) only happens on the bf16 interpreter path."""
    if BF16_FIX:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DT)
    return out


# Activation math, written inline in each kernel (the interpreter re-patches triton.language on
# every call of a nested @triton.jit function, tl.sigmoid / tl.cdiv included, which made such
# calls the dominant CPU cost in tests):
#   ACT 0 silu: g * sigmoid(g);  d/dg = s * (1 + g * (1 - s))
#   ACT 1 gelu (erf): 0.5 g (1 + erf(g / sqrt 2));  d/dg = 0.5 (1 + erf(g / sqrt 2)) + g * phi(g)
#   ACT 2 relu: max(g, 0);  d/dg = 1 if g > 0 else 0 (torch's convention at 0)


@triton.autotune(configs=_gemm_configs(), key=["D", "F", "BLOCK_M"], prune_configs_by=_prune_by_smem("GLU"))
@triton.jit(do_not_specialize=["n_slots", "n_blocks"])
def _moe_gemm_in_kernel(
    x_ptr, w_ptr, pre_ptr, h_ptr, padded_slots_ptr, block_expert_ptr,
    n_slots, n_blocks, D, F,
    stride_xt, stride_we, stride_wh, stride_pre, stride_h,
    TOPK: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, SAVE_PRE: tl.constexpr,
    BF16_FIX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped ("swizzled") order over a 1-D grid: GROUP_M row blocks sweep all column tiles
    # together, so their token rows and the expert's weight tiles are reused from L2
    pid = tl.program_id(0)
    n_tiles_n = (F + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < n_slots
    tok = (slots // TOPK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wmask = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wh + offs_k[:, None], mask=wmask, other=0.0)
        if BF16_FIX:
            acc_g = tl.dot(a.to(tl.float32), wg.to(tl.float32), acc_g, input_precision=PREC)
        else:
            acc_g = tl.dot(a, wg, acc_g, input_precision=PREC)
        if GLU:
            wu = tl.load(w_base + (offs_n + F)[None, :].to(tl.int64) * stride_wh + offs_k[:, None],
                         mask=wmask, other=0.0)
            if BF16_FIX:
                acc_u = tl.dot(a.to(tl.float32), wu.to(tl.float32), acc_u, input_precision=PREC)
            else:
                acc_u = tl.dot(a, wu, acc_u, input_precision=PREC)
    OUT_T = h_ptr.dtype.element_ty
    g = (_cast(acc_g, OUT_T, True) if BF16_FIX else acc_g.to(OUT_T)).to(ACC)
    if ACT == 0:
        h = g * (1.0 / (1.0 + tl.exp(-g)))
    elif ACT == 1:
        h = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        h = tl.maximum(g, 0.0)
    if GLU:
        u = (_cast(acc_u, OUT_T, True) if BF16_FIX else acc_u.to(OUT_T)).to(ACC)
        h = h * u
    rows = offs_m.to(tl.int64)
    h_out = _cast(h, OUT_T, True) if BF16_FIX else h.to(OUT_T)
    tl.store(h_ptr + rows[:, None] * stride_h + offs_n[None, :], h_out, mask=n_ok[None, :])
    if SAVE_PRE:
        tl.store(pre_ptr + rows[:, None] * stride_pre + offs_n[None, :], g.to(OUT_T), mask=n_ok[None, :])
        if GLU:
            tl.store(pre_ptr + rows[:, None] * stride_pre + F + offs_n[None, :], u.to(OUT_T), mask=n_ok[None, :])


@triton.autotune(configs=_gemm_configs(), key=["NOUT", "KD", "BLOCK_M", "HAS_SCALE"],
                 prune_configs_by=_prune_by_smem())
@triton.jit(do_not_specialize=["n_slots", "n_blocks"])
def _moe_gemm_out_kernel(
    l_ptr, w_ptr, scale_ptr, out_ptr, padded_slots_ptr, block_expert_ptr,
    n_slots, n_blocks, NOUT, KD,
    stride_l, stride_we, stride_wn, stride_wk, stride_out,
    HAS_SCALE: tl.constexpr, BF16_FIX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[slot, n] = scale[slot] * sum_k L[row, k] * W[e, n, k] for the rows of one block
    (rows in padded order, results scattered to their slot rows; each slot written once)."""
    # grouped ("swizzled") order over a 1-D grid: GROUP_M row blocks sweep all column tiles
    # together, so their token rows and the expert's weight tiles are reused from L2
    pid = tl.program_id(0)
    n_tiles_n = (NOUT + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < n_slots
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < NOUT
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, KD, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < KD
        a = tl.load(l_ptr + rows[:, None] * stride_l + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None].to(tl.int64) * stride_wk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BF16_FIX:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
    OUT_T = out_ptr.dtype.element_ty
    o = _cast(acc, OUT_T, True) if BF16_FIX else acc.to(OUT_T)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + slots, mask=row_ok, other=0.0)
        o = o.to(ACC) * sc.to(ACC)[:, None]
        o = _cast(o, OUT_T, True) if BF16_FIX else o.to(OUT_T)
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_out + offs_n[None, :], o,
             mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(src_ptr, ids_ptr, out_ptr, T, D, E, stride_src, stride_out,
                    TOPK: tl.constexpr, ACC: tl.constexpr, BF16_FIX: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC)
    for k in tl.static_range(TOPK):
        slot = offs_t.to(tl.int64) * TOPK + k
        idk = tl.load(ids_ptr + slot, mask=t_ok, other=-1)
        ok = t_ok & (idk >= 0) & (idk < E)
        v = tl.load(src_ptr + slot[:, None] * stride_src + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc += v.to(ACC)
    OUT_T = out_ptr.dtype.element_ty
    out = _cast(acc, OUT_T, True) if BF16_FIX else acc.to(OUT_T)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_out + offs_d[None, :], out,
             mask=t_ok[:, None] & d_ok[None, :])


# reset_to_zero: the number of F tiles (rows of dwp written) depends on the config, so the
# autotuner zeroes dwp before each benchmark run and before the final run
@triton.autotune(configs=_gemm_configs(), key=["D", "F", "BLOCK_M"], reset_to_zero=["dwp_ptr"],
                 prune_configs_by=_prune_by_smem())
@triton.jit(do_not_specialize=["n_slots", "n_blocks"])
def _moe_gemm_dh_kernel(
    dy_ptr, w_ptr, pre_ptr, scale_ptr, dpre_ptr, dwp_ptr, padded_slots_ptr, block_expert_ptr,
    n_slots, n_blocks, D, F,
    stride_dyt, stride_we, stride_wd, stride_pre, stride_dpre,
    TOPK: tl.constexpr, GLU: tl.constexpr, ACT: tl.constexpr, NEED_DW: tl.constexpr,
    BF16_FIX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """g = dy[token] @ W_out[e] ([BM, BLOCK_N] of F); dw partial = <g, h>; dpre = act'(...)."""
    # grouped ("swizzled") order over a 1-D grid: GROUP_M row blocks sweep all column tiles
    # together, so their token rows and the expert's weight tiles are reused from L2
    pid = tl.program_id(0)
    n_tiles_n = (F + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * n_tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(padded_slots_ptr + offs_m)
    row_ok = slots < n_slots
    tok = (slots // TOPK).to(tl.int64)
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < F
    w_base = w_ptr + e.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(dy_ptr + tok[:, None] * stride_dyt + offs_k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_base + offs_k[:, None].to(tl.int64) * stride_wd + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BF16_FIX:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(a, b, acc, input_precision=PREC)
    OUT_T = dpre_ptr.dtype.element_ty
    m2 = row_ok[:, None] & n_ok[None, :]
    gate = tl.load(pre_ptr + rows[:, None] * stride_pre + offs_n[None, :], mask=m2, other=0.0).to(ACC)
    if ACT == 0:
        sg = (1.0 / (1.0 + tl.exp(-gate)))
        act = gate * sg
        dact = sg * (1.0 + gate * (1.0 - sg))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476))
        act = gate * cdf
        dact = cdf + gate * 0.3989422804014327 * tl.exp(-0.5 * gate * gate)
    else:
        act = tl.maximum(gate, 0.0)
        dact = tl.where(gate > 0, 1.0, 0.0).to(ACC)
    if GLU:
        up = tl.load(pre_ptr + rows[:, None] * stride_pre + F + offs_n[None, :], mask=m2, other=0.0).to(ACC)
        h = act * up
        h = (_cast(h, OUT_T, True) if BF16_FIX else h.to(OUT_T)).to(ACC)
    else:
        h = (_cast(act, OUT_T, True) if BF16_FIX else act.to(OUT_T)).to(ACC)
    if NEED_DW:
        dwp = tl.sum(acc * h, axis=1)
        tl.store(dwp_ptr + pid_n.to(tl.int64) * n_slots + slots, dwp, mask=row_ok)
    sc = tl.load(scale_ptr + slots, mask=row_ok, other=0.0).to(ACC)
    dh = acc * sc[:, None]
    dgate = dh * up * dact if GLU else dh * dact
    dgate = _cast(dgate, OUT_T, True) if BF16_FIX else dgate.to(OUT_T)
    tl.store(dpre_ptr + rows[:, None] * stride_dpre + offs_n[None, :], dgate, mask=n_ok[None, :])
    if GLU:
        dup = dh * act
        dup = _cast(dup, OUT_T, True) if BF16_FIX else dup.to(OUT_T)
        tl.store(dpre_ptr + rows[:, None] * stride_dpre + F + offs_n[None, :], dup, mask=n_ok[None, :])


@triton.autotune(configs=_wgrad_configs(), key=["M", "NN", "A_GATHER", "HAS_SCALE"])
@triton.jit(do_not_specialize=["n_slots"])
def _moe_wgrad_kernel(
    a_ptr, b_ptr, scale_ptr, out_ptr, padded_slots_ptr, poff_ptr, tpe_ptr,
    n_slots, M, NN,
    stride_a, stride_b, stride_oe, stride_om,
    TOPK: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    BF16_FIX: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[e, m, n] = sum over the rows r of expert e: A[r, m] * B[r, n] (A optionally scaled
    per row; A / B rows either padded rows or gathered token rows)."""
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(poff_ptr + e)
    cnt = tl.load(tpe_ptr + e)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < NN
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for r0 in range(0, cnt, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_ok = offs_r < cnt
        rows = start + offs_r
        slots = tl.load(padded_slots_ptr + rows, mask=r_ok, other=0)
        if A_GATHER:
            ia = (slots // TOPK).to(tl.int64)
        else:
            ia = rows.to(tl.int64)
        if B_GATHER:
            ib = (slots // TOPK).to(tl.int64)
        else:
            ib = rows.to(tl.int64)
        a = tl.load(a_ptr + ia[:, None] * stride_a + offs_m[None, :], mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        if HAS_SCALE:
            sc = tl.load(scale_ptr + slots, mask=r_ok, other=0.0)
            a_dt = a.dtype
            a = a.to(ACC) * sc.to(ACC)[:, None]
            a = _cast(a, a_dt, True) if BF16_FIX else a.to(a_dt)
        b = tl.load(b_ptr + ib[:, None] * stride_b + offs_n[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        if BF16_FIX:
            acc = tl.dot(tl.trans(a).to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
        else:
            acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    OUT_T = out_ptr.dtype.element_ty
    out = _cast(acc, OUT_T, True) if BF16_FIX else acc.to(OUT_T)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :],
             out, mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------
# validation and launchers
# ---------------------------------------------------------------------------------------
def _validate(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation):
    for name, t in (("x_TD", x_TD), ("topk_ids_TK", topk_ids_TK), ("topk_weights_TK", topk_weights_TK),
                    ("w_in_EHD", w_in_EHD), ("w_out_EDF", w_out_EDF)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_activation(activation)
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD must be [T, D], got shape {tuple(x_TD.shape)}")
    if x_TD.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x_TD must be float32/bfloat16/float16 (or float64), got {x_TD.dtype}")
    T, D = x_TD.shape
    if topk_ids_TK.dim() != 2 or topk_ids_TK.shape[0] != T:
        raise ValueError(f"topk_ids_TK must be [T={T}, K], got shape {tuple(topk_ids_TK.shape)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids_TK must be int32 or int64, got {topk_ids_TK.dtype}")
    K = topk_ids_TK.shape[1]
    if K < 1:
        raise ValueError("topk_ids_TK must have K >= 1 columns")
    if tuple(topk_weights_TK.shape) != (T, K):
        raise ValueError(f"topk_weights_TK must be [T={T}, K={K}], got shape {tuple(topk_weights_TK.shape)}")
    if not topk_weights_TK.is_floating_point():
        raise ValueError(f"topk_weights_TK must be floating point, got {topk_weights_TK.dtype}")
    if w_in_EHD.dim() != 3 or w_in_EHD.shape[2] != D:
        raise ValueError(f"w_in_EHD must be [E, H, D={D}], got shape {tuple(w_in_EHD.shape)}")
    E, H = w_in_EHD.shape[0], w_in_EHD.shape[1]
    if w_out_EDF.dim() != 3 or w_out_EDF.shape[0] != E or w_out_EDF.shape[1] != D:
        raise ValueError(f"w_out_EDF must be [E={E}, D={D}, F], got shape {tuple(w_out_EDF.shape)}")
    F = w_out_EDF.shape[2]
    glu = ACTIVATIONS[activation].glu
    if H != (2 * F if glu else F):
        raise ValueError(f"w_in_EHD has H={H} rows but activation={activation!r} with F={F} needs "
                         f"H={2 * F if glu else F} ({'gate rows then up rows' if glu else 'H = F'})")
    if E < 1 or F < 1 or D < 1:
        raise ValueError(f"empty expert weights: E={E}, D={D}, F={F}")
    if w_in_EHD.dtype != x_TD.dtype or w_out_EDF.dtype != x_TD.dtype:
        raise ValueError(f"x_TD, w_in_EHD, w_out_EDF must share one dtype, got "
                         f"{x_TD.dtype}, {w_in_EHD.dtype}, {w_out_EDF.dtype}")
    return T, D, E, H, F, K


def pick_block_m(n_slots: int, num_experts: int) -> int:
    """BM of the padded layout: small blocks when experts see few rows (decode), larger
    ones for prefill/training. (Untuned guess: no GPU was available when it was written.)"""
    if INTERPRET:
        return 16
    avg = n_slots // max(1, num_experts)
    if avg <= 16:
        return 16
    if avg <= 64:
        return 32
    return 64


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _fwd_impl(x, ids, w, w_in, w_out, activation: str, block_m: int, save_pre: bool):
    T, D = x.shape
    E, H, _ = w_in.shape
    F = w_out.shape[2]
    K = ids.shape[1]
    N = T * K
    glu, act = ACTIVATIONS[activation].glu, ACTIVATIONS[activation].code
    dev, dt = x.device, x.dtype
    lay = moe_align(ids, E, block_m)
    P = lay.padded_slots_P.numel()
    B = lay.block_expert_B.numel()
    h = torch.empty(P, F, dtype=dt, device=dev)
    pre = torch.empty(P if save_pre else 0, H, dtype=dt, device=dev)
    y = torch.empty(T, D, dtype=dt, device=dev)
    if T == 0:
        return y, h, pre, lay
    common = dict(BF16_FIX=interpreter_bf16_fix(dt), PREC=dot_precision(dt), ACC=_tl_acc(dt))
    _moe_gemm_in_kernel[lambda META: (B * cdiv(F, META["BLOCK_N"]),)](
        x, w_in, pre if save_pre else h, h, lay.padded_slots_P, lay.block_expert_B,
        N, B, D, F, x.stride(0), w_in.stride(0), w_in.stride(1), H, F,
        TOPK=K, GLU=glu, ACT=act, SAVE_PRE=save_pre, BLOCK_M=block_m, **common)
    y_slot = torch.empty(N, D, dtype=dt, device=dev)
    scale = w.reshape(-1).to(dt).contiguous()
    _moe_gemm_out_kernel[lambda META: (B * cdiv(D, META["BLOCK_N"]),)](
        h, w_out, scale, y_slot, lay.padded_slots_P, lay.block_expert_B,
        N, B, D, F, F, w_out.stride(0), w_out.stride(1), w_out.stride(2), D,
        HAS_SCALE=True, BLOCK_M=block_m, **common)
    _combine(y_slot, ids, y, E)
    return y, h, pre, lay


def _combine(src_ND, ids, out_TD, E):
    T, D = out_TD.shape
    BT, BD = _combine_blocks(T, D)
    _combine_kernel[(cdiv(T, BT), cdiv(D, BD))](
        src_ND, ids, out_TD, T, D, E, src_ND.stride(0), out_TD.stride(0),
        TOPK=ids.shape[1], ACC=_tl_acc(out_TD.dtype), BF16_FIX=interpreter_bf16_fix(out_TD.dtype),
        BLOCK_T=BT, BLOCK_D=BD)


def _bwd_impl(dy, x, ids, w, w_in, w_out, h, pre, padded_slots, block_expert, padded_offsets,
              tokens_per_expert, activation: str, block_m: int, needs: List[bool]):
    T, D = x.shape
    E, H, _ = w_in.shape
    F = w_out.shape[2]
    K = ids.shape[1]
    N = T * K
    glu, act = ACTIVATIONS[activation].glu, ACTIVATIONS[activation].code
    dev, dt = x.device, x.dtype
    need_x, need_w, need_win, need_wout = needs
    # every element of dx / dw_in / dw_out is written by a kernel (experts without rows get
    # zeros from the weight-gradient kernel), so no memset of the (large) weight grads
    alloc = torch.zeros if T == 0 else torch.empty
    dx = alloc(x.shape, dtype=dt, device=dev) if need_x else x.new_empty(0)
    dw = torch.zeros(T, K, dtype=w.dtype, device=dev) if need_w else w.new_empty(0)
    dw_in = alloc(w_in.shape, dtype=dt, device=dev) if need_win else w_in.new_empty(0)
    dw_out = alloc(w_out.shape, dtype=dt, device=dev) if need_wout else w_out.new_empty(0)
    if T == 0:
        return dx, dw, dw_in, dw_out
    B = block_expert.numel()
    common = dict(BF16_FIX=interpreter_bf16_fix(dt), PREC=dot_precision(dt), ACC=_tl_acc(dt))
    scale = w.reshape(-1).to(dt).contiguous()
    dy = dy.contiguous()
    if need_x or need_w or need_win:
        dpre = torch.empty(padded_slots.numel(), H, dtype=dt, device=dev)
        acc_dt = torch.float64 if dt == torch.float64 else torch.float32
        # one partial sum per F tile; the tile count depends on the tuned BLOCK_N, so size
        # the buffer for the smallest BLOCK_N any config uses
        min_bn = min(c.kwargs["BLOCK_N"] for c in _gemm_configs())
        dwp = torch.zeros(cdiv(F, min_bn) if need_w else 1, N if need_w else 1, dtype=acc_dt, device=dev)
        _moe_gemm_dh_kernel[lambda META: (B * cdiv(F, META["BLOCK_N"]),)](
            dy, w_out, pre, scale, dpre, dwp, padded_slots, block_expert,
            N, B, D, F, dy.stride(0), w_out.stride(0), w_out.stride(1), H, H,
            TOPK=K, GLU=glu, ACT=act, NEED_DW=need_w, BLOCK_M=block_m, **common)
        if need_w:
            dw = dwp.sum(0).view(T, K).to(w.dtype)
        if need_x:
            dx_slot = torch.empty(N, D, dtype=dt, device=dev)
            _moe_gemm_out_kernel[lambda META: (B * cdiv(D, META["BLOCK_N"]),)](
                dpre, w_in, scale, dx_slot, padded_slots, block_expert,
                N, B, D, H, H, w_in.stride(0), w_in.stride(2), w_in.stride(1), D,
                HAS_SCALE=False, BLOCK_M=block_m, **common)
            _combine(dx_slot, ids, dx, E)
        if need_win:
            _moe_wgrad_kernel[lambda META: (E, cdiv(H, META["BLOCK_M"]), cdiv(D, META["BLOCK_N"]))](
                dpre, x, scale, dw_in, padded_slots, padded_offsets, tokens_per_expert,
                N, H, D, H, x.stride(0), dw_in.stride(0), dw_in.stride(1),
                TOPK=K, A_GATHER=False, B_GATHER=True, HAS_SCALE=False, **common)
    if need_wout:
        _moe_wgrad_kernel[lambda META: (E, cdiv(D, META["BLOCK_M"]), cdiv(F, META["BLOCK_N"]))](
            dy, h, scale, dw_out, padded_slots, padded_offsets, tokens_per_expert,
            N, D, F, dy.stride(0), F, dw_out.stride(0), dw_out.stride(1),
            TOPK=K, A_GATHER=True, B_GATHER=False, HAS_SCALE=True, **common)
    return dx, dw, dw_in, dw_out


# ---------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile traces through them) + autograd
# ---------------------------------------------------------------------------------------
_Tensor = torch.Tensor


@torch.library.custom_op("moekit::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd_op(x: _Tensor, topk_ids: _Tensor, topk_weights: _Tensor, w_in: _Tensor, w_out: _Tensor,
                    activation: str, block_m: int, save_for_backward: bool
                    ) -> Tuple[_Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor, _Tensor]:
    y, h, pre, lay = _fwd_impl(x, topk_ids, topk_weights, w_in, w_out, activation, block_m, save_for_backward)
    return (y, h, pre, lay.padded_slots_P, lay.block_expert_B, lay.padded_offsets_E1, lay.tokens_per_expert_E)


@_moe_mlp_fwd_op.register_fake
def _(x, topk_ids, topk_weights, w_in, w_out, activation, block_m, save_for_backward):
    T, D = x.shape
    E, H, _ = w_in.shape
    F = w_out.shape[2]
    N = T * topk_ids.shape[1]
    P = padded_size(N, E, block_m)
    i32 = dict(dtype=torch.int32, device=x.device)
    return (x.new_empty(T, D), x.new_empty(P, F), x.new_empty(P if save_for_backward else 0, H),
            torch.empty(P, **i32), torch.empty(P // block_m, **i32), torch.empty(E + 1, **i32),
            torch.empty(E, **i32))


@torch.library.custom_op("moekit::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(dy: _Tensor, x: _Tensor, topk_ids: _Tensor, topk_weights: _Tensor, w_in: _Tensor,
                    w_out: _Tensor, h: _Tensor, pre: _Tensor, padded_slots: _Tensor, block_expert: _Tensor,
                    padded_offsets: _Tensor, tokens_per_expert: _Tensor, activation: str, block_m: int,
                    needs: List[bool]) -> Tuple[_Tensor, _Tensor, _Tensor, _Tensor]:
    return _bwd_impl(dy, x, topk_ids, topk_weights, w_in, w_out, h, pre, padded_slots, block_expert,
                     padded_offsets, tokens_per_expert, activation, block_m, list(needs))


@_moe_mlp_bwd_op.register_fake
def _(dy, x, topk_ids, topk_weights, w_in, w_out, h, pre, padded_slots, block_expert, padded_offsets,
      tokens_per_expert, activation, block_m, needs):
    need_x, need_w, need_win, need_wout = needs
    return (torch.empty_like(x) if need_x else x.new_empty(0),
            topk_weights.new_empty(topk_weights.shape) if need_w else topk_weights.new_empty(0),
            torch.empty_like(w_in) if need_win else w_in.new_empty(0),
            torch.empty_like(w_out) if need_wout else w_out.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, topk_ids, topk_weights, w_in, w_out, activation, block_m, save = inputs
    _y, h, pre, padded_slots, block_expert, padded_offsets, tpe = output
    ctx.save_for_backward(x, topk_ids, topk_weights, w_in, w_out, h, pre, padded_slots, block_expert,
                          padded_offsets, tpe)
    ctx.activation, ctx.block_m, ctx.saved_pre = activation, block_m, save


def _backward(ctx, dy, *_unused):
    (x, topk_ids, topk_weights, w_in, w_out, h, pre, padded_slots, block_expert, padded_offsets,
     tpe) = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in (0, 2, 3, 4)]
    if not any(needs):
        return (None,) * 8
    if not ctx.saved_pre:
        raise RuntimeError("moe_mlp: backward through a forward that did not save activations "
                           "(grad mode changed between forward and backward)")
    dx, dw, dw_in, dw_out = torch.ops.moekit.moe_mlp_bwd(
        dy.contiguous(), x, topk_ids, topk_weights, w_in, w_out, h, pre, padded_slots, block_expert,
        padded_offsets, tpe, ctx.activation, ctx.block_m, needs)
    return (dx if needs[0] else None, None, dw if needs[1] else None, dw_in if needs[2] else None,
            dw_out if needs[3] else None, None, None, None)


torch.library.register_autograd("moekit::moe_mlp_fwd", _backward, setup_context=_setup_context)


def moe_mlp(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
            w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    """Fused grouped expert MLP with Triton kernels; see the module docstring.

    Differentiable w.r.t. x_TD, topk_weights_TK, w_in_EHD, w_out_EDF. CUDA tensors run the
    compiled kernels; CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1
    was set before the first call, and raise otherwise (call :func:`moe_mlp_ref` for the
    pure-torch path). Ids outside [0, E) (e.g. -1 for dropped slots) contribute nothing.
    """
    T, D, E, H, F, K = _validate(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation)
    check_runnable(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, op="moe_mlp")
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x_TD, topk_weights_TK, w_in_EHD, w_out_EDF))
    block_m = pick_block_m(T * K, E)
    out = torch.ops.moekit.moe_mlp_fwd(
        x_TD.contiguous(), topk_ids_TK.contiguous(), topk_weights_TK.contiguous(), w_in_EHD.contiguous(),
        w_out_EDF.contiguous(), activation, block_m, needs_grad)
    return out[0]


def moe_mlp_sorted(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, w_in_EHD: torch.Tensor,
                   w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    """The grouped expert MLP on rows already sorted by expert (what a token dispatcher hands
    to the experts): rows ``[sum(counts[:e]), sum(counts[:e+1]))`` of ``x_ND [N, D]`` go to expert
    ``e``; returns ``y_ND [N, D]`` unweighted, in the same row order.

    The same kernels as :func:`moe_mlp`, with each row its own "token" routed to one expert
    with weight 1 (exact: x * 1 and a one-term combine round nothing). ``tokens_per_expert_E``
    (int [E]) must sum to N; that is checked where it costs no device sync (CPU tensors).
    Differentiable w.r.t. ``x_ND``, ``w_in_EHD`` and ``w_out_EDF``.
    """
    if not isinstance(tokens_per_expert_E, torch.Tensor) or tokens_per_expert_E.dim() != 1:
        raise ValueError("tokens_per_expert_E must be a 1-D integer tensor [E]")
    if tokens_per_expert_E.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens_per_expert_E must be int32 or int64, got {tokens_per_expert_E.dtype}")
    E = w_in_EHD.shape[0] if isinstance(w_in_EHD, torch.Tensor) and w_in_EHD.dim() == 3 else None
    if E is not None and tokens_per_expert_E.numel() != E:
        raise ValueError(f"tokens_per_expert_E has {tokens_per_expert_E.numel()} entries for E={E} experts")
    N = x_ND.shape[0] if isinstance(x_ND, torch.Tensor) and x_ND.dim() == 2 else None
    if N is not None and tokens_per_expert_E.device.type == "cpu" and int(tokens_per_expert_E.sum()) != N:
        raise ValueError(f"tokens_per_expert_E sums to {int(tokens_per_expert_E.sum())}, but x_ND has {N} rows")
    dev = x_ND.device if isinstance(x_ND, torch.Tensor) else None
    ids_N1 = torch.repeat_interleave(torch.arange(tokens_per_expert_E.numel(), device=dev),
                                     tokens_per_expert_E.to(dev), output_size=N).unsqueeze(1)
    ones_N1 = torch.ones(N if N is not None else 0, 1, dtype=torch.float32, device=dev)
    return moe_mlp(x_ND, ids_N1, ones_N1, w_in_EHD, w_out_EDF, activation)


# ---------------------------------------------------------------------------------------
# pure-torch reference (tests, benchmarks, CPU fallback)
# ---------------------------------------------------------------------------------------
def moe_mlp_ref(x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor,
                w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, activation: str) -> torch.Tensor:
    """Pure-torch reference of :func:`moe_mlp` (one matmul pair per expert; autograd-able).

    Rounds where the kernels round: expert outputs in x's dtype times the routing weight
    cast to x's dtype, accumulated over K in fp32 (fp64 for fp64), cast to x's dtype."""
    T, D, E, H, F, K = _validate(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation)
    acc_dt = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    y = x_TD.new_zeros(T, D, dtype=acc_dt)
    ids = topk_ids_TK.reshape(-1).long()
    wx = topk_weights_TK.reshape(-1).to(x_TD.dtype)
    for e in range(E):
        slots = (ids == e).nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        tok = slots // K
        h = activation_ref(x_TD[tok] @ w_in_EHD[e].t(), activation)
        o = h @ w_out_EDF[e].t()
        y = y.index_add(0, tok, (o * wx[slots, None]).to(acc_dt))
    return y.to(x_TD.dtype)
