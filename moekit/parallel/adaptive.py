"""Tutel's adaptive parallelism: one expert layout serves every parallel degree r, chosen per call.

Legend: W ranks, E experts, D model dim, F expert hidden dim (H = 2F with a gated activation,
else F), s = W/E shards per expert when E < W (else 1), S_e = max(E/W, 1) experts per rank,
T local tokens, K top-k.

The layout never changes: with E >= W rank w holds experts ``[w*E/W, (w+1)*E/W)`` whole; with
E < W rank w holds shard ``w % s`` (F/s hidden columns) of expert ``w // s``. The degree r
only decides what each forward gathers and where tokens go:

- ``r = 0``, data parallel: all-gather every expert's weights (W ranks), no token all-to-all;
  each rank computes its own tokens with all experts.
- ``r >= 1`` (a divisor of s; only r = 1 when E >= W): all-gather within groups of g = s/r
  consecutive shards, so a rank holds F/r columns of its expert; g ranks hold the same
  columns (data-parallel replicas that split the expert's tokens) and r ranks hold the r
  column blocks (tokens go to all r, and their partial outputs are summed by the combine).
  r = 1 is EP + DP, r = s is EP + sharded experts (no weight gather).

Gradients of gathered weights go back through the all-gather's backward, a reduce-scatter
(sum) over the same group: each rank's shard gets the gradient of the sum of the ranks' local
losses, as with :func:`~moekit.parallel.expert_parallel`. So switching r changes the
communication, not the results (up to floating-point summation order).

``r = "auto"`` picks the degree with the smallest estimated communication time per step from
the bytes each mode moves and a link model (latency per collective, bandwidth) measured once
at conversion with :func:`measure_link`; the choice is logged when it changes.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch import LocalDispatcher
from moekit.experts import BACKENDS, GroupedExperts, resolve_backend
from moekit.layer import moe_layers
from moekit.parallel import comm
from moekit.parallel.expert_parallel import (DEFAULT_TIMEOUT, AllToAllDispatcher, _check_same_everywhere,
                                             _group_of, _layer_signature)
from moekit.parallel.global_batch import GroupBatch
from moekit.parallel.placement import LayerPlacement
from moekit.router import Routing, count_per_expert

log = logging.getLogger(__name__)

Degree = Union[int, str]


@dataclass(frozen=True)
class Layout:
    """The fixed expert layout of an adaptive layer over W ranks (see the module docstring)."""

    num_experts: int
    world_size: int
    ffn_hidden_size: int
    glu: bool

    @property
    def shards(self) -> int:
        """s: ranks sharing one expert's hidden columns (1 when E >= W)."""
        E, W = self.num_experts, self.world_size
        return W // E if E < W else 1

    @property
    def experts_per_rank(self) -> int:
        E, W = self.num_experts, self.world_size
        return E // W if E >= W else 1

    def degrees(self) -> list[int]:
        """Valid r: 0 (data parallel) and the divisors of s."""
        s = self.shards
        return [0] + [r for r in range(1, s + 1) if s % r == 0]

    def gather_size(self, r: int) -> int:
        """Ranks whose shards one forward all-gathers at degree r (W for r = 0)."""
        return self.world_size if r == 0 else self.shards // r

    def placement(self, r: int) -> LayerPlacement:
        """Where the E*r virtual experts (expert e, column block m = e*r + m) live at r >= 1."""
        E, W, s = self.num_experts, self.world_size, self.shards
        if E >= W:
            return LayerPlacement(tuple(range(E)), W, E // W, E)
        g = s // r
        return LayerPlacement(tuple((w // s) * r + (w % s) // g for w in range(W)), W, 1, E * r)

    def check(self) -> None:
        E, W, F = self.num_experts, self.world_size, self.ffn_hidden_size
        if (E >= W and E % W) or (E < W and W % E):
            raise ValueError(f"adaptive parallelism needs W to divide E or E to divide W; got E={E}, W={W}")
        if F % self.shards:
            raise ValueError(f"each of the {E} experts is sharded over W/E = {self.shards} ranks on its hidden "
                             f"dim, which must divide ffn_hidden_size={F}")


def _split_rows(w_in_EHD: torch.Tensor, layout: Layout, shard: int) -> torch.Tensor:
    """Hidden rows of column shard ``shard`` of s: [E', H/s, D] (gate and up blocks kept apart)."""
    s, F = layout.shards, layout.ffn_hidden_size
    f = F // s
    if layout.glu:
        return torch.cat([w_in_EHD[:, shard * f:(shard + 1) * f], w_in_EHD[:, F + shard * f:F + (shard + 1) * f]], 1)
    return w_in_EHD[:, shard * f:(shard + 1) * f]


def _join_shards(w_in_n_g: torch.Tensor, w_out_n_g: torch.Tensor, glu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive column shards -> one expert weight. w_in [n, g, H/s, D] -> [n, g*H/s, D] with the
    gate rows of every shard first; w_out [n, g, D, F/s] -> [n, D, g*F/s]."""
    n, g, Hs, D = w_in_n_g.shape
    if glu:
        w_in = w_in_n_g.view(n, g, 2, Hs // 2, D).transpose(1, 2).reshape(n, g * Hs, D)
    else:
        w_in = w_in_n_g.reshape(n, g * Hs, D)
    w_out = w_out_n_g.permute(0, 2, 1, 3).reshape(n, w_out_n_g.shape[2], g * w_out_n_g.shape[3])
    return w_in, w_out


class AdaptiveShard(GroupedExperts):
    """This rank's fixed share of the experts: ``w_in [S_e, H/s, D]``, ``w_out [S_e, D, F/s]``.
    ``forward`` gathers what degree ``self.r`` needs (set by the dispatcher each call)."""

    def __init__(self, full: GroupedExperts, layout: Layout, rank: int, groups: dict, timeout: timedelta,
                 name: str):
        nn.Module.__init__(self)
        self.config, self.layout, self.rank, self.groups, self.timeout, self.name = \
            full.config, layout, rank, groups, timeout, name
        self.r = 1
        w_in, w_out = self.shard_of(full.w_in.detach(), full.w_out.detach())
        rg = full.w_in.requires_grad
        self.w_in = nn.Parameter(w_in.clone(), requires_grad=rg)
        self.w_out = nn.Parameter(w_out.clone(), requires_grad=rg)

    def shard_of(self, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows/columns of full ``[E, H, D]`` / ``[E, D, F]`` tensors (weights,
        gradients or optimizer state): ``[S_e, H/s, D]``, ``[S_e, D, F/s]`` (views)."""
        lay, s, S = self.layout, self.layout.shards, self.layout.experts_per_rank
        first = self.rank * S if lay.num_experts >= lay.world_size else self.rank // s
        f, j = lay.ffn_hidden_size // s, self.rank % s
        return _split_rows(w_in_EHD[first:first + S], lay, j), w_out_EDF[first:first + S, :, j * f:(j + 1) * f]

    def weights(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in, w_out) computed with at degree r: all experts whole for r = 0 ([E, H, D]),
        else this rank's F/r columns of its experts ([S_e, H/r, D]); differentiable."""
        lay = self.layout
        g = lay.gather_size(r)
        if g == 1:
            return self.w_in, self.w_out
        what = f"expert weight gather (r={r}) of layer {self.name!r}"
        w_in = comm.all_gather_rows(self.w_in, self.groups[g], self.timeout, what)
        w_out = comm.all_gather_rows(self.w_out, self.groups[g], self.timeout, what)
        if lay.shards == 1:  # E >= W, r = 0: the ranks' experts in order
            return w_in, w_out
        n = lay.num_experts if r == 0 else 1  # experts covered, each by the gathered shards in a row
        per = w_in.shape[0] // n
        return _join_shards(w_in.view(n, per, *self.w_in.shape[1:]), w_out.view(n, per, *self.w_out.shape[1:]),
                            lay.glu)

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unconverted ``w_in [E, H, D]``, ``w_out [E, D, F]`` (a collective)."""
        return tuple(t.detach() for t in self.weights(0))

    @torch.no_grad()
    def load_full(self, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor) -> None:
        w_in, w_out = self.shard_of(w_in_EHD, w_out_EDF)
        self.w_in.copy_(w_in)
        self.w_out.copy_(w_out)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                backend: Optional[str] = None) -> torch.Tensor:
        w_in, w_out = self.weights(self.r)
        name = resolve_backend(backend or self.config.backend, x_ND.device, x_ND.dtype, self.config.activation)
        return BACKENDS[name](x_ND, tokens_per_expert_E, w_in, w_out, self.config.activation)

    def extra_repr(self) -> str:
        return f"layout {self.layout}, r={self.r}, " + super().extra_repr()


# ---- the cost model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """Time of one collective: ``latency_s + bytes / bandwidth_Bps``."""

    latency_s: float
    bandwidth_Bps: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class LinkModel:
    """Measured collective costs over a group of ``world_size`` ranks: ``all_to_all`` by the
    bytes a rank sends to its peers, ``all_gather`` and ``reduce_scatter`` by the bytes of one
    rank's shard. A gather over g < W ranks is scaled as a ring: (g-1)/(W-1) of the steps."""

    world_size: int
    all_to_all: Fit
    all_gather: Fit
    reduce_scatter: Fit

    def a2a_seconds(self, bytes_sent: float) -> float:
        return self.all_to_all.seconds(bytes_sent)

    def ring_seconds(self, fit: Fit, group_size: int, shard_bytes: float) -> float:
        if group_size <= 1:
            return 0.0
        return fit.seconds(shard_bytes) * (group_size - 1) / max(self.world_size - 1, 1)


def measure_link(group=None, timeout: timedelta = DEFAULT_TIMEOUT, small: int = 1 << 10,
                 large: int = 1 << 20, reps: int = 3, device=None) -> LinkModel:
    """Fit a :class:`LinkModel` from timed collectives of ``small`` and ``large`` bytes per
    rank (median of ``reps`` after one warm-up; the slowest rank's time). A collective."""
    group = _group_of(group)
    W = dist.get_world_size(group)
    device = device or torch.device("cpu")
    gather, scatter = comm.all_gather_single, comm.reduce_scatter_single

    def timed(kind: str, nbytes: int) -> float:
        n = max(nbytes // 4, 1)
        shard = torch.zeros(n, dtype=torch.float32, device=device)
        full = torch.zeros(W * n, dtype=torch.float32, device=device)
        out_full = torch.empty_like(full)
        times = []
        for i in range(reps + 1):
            comm.wait(dist.barrier(group=group, async_op=True), timeout, "link measurement")
            t0 = time.perf_counter()
            if kind == "a2a":
                work = dist.all_to_all_single(out_full, full, group=group, async_op=True)
            elif kind == "gather":
                work = gather(full, shard, group=group, async_op=True)
            else:
                work = scatter(shard, full, group=group, async_op=True)
            comm.wait(work, timeout, "link measurement")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([sorted(times)[len(times) // 2]], dtype=torch.float64)
        comm.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout, "link measurement")
        return float(t)

    def fit(kind: str, bytes_of) -> Fit:
        t_small, t_large = timed(kind, small), timed(kind, large)
        bandwidth = (bytes_of(large) - bytes_of(small)) / max(t_large - t_small, 1e-9)
        return Fit(max(t_small - bytes_of(small) / bandwidth, 0.0), bandwidth)

    return LinkModel(W, fit("a2a", lambda b: (W - 1) * b), fit("gather", lambda b: b), fit("scatter", lambda b: b))


def estimate_seconds(r: int, layout: Layout, tokens: int, top_k: int, hidden_size: int, element_size: int,
                     shard_bytes: tuple[int, ...], link: LinkModel, training: bool = True) -> float:
    """Communication time per step of degree r for ``tokens`` tokens per rank: the weight
    all-gathers (one per tensor of this rank's shard, ``shard_bytes`` each) over
    gather_size(r) ranks (and their reduce-scatters in backward), plus, for
    r >= 1, the counts and token rows (T*K*r, the remote share (W-1)/W) through dispatch and
    combine (and back in backward). Compute is the same in every mode and is left out."""
    W = layout.world_size
    g = layout.gather_size(r)
    t = sum(link.ring_seconds(link.all_gather, g, b) for b in shard_bytes)
    if training:
        t += sum(link.ring_seconds(link.reduce_scatter, g, b) for b in shard_bytes)
    if r > 0:
        row_bytes = tokens * top_k * r * (W - 1) / W * hidden_size * element_size
        exchanges = 4 if training else 2
        t += link.a2a_seconds(0) + exchanges * link.a2a_seconds(row_bytes)
    return t


# ---- the dispatcher -------------------------------------------------------------------------------

class AdaptiveDispatcher:
    """Local dispatch at r = 0, an all-to-all over the E*r virtual experts at r >= 1."""

    def __init__(self, group, layout: Layout, shard: AdaptiveShard, rank: int, name: str, timeout: timedelta,
                 r: Degree, link: Optional[LinkModel]):
        self.group, self.layout, self.shard, self.rank, self.name, self.timeout = group, layout, shard, rank, name, timeout
        self.local = LocalDispatcher()
        self.a2a = {d: AllToAllDispatcher(group, layout.placement(d), rank, name, timeout)
                    for d in layout.degrees() if d > 0}
        self.link = link
        self.r: Degree = r
        self.last_r: Optional[int] = None
        self.calls_per_r: dict[int, int] = {d: 0 for d in layout.degrees()}

    @property
    def bytes_sent(self) -> int:
        return sum(d.bytes_sent for d in self.a2a.values())

    def choose(self, num_tokens: int, top_k: int, hidden_size: int, element_size: int) -> int:
        if self.r != "auto":
            return int(self.r)
        t = torch.tensor([num_tokens], dtype=torch.long)
        comm.wait(dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True), self.timeout,
                  f"adaptive degree choice of layer {self.name!r}")  # every rank picks the same r
        shard_bytes = tuple(w.numel() * w.element_size() for w in (self.shard.w_in, self.shard.w_out))
        est = {d: estimate_seconds(d, self.layout, int(t), top_k, hidden_size, element_size, shard_bytes,
                                   self.link, torch.is_grad_enabled())
               for d in self.layout.degrees()}
        best = min(est, key=est.get)
        if best != self.last_r:
            log.info("layer %s: adaptive degree r=%d for %d tokens per rank (estimated ms: %s)", self.name, best,
                     int(t), ", ".join(f"r={d}: {v * 1e3:.3g}" for d, v in est.items()))
        return best

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        T, K = routing.topk_ids_TK.shape
        r = self.choose(T, K, x_TD.shape[-1], x_TD.element_size())
        self.shard.r = self.last_r = r
        self.calls_per_r[r] += 1
        if r == 0:
            x_ND, counts, ctx = self.local.dispatch(x_TD, routing)
            return x_ND, counts, (0, ctx)
        if r > 1:
            routing = _expand(routing, r)
        x_MD, counts, ctx = self.a2a[r].dispatch(x_TD, routing)
        return x_MD, counts, (r, ctx)

    def combine(self, y_ND: torch.Tensor, ctx) -> torch.Tensor:
        r, inner = ctx
        return (self.local if r == 0 else self.a2a[r]).combine(y_ND, inner)


def _expand(routing: Routing, r: int) -> Routing:
    """Each assignment (t, k) to expert e -> r assignments to virtual experts e*r + m (m < r,
    the column blocks) with the same weight: the combine then sums the r partial outputs."""
    ids_TK, w_TK = routing.topk_ids_TK, routing.topk_weights_TK
    T, K = ids_TK.shape
    m = torch.arange(r, device=ids_TK.device)
    ids = torch.where(ids_TK.unsqueeze(-1) >= 0, ids_TK.unsqueeze(-1) * r + m, -1).reshape(T, K * r)
    weights = w_TK.unsqueeze(-1).expand(T, K, r).reshape(T, K * r)
    E = routing.tokens_per_expert_E.numel()
    return Routing(ids, weights, routing.logits_TE, routing.scores_TE, count_per_expert(ids, E * r),
                   routing.num_dropped * r)


# ---- conversion -----------------------------------------------------------------------------------

def adaptive_parallel(model: nn.Module, group=None, *, r: Degree = "auto", timeout: timedelta = DEFAULT_TIMEOUT,
                      link: Optional[LinkModel] = None) -> nn.Module:
    """Convert every MoELayer of ``model`` in place to Tutel's adaptive parallelism over ``group``.

    Args:
        model: the single-device model, identical on every rank.
        group: process group, 1-D DeviceMesh or None (the default group); W ranks. Needs W | E
            or E | W (then each expert's F columns are split over W/E ranks, which must divide F).
            With a sub-group, every process must call this (the gather sub-groups are created
            with ``dist.new_group``).
        r: the degree every forward uses (0, or a divisor of max(W/E, 1)), or ``"auto"``: per
            call from :func:`estimate_seconds` with ``link`` (measured here by
            :func:`measure_link` when None). Change it later with :func:`set_parallel_degree`.
        timeout: for every collective (a dead peer raises ExpertParallelError).

    Gradients of expert weights are those of the sum of the ranks' local losses (as with
    :func:`~moekit.parallel.expert_parallel`); ``reduce_expert_grads(world_average=True)``
    after a DDP-averaged backward, ``full_state_dict`` / ``load_full_state_dict`` work as there.
    """
    group = _group_of(group)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("adaptive_parallel: the model has no MoELayer")
    sig = {"num_moe_layers": len(layers), "r": r}
    for i, (_, layer) in enumerate(layers):
        for k, v in _layer_signature(layer).items():
            sig[f"layers[{i}].{k}"] = v
    layouts, error = [], None
    try:
        for name, layer in layers:
            if not isinstance(layer.experts, GroupedExperts) or type(layer.experts) is not GroupedExperts:
                raise ValueError(f"adaptive_parallel: layer {name!r} is already converted "
                                 f"({type(layer.experts).__name__})")
            c = layer.config
            lay = Layout(c.num_experts, W, c.ffn_hidden_size, c.is_glu)
            lay.check()
            if r != "auto" and r not in lay.degrees():
                raise ValueError(f"adaptive_parallel: r={r!r} is not valid for E={c.num_experts} on W={W} ranks; "
                                 f"valid: {lay.degrees()} or 'auto'")
            layouts.append(lay)
    except (ValueError, TypeError) as exc:
        error = exc
    sig["error"] = None if error is None else "conversion refused"
    _check_same_everywhere(sig, group, "the model or r")
    if error is not None:
        raise error
    groups = _gather_groups(group, {lay.gather_size(d) for lay in layouts for d in lay.degrees()},
                            layouts[0].shards)
    if r == "auto" and link is None:
        link = measure_link(group, timeout)
        log.info("adaptive_parallel: measured link: %s", link)
    for (name, layer), lay in zip(layers, layouts):
        shard = AdaptiveShard(layer.experts, lay, rank, groups, timeout, name)
        layer.experts = shard
        layer.dispatcher = AdaptiveDispatcher(group, lay, shard, rank, name, timeout, r, link)
        layer.global_batch = GroupBatch(group, timeout, name)
    return model


def _gather_groups(group, sizes: set[int], shards: int) -> dict:
    """{g: this rank's gather group of g consecutive ranks}; g = W is ``group`` itself."""
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    out = {}
    for g in sorted(sizes):
        if g == 1:
            continue
        if g == W:
            out[g] = group
            continue
        for start in range(0, W, g):  # every rank creates every group, in the same order
            ranks = [dist.get_global_rank(group, q) if group is not dist.group.WORLD else q
                     for q in range(start, start + g)]
            pg = dist.new_group(ranks)
            if start <= rank < start + g:
                out[g] = pg
    return out


def set_parallel_degree(model: nn.Module, r: Degree) -> None:
    """Set the degree (an int valid for every adaptive layer, or ``"auto"``) of every adaptive
    layer of ``model``; parameters do not move, results do not change."""
    found = False
    for name, layer in moe_layers(model):
        d = layer.dispatcher
        if isinstance(d, AdaptiveDispatcher):
            found = True
            if r != "auto" and r not in d.layout.degrees():
                raise ValueError(f"r={r!r} is not valid for layer {name!r}: {d.layout.degrees()} or 'auto'")
            if r == "auto" and d.link is None:
                raise ValueError("r='auto' needs a link model: adaptive_parallel(..., link=measure_link(group))")
            d.r = r
    if not found:
        raise ValueError("set_parallel_degree: the model has no adaptive-parallel MoE layer")
