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


@dataclass
class Routing:
    """What the router decided for T tokens.

    topk_ids_TK: int64 [T, K] expert ids; ``-1`` marks a slot dropped by capacity.
    topk_weights_TK: fp32 [T, K] combine weights (0 where dropped).
    logits_TE: fp32 [T, E] raw router logits (after noise, before bias).
    scores_TE: fp32 [T, E] softmax probabilities or sigmoid scores (the aux loss's ``P``).
    tokens_per_expert_E: int64 [E] kept assignments per expert.
    """

    topk_ids_TK: torch.Tensor
    topk_weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    scores_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor

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
        """fp32 logits [T, E]; raises on NaN/inf so a diverged model fails loudly."""
        bias = self.bias.float() if self.bias is not None else None
        logits_TE = F.linear(x_TD.float(), self.weight.float(), bias)
        if not torch.isfinite(logits_TE).all():
            bad = (~torch.isfinite(logits_TE)).any(-1).nonzero().flatten()
            raise FloatingPointError(
                f"router logits contain NaN/inf for {bad.numel()} of {logits_TE.shape[0]} tokens "
                f"(first token index {int(bad[0])}); check the input and the router weights")
        if self.training and self.config.router_logit_noise > 0:
            logits_TE = logits_TE + torch.randn_like(logits_TE) * self.config.router_logit_noise
        return logits_TE

    def forward(self, x_TD: torch.Tensor) -> Routing:
        """x_TD: [T, D] -> Routing (no capacity applied yet)."""
        cfg = self.config
        logits_TE = self.compute_logits(x_TD)
        if cfg.router == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            if cfg.topk_before_softmax:
                top_logits_TK, ids_TK = logits_TE.topk(cfg.top_k, dim=-1)
                weights_TK = top_logits_TK.softmax(dim=-1)
            else:
                weights_TK, ids_TK = scores_TE.topk(cfg.top_k, dim=-1)
                if cfg.norm_topk_prob:
                    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        else:
            scores_TE = logits_TE.sigmoid()
            choice_TE = scores_TE
            if self.e_score_correction_bias is not None:
                choice_TE = scores_TE + self.e_score_correction_bias
            if cfg.n_group > 1:
                choice_TE = _group_limited_mask(choice_TE, cfg.n_group, cfg.topk_group)
            ids_TK = choice_TE.topk(cfg.top_k, dim=-1).indices
            weights_TK = scores_TE.gather(1, ids_TK)
            if cfg.norm_topk_prob:
                weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * cfg.routed_scaling_factor
        counts_E = torch.bincount(ids_TK.flatten(), minlength=cfg.num_experts)
        return Routing(ids_TK, weights_TK, logits_TE, scores_TE, counts_E)


def _group_limited_mask(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Mask (to -inf) experts outside each token's best ``topk_group`` groups; a group
    scores the sum of its two best choice scores (DeepSeek-V3)."""
    T, E = choice_TE.shape
    grouped_TGe = choice_TE.view(T, n_group, E // n_group)
    group_scores_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    return choice_TE.masked_fill(~keep_TE, float("-inf"))


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
    ids_TK, weights_TK = routing.topk_ids_TK, routing.topk_weights_TK
    T, K = ids_TK.shape
    E = routing.tokens_per_expert_E.numel()
    if int(routing.tokens_per_expert_E.max()) <= capacity:
        return routing
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
    starts_E[1:] = torch.cumsum(routing.tokens_per_expert_E, 0)
    rank_in_expert = position - starts_E[sorted_ids]
    keep_sorted = rank_in_expert < capacity
    keep = torch.empty(n, dtype=torch.bool, device=ids_TK.device)
    keep[order] = keep_sorted
    keep_TK = keep.view(T, K)
    new_ids = ids_TK.masked_fill(~keep_TK, -1)
    new_weights = weights_TK.masked_fill(~keep_TK, 0.0)
    counts_E = torch.bincount(new_ids[keep_TK], minlength=E)
    return Routing(new_ids, new_weights, routing.logits_TE, routing.scores_TE, counts_E)
