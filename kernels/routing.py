"""Fused router epilogue: scores -> (group-limited) top-k -> weights, plus per-expert counts.

Legend: T tokens, E experts, K top-k, G expert groups (``n_group``).

Semantics (identical in ``_route_topk_kernel`` and ``route_topk_ref``; fp32 throughout):

* ``score_func="softmax"`` (Mixtral / Qwen / OLMoE): ``s = softmax(fp32 logits)``,
  selection score ``c = s`` (+ ``bias_E`` if given).
* ``score_func="sigmoid"`` (DeepSeek-V3): ``s = sigmoid(fp32 logits)``, ``c = s + bias_E``.
* ``score_func="softmax_topk"`` (Megatron "topk before softmax", GPT-OSS): ``s = c = fp32
  logits`` (+ bias); the weights are the softmax over the K selected logits (so they sum to
  1 and ``renormalize`` changes nothing).
* ``n_group > 1``: experts are split into G contiguous groups of E/G; a group scores the
  sum of its two largest ``c``; only the best ``topk_group`` groups stay eligible, the
  other experts' ``c`` is set to ``-inf``.
* ``topk_ids = top-k of c`` (descending; **ties go to the lower expert index**, and among
  groups with equal scores to the lower group index), ``topk_weights = s[topk_ids]`` (the
  *unbiased* score), renormalised to sum 1 when ``renormalize`` (softmax: ``w / sum w``;
  sigmoid: ``w / (sum w + 1e-20)``), then multiplied by ``scaling_factor``.
* ``counts_E[e]`` = number of (token, slot) pairs routed to e (sums to T*K).

Outputs: ``topk_ids_TK`` int32, ``topk_weights_TK`` float32, ``counts_E`` int32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._triton_compat import check_runnable, next_pow2, tl, triton
from .topk import SCORE_FUNCS, _validate, route_topk_ref  # noqa: F401  (route_topk_ref: the twin)


@triton.jit(do_not_specialize=["T"])
def _route_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, w_ptr, counts_ptr,
    T, E, stride_t, scale,
    K: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, RENORM: tl.constexpr, EPS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    t_ok = offs_t < T
    e_ok = offs_e < E
    ok = t_ok[:, None] & e_ok[None, :]
    neg_inf = float("-inf")

    logits = tl.load(logits_ptr + offs_t.to(tl.int64)[:, None] * stride_t + offs_e[None, :],
                     mask=ok, other=neg_inf).to(tl.float32)
    if SCORE == 1:  # sigmoid
        s = tl.where(ok, tl.sigmoid(logits), 0.0)
    elif SCORE == 2:  # softmax_topk: select on the raw logits, softmax over the selected K
        s = logits
    else:  # softmax
        row_max = tl.max(logits, axis=1)
        row_max = tl.where(t_ok, row_max, 0.0)
        p = tl.where(ok, tl.exp(logits - row_max[:, None]), 0.0)
        denom = tl.sum(p, axis=1)
        denom = tl.where(t_ok, denom, 1.0)
        s = p / denom[:, None]
    c = s
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
        c = c + bias[None, :]
    c = tl.where(e_ok[None, :], c, neg_inf)

    if N_GROUP > 1:
        group_size = E // N_GROUP
        gid = offs_e // group_size
        gscore = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for g in tl.static_range(N_GROUP):
            in_g = (gid == g)[None, :] & e_ok[None, :]
            v = tl.where(in_g, c, neg_inf)
            m1 = tl.max(v, axis=1)
            i1 = tl.min(tl.where(v == m1[:, None], offs_e[None, :], BLOCK_E), axis=1)
            v2 = tl.where(offs_e[None, :] == i1[:, None], neg_inf, v)
            m2 = tl.max(v2, axis=1)
            gscore = tl.where(in_g, (m1 + m2)[:, None], gscore)
        gscore = tl.where(e_ok[None, :], gscore, neg_inf)
        keep = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int1)
        for _j in tl.static_range(TOPK_GROUP):
            left = tl.where(keep, neg_inf, gscore)
            mg = tl.max(left, axis=1)
            cand = (left == mg[:, None]) & e_ok[None, :] & (keep == 0)
            first = tl.min(tl.where(cand, offs_e[None, :], BLOCK_E), axis=1)
            gsel = first // group_size
            keep = keep | (gid[None, :] == gsel[:, None])
        c = tl.where(keep, c, neg_inf)

    ids_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    w_tile = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_T], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_E], dtype=tl.int32)
    for k in tl.static_range(K):
        mk = tl.max(c, axis=1)
        ik = tl.min(tl.where(c == mk[:, None], offs_e[None, :], BLOCK_E), axis=1)
        ik = tl.minimum(ik, E - 1)  # only reachable for NaN rows
        hit = offs_e[None, :] == ik[:, None]
        wk = tl.sum(tl.where(hit, s, 0.0), axis=1)
        ids_tile = tl.where(offs_k[None, :] == k, ik[:, None], ids_tile)
        w_tile = tl.where(offs_k[None, :] == k, wk[:, None], w_tile)
        wsum += wk
        c = tl.where(hit, neg_inf, c)
        cnt += tl.sum((hit & t_ok[:, None]).to(tl.int32), axis=0)
    if SCORE == 2:
        k_ok = offs_k[None, :] < K
        top = tl.max(tl.where(k_ok, w_tile, float("-inf")), axis=1)
        top = tl.where(t_ok, top, 0.0)
        ex = tl.where(k_ok, tl.exp(w_tile - top[:, None]), 0.0)
        w_tile = ex / tl.where(t_ok, tl.sum(ex, axis=1), 1.0)[:, None]
    elif RENORM:
        w_tile = w_tile / tl.where(t_ok, wsum + EPS, 1.0)[:, None]
    w_tile = w_tile * scale
    out_ok = t_ok[:, None] & (offs_k[None, :] < K)
    out_off = offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ids_ptr + out_off, ids_tile, mask=out_ok)
    tl.store(w_ptr + out_off, w_tile, mask=out_ok)
    tl.atomic_add(counts_ptr + offs_e, cnt, mask=e_ok)


def route_topk(logits_TE: torch.Tensor, top_k: int, *, score_func: str = "softmax",
               bias_E: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
               renormalize: bool = True, scaling_factor: float = 1.0,
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused top-k routing (one Triton pass). Returns ``(topk_ids_TK int32, topk_weights_TK
    float32, counts_E int32)``; see the module docstring for the exact semantics.
    Not differentiable (the router's autograd runs on the torch side). Registered as the
    custom op ``moekit::route_topk`` (traceable by torch.compile)."""
    _validate(logits_TE, top_k, score_func, bias_E, n_group, topk_group, scaling_factor)
    check_runnable(*([logits_TE] + ([bias_E] if bias_E is not None else [])), op="route_topk")
    return torch.ops.moekit.route_topk(logits_TE.detach(), None if bias_E is None else bias_E.detach(), top_k,
                                       score_func, n_group, topk_group, bool(renormalize), float(scaling_factor))


