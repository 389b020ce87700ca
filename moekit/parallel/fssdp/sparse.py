"""Hecate's sparse collectives: SparseAllGather(P, P') and SparseReduceScatter(P', P).

Legend: E experts of one layer, W ranks, O_d experts rank d owns, H_d experts rank d holds in
P' (owned + materialised replicas), X elements of one expert's row (any trailing shape).

Placements of one layer:

- ``P`` (:class:`Materialization` field ``owner_E``): every expert has exactly one owner rank
  (surjective: the owner holds its parameters and its optimizer state);
- ``P'`` (``holders_E``): for each expert the ranks that hold a copy this step, a superset of
  its owner.

On rank d, a tensor *by owner* is ``x_OX [O_d, ...]``: the rows of the experts d owns, in
ascending expert id; a tensor *by holder* is ``x_HX [H_d, ...]``: the rows of the experts d
holds in P', in ascending expert id (owned ones included).

- :func:`sparse_all_gather` (by owner -> by holder): each owner sends its row to every other
  holder of the expert; its backward is :func:`sparse_reduce_scatter`.
- :func:`sparse_reduce_scatter` (by holder -> by owner): every non-owner holder sends its row to
  the owner, who adds them to its own, in ascending source rank (a fixed order); its backward
  is :func:`sparse_all_gather`.

Both are one ``all_to_all_single`` with variable splits over the whole group (no subgroups):
only rows that cross ranks are on the wire, so one call moves ``sum_e (r_e - 1)`` rows in all,
``r_e = len(holders_E[e])`` (REFERENCE §2). A :class:`Traffic` passed as ``traffic=`` adds up what
this rank sent and received.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moekit.parallel import comm

DEFAULT_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class Materialization:
    """P (``owner_E``) and P' (``holders_E``) of one layer over ``world_size`` ranks.

    owner_E: tuple [E] of owner ranks. holders_E: tuple [E] of sorted rank tuples, each
    containing the expert's owner. Validated at construction (``ValueError``)."""

    owner_E: tuple[int, ...]
    holders_E: tuple[tuple[int, ...], ...]
    world_size: int

    def __post_init__(self):
        W, E = self.world_size, len(self.owner_E)
        if len(self.holders_E) != E:
            raise ValueError(f"holders_E has {len(self.holders_E)} entries, owner_E {E}")
        for e, (o, hs) in enumerate(zip(self.owner_E, self.holders_E)):
            if not 0 <= o < W:
                raise ValueError(f"owner_E[{e}] = {o} is not a rank of a group of {W}")
            if tuple(sorted(set(hs))) != tuple(hs) or (hs and not 0 <= hs[0] <= hs[-1] < W):
                raise ValueError(f"holders_E[{e}] = {hs} must be distinct sorted ranks in [0, {W})")
            if o not in hs:
                raise ValueError(f"holders_E[{e}] = {hs} lacks the owner {o}: P must be a subset of P'")

    @classmethod
    def owners_only(cls, owner_E: Sequence[int], world_size: int) -> "Materialization":
        """P' = P: no replicas."""
        return cls(tuple(int(o) for o in owner_E), tuple((int(o),) for o in owner_E), world_size)

    @classmethod
    def everywhere(cls, owner_E: Sequence[int], world_size: int) -> "Materialization":
        """Every expert on every rank (what a full all-gather gives)."""
        return cls(tuple(int(o) for o in owner_E), (tuple(range(world_size)),) * len(owner_E), world_size)

    @property
    def num_experts(self) -> int:
        return len(self.owner_E)

    def owned(self, rank: int) -> list[int]:
        """Experts ``rank`` owns, ascending."""
        return [e for e, o in enumerate(self.owner_E) if o == rank]

    def held(self, rank: int) -> list[int]:
        """Experts ``rank`` holds in P' (owned and replicas), ascending."""
        return [e for e, hs in enumerate(self.holders_E) if rank in hs]

    def replicas(self, rank: int) -> list[int]:
        """Non-owned experts materialised on ``rank`` (m_{l,d} = their number)."""
        return [e for e, hs in enumerate(self.holders_E) if rank in hs and self.owner_E[e] != rank]

    @property
    def copies_E(self) -> list[int]:
        """r_e: ranks holding expert e."""
        return [len(hs) for hs in self.holders_E]

    def union(self, other: "Materialization") -> "Materialization":
        """Same owners (this one's); holders of both."""
        hs = tuple(tuple(sorted(set(a) | set(b))) for a, b in zip(self.holders_E, other.holders_E))
        return Materialization(self.owner_E, hs, self.world_size)

    def digest(self) -> int:
        """A 63-bit hash of (P, P'): equal on two ranks iff (with overwhelming probability) the maps are."""
        h = hashlib.blake2b(repr((self.world_size, self.owner_E, self.holders_E)).encode(), digest_size=8)
        return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class Traffic:
    """What this rank's sparse collectives moved: bytes/rows it sent to and received from other
    ranks, and the number of calls (accumulated; reset by assigning a new one)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    rows_sent: int = 0
    rows_received: int = 0
    calls: int = 0

    def add(self, rows_sent: int, rows_received: int, row_bytes: int) -> None:
        self.rows_sent += rows_sent
        self.rows_received += rows_received
        self.bytes_sent += rows_sent * row_bytes
        self.bytes_received += rows_received * row_bytes
        self.calls += 1


@dataclass
class _Plan:
    """This rank's part of spAG(P, P') (spRS is the same exchange reversed).

    send_idx: positions in the by-owner rows of what goes out, grouped by destination rank
    (ascending), ascending expert within; send_splits [W]. recv_splits [W]: rows arriving from
    each owner (ascending expert within). owned_pos / recv_pos: where the by-owner rows and the
    received rows sit among the by-holder rows."""

    num_owned: int
    num_held: int
    send_idx: list[int]
    send_splits: list[int]
    recv_splits: list[int]
    owned_pos: list[int]
    recv_pos: list[int]
    _cache: dict = field(default_factory=dict)

    def index(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            self._cache[key] = torch.tensor(getattr(self, name), dtype=torch.long, device=device)
        return self._cache[key]


def plan(mat: Materialization, rank: int) -> _Plan:
    """The exchange of spAG(P, P') seen from ``rank``."""
    W = mat.world_size
    owned, held = mat.owned(rank), mat.held(rank)
    pos_owned = {e: i for i, e in enumerate(owned)}
    pos_held = {e: i for i, e in enumerate(held)}
    send_idx, send_splits, recv_splits, recv_pos = [], [], [], []
    for q in range(W):
        out = [pos_owned[e] for e in owned if q != rank and q in mat.holders_E[e]]
        send_idx += out
        send_splits.append(len(out))
        inc = [e for e in held if mat.owner_E[e] == q and q != rank]
        recv_pos += [pos_held[e] for e in inc]
        recv_splits.append(len(inc))
    return _Plan(len(owned), len(held), send_idx, send_splits, recv_splits, [pos_held[e] for e in owned], recv_pos)


def _plan_of(mat: Materialization, rank: int) -> _Plan:
    """:func:`plan`, memoised (a pure function of the frozen placement and the rank)."""
    return _plan_memo(mat, rank)


_plan_memo = functools.lru_cache(maxsize=512)(plan)


def _row_bytes(x: torch.Tensor) -> int:
    return (x[0].numel() if x.shape[0] else int(torch.Size(x.shape[1:]).numel())) * x.element_size()


class PendingGather:
    """An spAG in flight (:func:`launch_all_gather`); :meth:`wait` returns ``x_HX``."""

    def __init__(self, x_OX, recv, work, p: _Plan, timeout, what):
        self.x_OX, self.recv, self.work, self.plan, self.timeout, self.what = x_OX, recv, work, p, timeout, what
        self._done = None

    def wait(self) -> torch.Tensor:
        if self._done is None:
            if self.work is not None:
                comm.wait(self.work, self.timeout, self.what)
            p = self.plan
            out = self.x_OX.new_empty(p.num_held, *self.x_OX.shape[1:])
            out.index_copy_(0, p.index("owned_pos", out.device), self.x_OX)
            if self.recv.shape[0]:
                out.index_copy_(0, p.index("recv_pos", out.device), self.recv)
            self._done = out
            self.x_OX = self.recv = self.work = None
        return self._done


def launch_all_gather(x_OX: torch.Tensor, mat: Materialization, group, *, traffic: Optional[Traffic] = None,
                      timeout: timedelta = DEFAULT_TIMEOUT, what: str = "sparse all-gather") -> PendingGather:
    """Start spAG(P, P') of ``x_OX [O_d, ...]`` asynchronously (no autograd); ``.wait()`` gives
    ``x_HX [H_d, ...]``. A collective: every rank of ``group`` calls it with the same ``mat``."""
    rank = dist.get_rank(group)
    p = _plan_of(mat, rank)
    x_OX = x_OX.detach()
    if x_OX.shape[0] != p.num_owned:
        raise ValueError(f"{what}: x has {x_OX.shape[0]} rows but rank {rank} owns {p.num_owned} experts")
    send = x_OX.index_select(0, p.index("send_idx", x_OX.device)) if p.send_idx else x_OX[:0]
    recv = x_OX.new_empty(sum(p.recv_splits), *x_OX.shape[1:])
    work = None
    if dist.get_world_size(group) > 1:
        work = dist.all_to_all_single(recv, send.contiguous(), p.recv_splits, p.send_splits, group=group,
                                      async_op=True)
    if traffic is not None:
        traffic.add(len(p.send_idx), sum(p.recv_splits), _row_bytes(x_OX))
    return PendingGather(x_OX, recv, work, p, timeout, what)


class PendingReduce:
    """An spRS in flight (:func:`launch_reduce_scatter`): ``owned`` (this rank's own rows,
    ``[O_d, ...]``) is ready at once; :meth:`wait` returns ``(recv [n, ...], owned_idx [n])``, the
    rows other holders sent (ascending source rank) and the owned row each adds to."""

    def __init__(self, owned, recv, work, idx, timeout, what):
        self.owned, self.recv, self.work, self.idx, self.timeout, self.what = owned, recv, work, idx, timeout, what

    def wait(self) -> tuple[torch.Tensor, list[int]]:
        if self.work is not None:
            comm.wait(self.work, self.timeout, self.what)
            self.work = None
        return self.recv, self.idx

    def result(self) -> torch.Tensor:
        """The owned rows with the other holders' rows added (in a fixed order)."""
        recv, idx = self.wait()
        out = self.owned
        for i, j in enumerate(idx):  # sequential adds in arrival order: ascending source rank
            out[j] += recv[i]
        return out


def launch_reduce_scatter(x_HX: torch.Tensor, mat: Materialization, group, *, traffic: Optional[Traffic] = None,
                          timeout: timedelta = DEFAULT_TIMEOUT,
                          what: str = "sparse reduce-scatter") -> PendingReduce:
    """Start spRS(P', P) of ``x_HX [H_d, ...]`` asynchronously (no autograd). A collective."""
    rank = dist.get_rank(group)
    p = _plan_of(mat, rank)
    x_HX = x_HX.detach()
    if x_HX.shape[0] != p.num_held:
        raise ValueError(f"{what}: x has {x_HX.shape[0]} rows but rank {rank} holds {p.num_held} experts")
    owned = x_HX.index_select(0, p.index("owned_pos", x_HX.device))
    send = x_HX.index_select(0, p.index("recv_pos", x_HX.device)) if p.recv_pos else x_HX[:0]
    recv = x_HX.new_empty(len(p.send_idx), *x_HX.shape[1:])
    work = None
    if dist.get_world_size(group) > 1:
        work = dist.all_to_all_single(recv, send.contiguous(), p.send_splits, p.recv_splits, group=group,
                                      async_op=True)
    if traffic is not None:
        traffic.add(len(p.recv_pos), len(p.send_idx), _row_bytes(x_HX))
    return PendingReduce(owned, recv, work, p.send_idx, timeout, what)


def _reduce_scatter(x_HX: torch.Tensor, mat: Materialization, group, traffic, timeout, what) -> torch.Tensor:
    return launch_reduce_scatter(x_HX, mat, group, traffic=traffic, timeout=timeout, what=what).result()


class _SparseAllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_OX, mat, group, traffic, timeout, grad_scale, pending, grad_traffic):
        ctx.args = (mat, group, grad_traffic, timeout, grad_scale)
        if pending is None:
            pending = launch_all_gather(x_OX, mat, group, traffic=traffic, timeout=timeout)
        return pending.wait()

    @staticmethod
    def backward(ctx, grad_HX):
        mat, group, traffic, timeout, grad_scale = ctx.args
        g = _reduce_scatter(grad_HX.contiguous(), mat, group, traffic, timeout, "sparse reduce-scatter (backward)")
        if grad_scale != 1.0:
            g = g * grad_scale
        return g, None, None, None, None, None, None, None


