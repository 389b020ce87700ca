"""Heterogeneous sharding (Hecate's Algorithm 2): re-assign expert ownership across all layers.

Legend: L MoE layers, E experts per layer, W ranks, Q_d the number of experts rank d owns over
all layers (L*E/W, the first (L*E mod W) ranks one more).

Every R steps the owners P of every layer are chosen again from the windowed loads, so that
each rank owns the same total number of experts over the model (equal optimizer-state memory)
while the per-layer counts may differ (0..E). Choice made here (the paper publishes no
procedure): longest-processing-time greedy over all (layer, expert) pairs, heaviest first
(ties: lower layer, lower expert): each goes to the rank with quota left that has the least
load of that layer so far, then (spreading over nodes) the node with the least load of that
layer, then its current owner (no move), then the lower rank. The hot experts, placed first,
end on different ranks and nodes; the cold ones fill the remaining quotas where their layer
is lightest. Loads are integers, so every rank computes the same owners.

:func:`move_owned_rows` moves parameters and optimizer state to the new owners with one
SparseAllGather(P_old, P_old ∪ P_new) per tensor: only rows that change owner are sent.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from moekit.parallel.fssdp.sparse import Materialization, Traffic, launch_all_gather


def reshard_owners(load_LE: Sequence[Sequence[int]], owners_LE: Sequence[Sequence[int]], world_size: int,
                   ranks_per_node: Optional[int] = None) -> list[list[int]]:
    """New owners [L][E] from the loads [L][E] (ints) and the current owners."""
    W = world_size
    L = len(load_LE)
    E = len(load_LE[0]) if L else 0
    rpn = ranks_per_node or W
    node = [r // rpn for r in range(W)]
    num_nodes = max(node) + 1
    quota = [L * E // W + (1 if r < (L * E) % W else 0) for r in range(W)]
    layer_load = [[0] * W for _ in range(L)]
    node_load = [[0] * num_nodes for _ in range(L)]
    new = [[-1] * E for _ in range(L)]
    items = sorted(((int(load_LE[l][e]), l, e) for l in range(L) for e in range(E)), key=lambda t: (-t[0], t[1], t[2]))
    for load, l, e in items:
        cur = int(owners_LE[l][e])
        r = min((r for r in range(W) if quota[r] > 0),
                key=lambda r: (layer_load[l][r], node_load[l][node[r]], r != cur, r))
        new[l][e] = r
        quota[r] -= 1
        layer_load[l][r] += load
        node_load[l][node[r]] += load
    return new


@torch.no_grad()
def move_owned_rows(x_OX: torch.Tensor, old_owner_E: Sequence[int], new_owner_E: Sequence[int], rank: int,
                    group, *, traffic: Optional[Traffic] = None, timeout=None) -> torch.Tensor:
    """Rows by old owner ``x_OX [O_d, ...]`` -> rows by new owner ``[O'_d, ...]`` (ascending
    expert id). A collective over ``group``."""
    W = torch.distributed.get_world_size(group)
    old = Materialization.owners_only(old_owner_E, W)
    both = Materialization(old.owner_E, tuple(tuple(sorted({int(a), int(b)}))
                                              for a, b in zip(old_owner_E, new_owner_E)), W)
    kw = {} if timeout is None else {"timeout": timeout}
    held_HX = launch_all_gather(x_OX, both, group, traffic=traffic, what="re-sharding", **kw).wait()
    held = both.held(rank)
    keep = [i for i, e in enumerate(held) if int(new_owner_E[e]) == rank]
    return held_HX.index_select(0, torch.tensor(keep, dtype=torch.long, device=held_HX.device)).clone()
