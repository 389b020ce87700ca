"""Routers: logits in fp32 -> top-k expert ids and weights (a :class:`Routing`).

Legend: T tokens, D model dim, E experts, K top-k, B batch, S sequence length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.kernels.topk import select_topk


@dataclass
class Routing:
    """What the router decided for T tokens.

    topk_ids_TK: int64 [T, K] expert ids; ``-1`` marks a slot dropped by capacity.
    topk_weights_TK: fp32 [T, K] combine weights (0 where dropped).
    logits_TE: fp32 [T, E] raw router logits (after noise, before bias).
    scores_TE: fp32 [T, E] softmax probabilities or sigmoid scores (the aux loss's ``P``).
    tokens_per_expert_E: int64 [E] kept assignments per expert (counted once, by the router,
        and kept up to date by whoever drops or remaps assignments).
    num_dropped: assignments marked ``-1`` (a host int: the sizes downstream depend on it).
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_dropped: int = 0

    @property
    def num_tokens(self) -> int:
        return self.topk_ids_TK.shape[0]


class TopKRouter(nn.Module):
    """Linear gate ``[E, D]`` + top-k selection, computed in fp32 whatever the input dtype.

    Parameters: ``weight [E, D]`` (and ``bias [E]`` with ``router_bias``); buffer
    ``e_score_correction_bias [E]`` (fp32, with ``score_correction_bias``) that only
    changes which experts are selected, never the weights (DeepSeek-V3).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        E, D = config.num_experts, config.hidden_size
        self.weight = nn.Parameter(torch.empty(E, D))
        self.bias = nn.Parameter(torch.zeros(E)) if config.router_bias else None
        if config.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        nn.init.normal_(self.weight, std=config.init_std)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 logits [T, E], checked for NaN/inf as ``config.check_logits`` says."""
        bias = self.bias.float() if self.bias is not None else None
        logits_TE = F.linear(x_TD.float(), self.weight.float(), bias)
        _check_finite(logits_TE, self.config.check_logits)
        if self.training and self.config.router_logit_noise > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.config.router_logit_noise
        return logits_TE

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """x_TD: [T, D] -> Routing (no capacity applied yet)."""
        cfg = self.config
        logits_TE = self.compute_logits(x_TD)
        score_func = "sigmoid" if cfg.router == "sigmoid" else "softmax_topk" if cfg.topk_before_softmax else "softmax"
        scores_TE, ids_TK, weights_TK = select_topk(
            logits_TE, cfg.top_k, score_func=score_func, bias_E=self.e_score_correction_bias,
            n_group=cfg.n_group, topk_group=cfg.topk_group, renormalize=cfg.norm_topk_prob,
            scaling_factor=cfg.routed_scaling_factor)
        if score_func == "softmax_topk":  # selection ran on raw logits; the aux loss's P is the softmax
            scores_TE = logits_TE.softmax(dim=-1)
        return Routing(ids_TK, weights_TK, logits_TE, scores_TE, count_per_expert(ids_TK, cfg.num_experts))


def count_per_expert(topk_ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 [E] assignments per expert, ids of -1 ignored. A scatter-add of ones: unlike
    ``torch.bincount`` it needs no host sync on CUDA (exact: integer sums)."""
    ids = topk_ids_TK.reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=ids.device)
    counts.index_add_(0, ids.long() + 1, torch.ones_like(ids, dtype=torch.long))  # slot 0 takes the -1s
    return counts[1:]


def _check_finite(logits_TE: torch.Tensor, mode: str) -> None:
    """The router's NaN/inf guard (see ``MoEConfig.check_logits``): a diverged model fails
    loudly, without a host sync per layer where one would cost a device round trip."""
    if mode == "off" or logits_TE.numel() == 0:
        return
    if mode == "auto":
        mode = "sync" if logits_TE.device.type == "cpu" and not torch.compiler.is_compiling() else "async"
    if mode == "async":
        torch._assert_async(torch.isfinite(logits_TE).all(),
                            "moekit: router logits contain NaN/inf; check the input and the router weights")
        return
    finite_T = torch.isfinite(logits_TE).all(-1)
    if not bool(finite_T.all()):
        bad = (~finite_T).nonzero().flatten()
        raise FloatingPointError(
            f"router logits contain NaN/inf for {bad.numel()} of {logits_TE.shape[0]} tokens "
            f"(first token index {int(bad[0])}); check the input and the router weights")


# ---- capacity -------------------------------------------------------------------------------

def expert_capacity(config: MoEConfig, num_tokens: int, tokens_per_expert_E: torch.Tensor) -> Optional[int]:
    """Per-expert capacity C under Tutel's semantics, or None when dropless."""
    cf = config.capacity_factor
    if cf is None or num_tokens == 0:
        return None
    busiest = int(tokens_per_expert_E.max()) if tokens_per_expert_E.numel() else 0
    if cf == 0:
        return busiest
    base = config.top_k * int(abs(cf) * math.ceil(num_tokens / config.num_experts))
    if cf > 0:
        if base < 1:
            raise ValueError(
                f"capacity_factor={cf} gives capacity 0 for T={num_tokens}, E={config.num_experts}, "
                f"K={config.top_k}: every token would be dropped; raise capacity_factor")
        return base
    return max(min(base, busiest), 1 if busiest else 0)


def apply_capacity(routing: Routing, capacity: Optional[int], drop_policy: str) -> Routing:
    """Drop assignments beyond ``capacity`` per expert: their id becomes -1, weight 0.

    ``probs`` keeps each expert's highest-weight assignments, ``position`` the earliest
    tokens (token-major, then slot order). Deterministic in both cases.
    """
    if capacity is None:
        return routing
    if int(routing.tokens_per_expert_E.max()) <= capacity:
        return routing
    keep_TK = capacity_keep(routing.topk_ids_TK, routing.topk_weights_TK, routing.tokens_per_expert_E,
                            capacity, drop_policy)
    return drop_assignments(routing, keep_TK)


def capacity_keep(ids_TK: torch.Tensor, weights_TK: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                  capacity: int, drop_policy: str) -> torch.Tensor:
    """bool [T, K]: which assignments fit in ``capacity`` per expert (see :func:`apply_capacity`).
    ``tokens_per_expert_E`` must count ``ids_TK``. The expert-parallel layer calls it on the
    global batch's ids and weights, so drops are the single-device layer's."""
    T, K = ids_TK.shape
    E = tokens_per_expert_E.numel()
    flat_ids = ids_TK.flatten()
    n = flat_ids.numel()
    position = torch.arange(n, device=ids_TK.device)
    if drop_policy == "probs":
        # sort by (expert, -weight, position): a stable sort on weight, then a stable sort on expert
        order = torch.sort(weights_TK.detach().flatten(), descending=True, stable=True).indices
        order = order[torch.sort(flat_ids[order], stable=True).indices]
    else:
        order = torch.sort(flat_ids, stable=True).indices
    sorted_ids = flat_ids[order]
    starts_E = torch.zeros(E + 1, dtype=torch.long, device=ids_TK.device)
    starts_E[1:] = torch.cumsum(tokens_per_expert_E, 0)
    rank_in_expert = position - starts_E[sorted_ids]
    keep_sorted = rank_in_expert < capacity
    keep = torch.empty(n, dtype=torch.bool, device=ids_TK.device)
    keep[order] = keep_sorted
    return keep.view(T, K)


def drop_assignments(routing: Routing, keep_TK: torch.Tensor) -> Routing:
    """``routing`` with the assignments where ``keep_TK`` is False marked -1 (weight 0)."""
    ids_TK, weights_TK = routing.topk_ids_TK, routing.topk_weights_TK
    new_ids = ids_TK.masked_fill(~keep_TK, -1)
    new_weights = weights_TK.masked_fill(~keep_TK, 0.0)
    counts_E = count_per_expert(new_ids, routing.tokens_per_expert_E.numel())
    num_dropped = int(routing.tokens_per_expert_E.sum()) - int(counts_E.sum())
    return Routing(new_ids, new_weights, routing.logits_TE, routing.scores_TE, counts_E, num_dropped)