@torch.library.custom_op("moekit::route_topk", mutates_args=())
def _route_topk_op(logits_TE: torch.Tensor, bias_E: Optional[torch.Tensor], top_k: int, score_func: str,
                   n_group: int, topk_group: int, renormalize: bool, scaling_factor: float
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits_TE.shape
    dev = logits_TE.device
    ids = torch.empty(T, top_k, dtype=torch.int32, device=dev)
    w = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    counts = torch.zeros(E, dtype=torch.int32, device=dev)
    if T == 0:
        return ids, w, counts
    logits = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    bias = bias_E.float().contiguous() if bias_E is not None else counts  # dummy pointer when absent
    BLOCK_E = next_pow2(E)
    BLOCK_T = max(1, min(64, 4096 // BLOCK_E, next_pow2(T)))
    sigmoid = score_func == "sigmoid"
    _route_topk_kernel[(triton.cdiv(T, BLOCK_T),)](
        logits, bias, ids, w, counts, T, E, logits.stride(0), float(scaling_factor),
        K=top_k, SCORE=SCORE_FUNCS.index(score_func), HAS_BIAS=bias_E is not None, N_GROUP=n_group,
        TOPK_GROUP=topk_group, RENORM=bool(renormalize), EPS=1e-20 if sigmoid else 0.0,
        BLOCK_T=BLOCK_T, BLOCK_E=BLOCK_E, BLOCK_K=next_pow2(top_k))
    return ids, w, counts


@_route_topk_op.register_fake
def _(logits_TE, bias_E, top_k, score_func, n_group, topk_group, renormalize, scaling_factor):
    T, E = logits_TE.shape
    dev = logits_TE.device
    return (torch.empty(T, top_k, dtype=torch.int32, device=dev),
            torch.empty(T, top_k, dtype=torch.float32, device=dev),
            torch.empty(E, dtype=torch.int32, device=dev))