class _SparseReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_HX, mat, group, traffic, timeout):
        ctx.args = (mat, group, traffic, timeout)
        return _reduce_scatter(x_HX.detach(), mat, group, traffic, timeout, "sparse reduce-scatter")

    @staticmethod
    def backward(ctx, grad_OX):
        mat, group, traffic, timeout = ctx.args
        return (_SparseAllGather.apply(grad_OX.contiguous(), mat, group, traffic, timeout, 1.0, None, traffic),
                None, None, None, None)


def _check_world(mat: Materialization, group, what: str) -> None:
    if not isinstance(mat, Materialization):
        raise TypeError(f"{what}: placement must be a Materialization, got {type(mat).__name__}")
    W = dist.get_world_size(group)
    if mat.world_size != W:
        raise ValueError(f"{what}: the placement is for {mat.world_size} ranks, the group has {W}")


def sparse_all_gather(x_OX: torch.Tensor, placement: Materialization, group=None, *,
                      traffic: Optional[Traffic] = None, timeout: timedelta = DEFAULT_TIMEOUT,
                      grad_scale: float = 1.0, pending: Optional[PendingGather] = None,
                      grad_traffic: Optional[Traffic] = None) -> torch.Tensor:
    """SparseAllGather(P, P'): ``x_OX [O_d, ...]`` (this rank's owned experts' rows, ascending id)
    -> ``x_HX [H_d, ...]`` (the rows of every expert this rank holds in P', ascending id).

    Differentiable: the gradient of each owned row is the sum of its holders' gradients
    (:func:`sparse_reduce_scatter`), times ``grad_scale``. ``pending``: the result of
    :func:`launch_all_gather` on the same rows, started earlier (overlap); then this call only
    waits for it. ``traffic`` counts this call, ``grad_traffic`` its backward (default: ``traffic``).
    A collective over ``group`` (default: the world)."""
    group = dist.group.WORLD if group is None else group
    _check_world(placement, group, "sparse_all_gather")
    return _SparseAllGather.apply(x_OX, placement, group, traffic, timeout, float(grad_scale), pending,
                                  traffic if grad_traffic is None else grad_traffic)


def sparse_reduce_scatter(x_HX: torch.Tensor, placement: Materialization, group=None, *,
                          traffic: Optional[Traffic] = None, timeout: timedelta = DEFAULT_TIMEOUT) -> torch.Tensor:
    """SparseReduceScatter(P', P): ``x_HX [H_d, ...]`` (rows of the experts held in P') ->
    ``x_OX [O_d, ...]``: each owned expert's row plus the rows of its other holders (sum, in
    ascending source rank). Differentiable (backward: :func:`sparse_all_gather`). A collective."""
    group = dist.group.WORLD if group is None else group
    _check_world(placement, group, "sparse_reduce_scatter")
    return _SparseReduceScatter.apply(x_HX, placement, group, traffic, timeout)
