"""Capacity and loss statistics over the tokens of every rank of an expert-parallel group.

Legend: T this rank's tokens, K top-k, E experts, W ranks, T_g the global batch's tokens.

The single-device layer is the reference: on the global batch (every rank's tokens, in rank
order) its capacity comes from the global counts (Tutel's ``cf = 0`` is the busiest expert's
need over the group) and its drops from a per-expert ranking of every assignment. Counts are
one all-reduce of E+1 integers; the ids and weights (K numbers per token, not D) are
gathered only when something must be dropped, and every rank computes the same global
decision and keeps its own rows of it.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from moekit.parallel import comm
from moekit.router import Routing, capacity_keep, drop_assignments


class GroupBatch:
    """:class:`moekit.layer.GlobalBatch` over a process group (set as ``layer.global_batch``)."""

    def __init__(self, group, timeout: timedelta, name: str):
        self.group, self.timeout, self.name = group, timeout, name

    def totals(self, tokens_per_expert_E: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.cat([tokens_per_expert_E.long(),
                         torch.tensor([num_tokens], dtype=torch.long, device=tokens_per_expert_E.device)])
        comm.wait(dist.all_reduce(buf, group=self.group, async_op=True), self.timeout,
                  f"token counts of layer {self.name!r}")
        return buf[:-1], buf[-1]

    def apply_capacity(self, routing: Routing, capacity: Optional[int], drop_policy: str,
                       global_tokens_per_expert_E: torch.Tensor) -> Routing:
        if capacity is None or int(global_tokens_per_expert_E.max()) <= capacity:
            return routing  # the same answer on every rank: nobody gathers
        ids_TK, weights_TK = routing.topk_ids_TK, routing.topk_weights_TK.detach()
        T, K = ids_TK.shape
        W = dist.get_world_size(self.group)
        Ts = self._gather(torch.tensor([T], dtype=torch.long, device=ids_TK.device), "token numbers").tolist()
        T_max = max(Ts)
        ids_W = self._gather_padded(ids_TK, T_max, "expert ids").view(W, T_max, K)
        weights_W = self._gather_padded(weights_TK, T_max, "routing weights").view(W, T_max, K)
        ids_g = torch.cat([ids_W[r, :n] for r, n in enumerate(Ts)])
        weights_g = torch.cat([weights_W[r, :n] for r, n in enumerate(Ts)])
        keep_g = capacity_keep(ids_g, weights_g, global_tokens_per_expert_E, capacity, drop_policy)
        me = dist.get_rank(self.group)
        start = sum(Ts[:me])
        return drop_assignments(routing, keep_g[start:start + T])


    def _gather(self, x: torch.Tensor, what: str) -> torch.Tensor:
        return comm.all_gather_rows(x, self.group, self.timeout, f"capacity ({what}) of layer {self.name!r}")

    def _gather_padded(self, x_TK: torch.Tensor, T_max: int, what: str) -> torch.Tensor:
        """[T, K] per rank -> [W*T_max, K] (rows past a rank's T are padding)."""
        padded = x_TK.new_zeros(T_max, *x_TK.shape[1:])
        padded[:x_TK.shape[0]] = x_TK
        return self._gather(padded, what)
