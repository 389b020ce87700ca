"""Sparse materialisation (Hecate's Algorithm 1): the temporary placement P' of one step.

Legend: E experts of a layer, L MoE layers, W ranks, m memory cap (non-owned experts one rank
may materialise per layer), t overlap degree (expert copies whose transfer fits under the
preceding non-MoE layer).

Inputs are the expert loads summed over a sliding window of the last ``window`` steps (each
step's per-expert token counts all-reduced over the group, so every rank holds the same
integers) and the owner map P. Everything below is integer arithmetic or float arithmetic on
those same integers in the same order, so every rank computes the same P' (checked anyway,
see :mod:`moekit.parallel.fssdp.wrap`: a rank that disagrees is an error, not a deadlock).

Algorithm 1, with the details the paper leaves open chosen here:

- ``t <= m``: the t hottest experts (with load > 0; ties: lower id) are replicated on every rank.
- otherwise (or ``t`` unknown): ``W * m`` replica slots are handed out one at a time to the
  expert with the highest load per copy ``load_e / r_e`` (EPLB's rule; ties: lower id; at most
  W copies, only experts with load > 0): ``assignSlotsByLoad``. Then, hottest expert first,
  each extra copy goes to a rank that does not hold it and has a free slot (< m replicas),
  preferring (1) a node without a copy of the expert, (2) the rank with the least load
  already assigned to it in this layer (each held expert counts ``load_e / r_e``), (3) the
  lower rank. A copy no rank has room for is dropped.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Optional, Sequence

import torch

from moekit.parallel.fssdp.sparse import Materialization


class LoadWindow:
    """Per-expert loads of the last ``window`` steps: ``push(counts_LE)``, ``total()`` -> int64 [L, E]."""

    def __init__(self, num_layers: int, num_experts: int, window: int = 5):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.shape = (num_layers, num_experts)
        self.steps: deque = deque(maxlen=window)

    def push(self, counts_LE: torch.Tensor) -> None:
        if tuple(counts_LE.shape) != self.shape:
            raise ValueError(f"counts have shape {tuple(counts_LE.shape)}, expected {self.shape}")
        self.steps.append(counts_LE.detach().to("cpu", torch.long).clone())

    def total(self) -> torch.Tensor:
        if not self.steps:
            return torch.zeros(self.shape, dtype=torch.long)
        return torch.stack(list(self.steps)).sum(0)

    def __len__(self) -> int:
        return len(self.steps)


def overlap_degree(non_moe_seconds: float, bandwidth_bytes_per_s: float, expert_bytes: int) -> int:
    """t = floor(T_nonMoE * bandwidth / expert size): expert copies whose transfer fits under the
    non-MoE compute before the layer."""
    if expert_bytes <= 0:
        raise ValueError(f"expert_bytes must be > 0, got {expert_bytes}")
    return max(0, int(math.floor(non_moe_seconds * bandwidth_bytes_per_s / expert_bytes)))


def assign_slots_by_load(load_E: Sequence[int], num_slots: int, max_copies: int) -> list[int]:
    """r_e for every expert: 1 + the extra slots given one at a time to the expert with the
    highest ``load_e / r_e`` (ties: lower id), at most ``max_copies``, only to loaded experts."""
    copies = [1] * len(load_E)
    for _ in range(num_slots):
        best = -1
        for e, load in enumerate(load_E):
            if load <= 0 or copies[e] >= max_copies:
                continue
            # load_e / r_e > load_b / r_b, in integers (exact, the same on every rank)
            if best < 0 or load * copies[best] > load_E[best] * copies[e]:
                best = e
        if best < 0:
            break
        copies[best] += 1
    return copies


def choose_materialization(load_E: Sequence[int], owner_E: Sequence[int], world_size: int, memory_cap: int,
                           overlap: Optional[int] = None, ranks_per_node: Optional[int] = None) -> Materialization:
    """Algorithm 1: P' for one layer from its windowed loads (ints [E]) and owners P.

    memory_cap: m >= 0. overlap: t (None: no limit from overlap). ranks_per_node: rank r is on
    node r // ranks_per_node (None: one node)."""
    W, E = world_size, len(owner_E)
    load = [int(v) for v in load_E]
    if len(load) != E:
        raise ValueError(f"load_E has {len(load)} entries, owner_E {E}")
    if memory_cap < 0:
        raise ValueError(f"memory_cap must be >= 0, got {memory_cap}")
    if overlap is not None and overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    holders = [{int(o)} for o in owner_E]
    if W == 1 or memory_cap == 0 or overlap == 0:
        return Materialization.owners_only(owner_E, W)
    if overlap is not None and overlap <= memory_cap:
        hot = sorted((e for e in range(E) if load[e] > 0), key=lambda e: (-load[e], e))[:overlap]
        for e in hot:
            holders[e] = set(range(W))
    else:
        L = ranks_per_node or W
        node = [r // L for r in range(W)]
        copies = assign_slots_by_load(load, W * memory_cap, W)
        free = [memory_cap] * W
        assigned = [0.0] * W  # load per copy of what each rank holds
        for e in range(E):
            assigned[int(owner_E[e])] += load[e] / copies[e]
        for e in sorted(range(E), key=lambda e: (-load[e], e)):
            for _ in range(copies[e] - 1):
                nodes_with = {node[r] for r in holders[e]}
                cands = [r for r in range(W) if r not in holders[e] and free[r] > 0]
                if not cands:
                    break
                r = min(cands, key=lambda r: (node[r] in nodes_with, assigned[r], r))
                holders[e].add(r)
                free[r] -= 1
                assigned[r] += load[e] / copies[e]
    return Materialization(tuple(int(o) for o in owner_E), tuple(tuple(sorted(h)) for h in holders), W)
