"""Two-level (2DH) all-to-all: intra-node first, then inter-node (Tutel's hierarchical all-to-all).

Legend: W ranks in the group, L ranks per node, G = W/L nodes; rank r = (node n, local l) with
n = r // L, l = r % L; N rows sent, M rows received, D row shape.

A flat all-to-all sends up to W-1 messages per rank, W-L of them across nodes, each small at
scale. The 2DH exchange sends the same rows in two phases:

1. intra-node, among the L ranks of a node: rank (n, l) hands to local rank l' every row it
   has for local index l' on *any* node (its rows for (m, l') ordered by m);
2. inter-node, among the G ranks with local index l': rank (n, l') sends to (m, l') the rows of
   all its node's ranks for (m, l'), ordered by source local index.

So a rank sends L-1 intra-node and G-1 inter-node messages instead of W-1 (each inter-node one
about L times larger); the inter-node bytes are unchanged, rows for another local index take
one extra intra-node hop. Between the phases the received rows are reordered from (source
local, destination node) to (destination node, source local); phase 2 then delivers them
ordered by global source rank, exactly as the flat exchange does. Phase 1 needs the counts per
(source local, destination node): one small all-to-all of G counts per peer inside the node.

Built from differentiable pieces (:func:`moekit.parallel.comm.all_to_all_rows` on the
subgroups, :func:`moekit.dispatch.permute_rows`), so the backward is the mirrored exchange and
the result and gradients equal the flat exchange bit for bit. Every collective waits with the
caller's timeout (a dead peer raises :class:`~moekit.parallel.comm.ExpertParallelError`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.dispatch import permute_rows
from moekit.parallel import comm


@dataclass
class Traffic:
    """What this rank sent to *other* ranks in each phase, summed over forward exchanges (a
    backward mirrors them): rows, bytes, and messages (non-empty sends)."""

    exchanges: int = 0
    intra_rows: int = 0
    intra_bytes: int = 0
    intra_messages: int = 0
    inter_rows: int = 0
    inter_bytes: int = 0
    inter_messages: int = 0

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, 0)

    def add(self, phase: str, sent_to_others: list[int], row_bytes: int) -> None:
        """Count one phase's sends (``phase`` is "intra" or "inter")."""
        rows = sum(sent_to_others)
        for name, n in (("rows", rows), ("bytes", rows * row_bytes), ("messages", sum(1 for r in sent_to_others if r))):
            setattr(self, f"{phase}_{name}", getattr(self, f"{phase}_{name}") + n)


class HierarchicalTopology:
    """Nodes of ``ranks_per_node`` consecutive ranks of ``group``, with one process group per node
    (intra-node) and one per local index (inter-node).

    A collective: every rank of ``group`` (None: the default group) builds it with the same ``ranks_per_node``. Like any
    ``dist.new_group``, it needs every process of the job, so ``group`` should span the default
    group (its usual use). With L = 1 or L = W no subgroup is made and :meth:`exchange` is the
    flat all-to-all on ``group``.

    Attributes: ``world_size`` W, ``rank``, ``ranks_per_node`` L, ``num_nodes`` G, ``node`` n,
    ``local_rank`` l, ``intra_group`` (this node's ranks; ``group`` when L = W; None when L = 1),
    ``inter_group`` (ranks with local index l; ``group`` when L = 1; None when L = W), and
    ``traffic`` (a :class:`Traffic`).
    """

    def __init__(self, group, ranks_per_node: int):
        group = _process_group(group)
        W, rank = dist.get_world_size(group), dist.get_rank(group)
        error = _check_ranks_per_node(ranks_per_node, W)
        everyone: list = [None] * W  # a mismatched L would deadlock new_group: check first, raise together
        dist.all_gather_object(everyone, ranks_per_node if error is None else repr(ranks_per_node), group=group)
        if len(set(map(repr, everyone))) > 1:
            raise ValueError(f"ranks_per_node differs across ranks: {everyone} (rank r holds entry r)")
        if error is not None:
            raise error
        L = ranks_per_node
        self.group, self.world_size, self.rank, self.ranks_per_node = group, W, rank, L
        self.num_nodes, self.node, self.local_rank = W // L, rank // L, rank % L
        self.traffic = Traffic()
        self.intra_group = group if L == W else None
        self.inter_group = group if L == 1 else None
        if 1 < L < W:
            ranks_W = dist.get_process_group_ranks(group)  # group rank -> global rank
            for n in range(self.num_nodes):  # same order on every rank
                pg = dist.new_group([ranks_W[n * L + l] for l in range(L)])
                if n == self.node:
                    self.intra_group = pg
            for l in range(L):
                pg = dist.new_group([ranks_W[n * L + l] for n in range(self.num_nodes)])
                if l == self.local_rank:
                    self.inter_group = pg

    @property
    def flat(self) -> bool:
        """True when one level is trivial (L = 1 or L = W): the exchange is the flat one."""
        return self.ranks_per_node in (1, self.world_size)

    def exchange(self, x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int],
                 timeout: timedelta, what: str) -> torch.Tensor:
        """Same contract as :func:`moekit.parallel.comm.all_to_all_rows` on ``group``: send
        ``in_splits[q]`` consecutive rows to rank q, receive ``out_splits[q]`` rows from rank q,
        output ordered by source rank. Differentiable."""
        W, L, G = self.world_size, self.ranks_per_node, self.num_nodes
        out_splits, in_splits = [int(s) for s in out_splits], [int(s) for s in in_splits]
        if len(out_splits) != W or len(in_splits) != W:
            raise ValueError(f"{what}: out_splits and in_splits need {W} entries, got "
                             f"{len(out_splits)} and {len(in_splits)}")
        if x_ND.shape[0] != sum(in_splits):
            raise ValueError(f"{what}: x_ND has {x_ND.shape[0]} rows, in_splits sum to {sum(in_splits)}")
        row_bytes = math.prod(x_ND.shape[1:]) * x_ND.element_size()
        self.traffic.exchanges += 1
        if self.flat:  # L = 1: every send crosses nodes; L = W: none does
            self.traffic.add("inter" if L == 1 else "intra",
                             [n for q, n in enumerate(in_splits) if q != self.rank], row_bytes)
            return comm.all_to_all_rows(x_ND, out_splits, in_splits, self.group, timeout, what)

        dev = x_ND.device
        send_GL = torch.tensor(in_splits, dtype=torch.long).view(G, L)  # my rows for (node m, local l')
        # phase 1: rows regrouped (m, l') -> (l', m); local rank l' learns my count per node m
        counts_LG = send_GL.t().contiguous()
        recv_LG = comm.all_to_all_counts(counts_LG.view(-1).to(dev), self.intra_group, timeout,
                                         f"{what} (2DH intra-node counts)").view(L, G).cpu()
        x1 = permute_rows(x_ND, _transpose_blocks(send_GL).to(dev))
        intra_send = counts_LG.sum(1).tolist()
        x1 = comm.all_to_all_rows(x1, recv_LG.sum(1).tolist(), intra_send, self.intra_group, timeout,
                                  f"{what} (2DH intra-node)")
        # phase 2: received (source local, node m) -> (m, source local); ranks with my local index
        x2 = permute_rows(x1, _transpose_blocks(recv_LG).to(dev))
        inter_send = recv_LG.sum(0).tolist()
        inter_recv = torch.tensor(out_splits, dtype=torch.long).view(G, L).sum(1).tolist()
        y = comm.all_to_all_rows(x2, inter_recv, inter_send, self.inter_group, timeout, f"{what} (2DH inter-node)")

        self.traffic.add("intra", [n for l, n in enumerate(intra_send) if l != self.local_rank], row_bytes)
        self.traffic.add("inter", [n for m, n in enumerate(inter_send) if m != self.node], row_bytes)
        return y

    def __repr__(self) -> str:
        return (f"HierarchicalTopology(world_size={self.world_size}, ranks_per_node={self.ranks_per_node}, "
                f"node={self.node}, local_rank={self.local_rank})")


def all_to_all_rows(x_ND: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                    timeout: timedelta, what: str) -> torch.Tensor:
    """:func:`moekit.parallel.comm.all_to_all_rows` with ``group`` a :class:`HierarchicalTopology`
    (the 2DH exchange) or a plain process group (the flat one): a drop-in for the dispatcher."""
    if isinstance(group, HierarchicalTopology):
        return group.exchange(x_ND, out_splits, in_splits, timeout, what)
    return comm.all_to_all_rows(x_ND, out_splits, in_splits, group, timeout, what)


def phase_rows(splits_WW: torch.Tensor, ranks_per_node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows each rank sends each rank in the two phases, for the flat exchange ``splits_WW[p, q]``
    (rows from p to q): ``(intra_WW, inter_WW)``. Pure (no communication): a benchmark or a
    cost model reads the message count / size trade-off off it. Diagonals are rows kept."""
    W = splits_WW.shape[0]
    err = _check_ranks_per_node(ranks_per_node, W)
    if err is not None:
        raise err
    L, G = ranks_per_node, W // ranks_per_node
    S = splits_WW.to(torch.long).view(G, L, G, L)  # (src node, src local, dst node, dst local)
    intra = torch.zeros(G, L, G, L, dtype=torch.long)
    inter = torch.zeros(G, L, G, L, dtype=torch.long)
    by_local = S.sum(2)  # [n, l, l']: (n, l) -> (n, l') in phase 1
    by_node = S.sum(1)  # [n, m, l']: (n, l') -> (m, l') in phase 2
    for n in range(G):
        intra[n, :, n, :] = by_local[n]
    for l in range(L):
        inter[:, l, :, l] = by_node[:, :, l]
    return intra.view(W, W), inter.view(W, W)


def _transpose_blocks(sizes_AB: torch.Tensor) -> torch.Tensor:
    """Rows in blocks ordered (a, b) with ``sizes_AB[a, b]`` rows each -> perm with ``x[perm]``
    ordered (b, a); rows keep their order inside a block."""
    A, B = sizes_AB.shape
    block_N = torch.repeat_interleave(torch.arange(A * B), sizes_AB.reshape(-1))
    key_N = (block_N % B) * A + block_N // B
    return torch.sort(key_N, stable=True).indices


def _check_ranks_per_node(L, W: int):
    """The error for a bad ``ranks_per_node`` (or None)."""
    if isinstance(L, bool) or not isinstance(L, int):
        return TypeError(f"ranks_per_node must be an int, got {L!r} ({type(L).__name__})")
    if L < 1 or W % L:
        return ValueError(f"ranks_per_node={L} must be a positive divisor of the group size {W}")
    return None


def _process_group(group):
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("HierarchicalTopology needs torch.distributed initialised or a process group")
        return dist.group.WORLD
    if hasattr(group, "get_group"):  # a 1-D DeviceMesh
        return group.get_group()
    return group
