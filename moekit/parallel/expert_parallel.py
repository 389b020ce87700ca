"""Expert parallelism: each rank holds some experts' weights and tokens travel to them.

Legend: T local tokens, D model dim, K top-k, E logical experts, W ranks, S slots per rank,
P = W*S physical slots, N = T*K local assignments, M rows this rank's experts compute.

``expert_parallel(model, group)`` converts every :class:`~moekit.layer.MoELayer` in place: its
experts become an :class:`ExpertShard` (this rank's S slots) and its dispatcher an
:class:`AllToAllDispatcher`. Router, losses, shared expert and the rest of the model are
untouched: the single-device layer stays the reference, and the converted one computes the
same function of the global batch (the concatenation of every rank's tokens).

Dispatch: assignments are mapped to physical slots (a replicated expert's assignments go to
its replicas in turn), sorted by slot (so by destination rank), counts are exchanged, then the
token rows, with ``all_to_all_single`` and uneven splits. Received rows are reordered from
(source rank, slot) to (slot, source rank) for the experts; combine runs the same steps back
and weights the rows as the local dispatcher does. Only assignments bound for another rank
cross the wire. Autograd flows through both all-to-alls.

Gradients: without data parallelism the gradients are those of the sum of the ranks' local
losses (what autograd through the all-to-all gives). :func:`reduce_expert_grads` sums the
gradients of an expert's replicas (each replica saw part of its tokens) and, with
``world_average=True``, divides expert gradients by W to match DDP's averaging of dense ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from moekit.dispatch import gather_rows, permute_rows, unpermute_rows, weighted_combine
from moekit.experts import GroupedExperts
from moekit.layer import MoELayer, moe_layers
from moekit.parallel import comm
from moekit.parallel.global_batch import GroupBatch
from moekit.parallel.hierarchical import HierarchicalTopology
from moekit.parallel.hierarchical import all_to_all_rows as rows_all_to_all
from moekit.parallel.placement import LayerPlacement, PlacementLike, resolve
from moekit.router import Routing, count_per_expert

DEFAULT_TIMEOUT = timedelta(minutes=5)


class ExpertShard(GroupedExperts):
    """This rank's S physical expert slots: ``w_in [S, H, D]``, ``w_out [S, D, F]``, computed by
    the layer's backend. ``logical_ids`` names the logical expert of each slot."""

    def __init__(self, full: GroupedExperts, logical_ids: list[int]):
        nn.Module.__init__(self)
        self.config = full.config
        self.logical_ids = list(logical_ids)
        idx = torch.tensor(self.logical_ids, dtype=torch.long, device=full.w_in.device)
        rg = full.w_in.requires_grad
        self.w_in = nn.Parameter(full.w_in.detach().index_select(0, idx).clone(), requires_grad=rg)
        self.w_out = nn.Parameter(full.w_out.detach().index_select(0, idx).clone(), requires_grad=rg)

    def extra_repr(self) -> str:
        return f"slots={len(self.logical_ids)} (logical {self.logical_ids}), " + super().extra_repr()


@dataclass
class _Ctx:
    order_N: torch.Tensor  # local (token, slot) positions sorted by physical slot
    perm_M: torch.Tensor  # received (source, slot) order -> (slot, source) order
    send_splits: list[int]
    recv_splits: list[int]
    topk_weights_TK: torch.Tensor
    num_dropped: int


class AllToAllDispatcher:
    """The expert-parallel dispatcher: same two calls as :class:`~moekit.dispatch.LocalDispatcher`."""

    def __init__(self, group, placement: LayerPlacement, rank: int, name: str,
                 timeout: timedelta = DEFAULT_TIMEOUT, rows_group=None):
        self.group, self.placement, self.rank, self.name, self.timeout = group, placement, rank, name, timeout
        # where the token rows travel: ``group`` (flat) or a HierarchicalTopology over it (2DH)
        self.rows_group = group if rows_group is None else rows_group
        self.bytes_sent = 0  # token-row bytes this rank sent to other ranks (dispatch + combine)
        self.rows_remote = 0  # assignments whose expert slot is on another rank
        self._tables = None

    def _physical(self, ids_N: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [N] -> physical slots [N]: replicas taken in turn, starting at this
        rank's offset (deterministic; any split computes the same function)."""
        if self._tables is None or self._tables[0].device != ids_N.device:
            self._tables = self.placement.tables(ids_N.device)
        count_E, slot_ER = self._tables
        if slot_ER.shape[1] == 1:
            return slot_ER[ids_N, 0]
        turn_N = (torch.arange(ids_N.numel(), device=ids_N.device) + self.rank) % count_E[ids_N]
        return slot_ER[ids_N, turn_N]

    def _route_counts(self, routing: Routing):
        """(order_N: kept assignments sorted by physical slot, send_P [W*S] rows for each slot,
        recv_WS [W, S] rows each rank sends to this rank's slots): one counts all-to-all."""
        W, S = self.placement.world_size, self.placement.slots_per_rank
        ids_N = routing.topk_ids_TK.reshape(-1)
        dropped = routing.num_dropped
        if dropped:  # capacity dropped some (id -1): they sort first and are cut off
            slot_N = torch.where(ids_N >= 0, self._physical(ids_N.clamp(min=0)), -1)
        else:
            slot_N = self._physical(ids_N)
        order_N = torch.sort(slot_N, stable=True).indices
        if dropped:
            order_N = order_N[dropped:]
        send_P = count_per_expert(slot_N, W * S)
        recv_WS = comm.all_to_all_counts(send_P, self.group, self.timeout,
                                         f"dispatch of layer {self.name!r} (counts)").view(W, S)
        return order_N, send_P, recv_WS

    def dispatch(self, x_TD: torch.Tensor, routing: Routing):
        """x_TD [T, D] -> (x_MD rows for this rank's slots, sorted by slot; tokens_per_slot_S; ctx)."""
        W, S = self.placement.world_size, self.placement.slots_per_rank
        K = routing.topk_ids_TK.shape[1]
        dropped = routing.num_dropped
        order_N, send_P, recv_WS = self._route_counts(routing)
        what = f"dispatch of layer {self.name!r}"
        send_splits = send_P.view(W, S).sum(1).tolist()  # host sync: the sizes of the exchange
        recv_splits = recv_WS.sum(1).tolist()
        x_sorted = gather_rows(x_TD, order_N, K)
        x_recv = rows_all_to_all(x_sorted, recv_splits, send_splits, self.rows_group, self.timeout, what)
        perm_M = _source_to_slot_order(recv_WS)
        x_MD = permute_rows(x_recv, perm_M)
        remote = sum(n for q, n in enumerate(send_splits) if q != self.rank)
        self.rows_remote += remote
        self.bytes_sent += remote * x_TD.shape[-1] * x_TD.element_size()
        ctx = _Ctx(order_N, perm_M, send_splits, recv_splits, routing.topk_weights_TK, dropped)
        return x_MD, recv_WS.sum(0), ctx

    def combine(self, y_MD: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
        """Expert outputs back to their tokens' ranks, then the weighted sum over K."""
        y_recv = unpermute_rows(y_MD, ctx.perm_M)
        y_sorted = rows_all_to_all(y_recv, ctx.send_splits, ctx.recv_splits, self.rows_group, self.timeout,
                                   f"combine of layer {self.name!r}")
        remote = sum(n for q, n in enumerate(ctx.recv_splits) if q != self.rank)
        self.bytes_sent += remote * y_MD.shape[-1] * y_MD.element_size()
        return weighted_combine(y_sorted, ctx.order_N, ctx.topk_weights_TK, ctx.num_dropped)


def _source_to_slot_order(recv_WS: torch.Tensor) -> torch.Tensor:
    """Rows arrive grouped by source rank, then slot; the experts want slot, then source rank.
    Returns perm_M with ``x_by_slot = x_by_source[perm_M]``."""
    W, S = recv_WS.shape
    slot_of_row = torch.repeat_interleave(torch.arange(W * S, device=recv_WS.device) % S, recv_WS.reshape(-1))
    return torch.sort(slot_of_row, stable=True).indices


# ---- conversion ----------------------------------------------------------------------------------

def _group_of(group):
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("expert_parallel needs torch.distributed initialised (dist.init_process_group) "
                               "or a group / DeviceMesh dimension")
        return dist.group.WORLD
    if hasattr(group, "get_group"):  # a 1-D DeviceMesh (or one dimension of one)
        return group.get_group()
    return group


def _layer_signature(layer: MoELayer) -> dict:
    c = layer.config
    return {"num_experts": c.num_experts, "top_k": c.top_k, "hidden_size": c.hidden_size,
            "ffn_hidden_size": c.ffn_hidden_size, "activation": c.activation, "router": c.router,
            "capacity_factor": c.capacity_factor, "dtype": str(layer.experts.w_in.dtype)}


def _check_same_everywhere(sig: dict, group, what: str) -> None:
    """All ranks hold the same ``sig``; otherwise an error naming the field and the ranks."""
    W = dist.get_world_size(group)
    sigs: list = [None] * W
    dist.all_gather_object(sigs, sig, group=group)
    for key in sig:
        values = {}
        for r, s in enumerate(sigs):
            values.setdefault(repr(s.get(key)), []).append(r)
        if len(values) > 1:
            detail = "; ".join(f"{v} on ranks {rs}" for v, rs in values.items())
            raise ValueError(f"expert_parallel: {what} differs across ranks in {key!r}: {detail}")


def expert_parallel(model: nn.Module, group=None, *, placement: PlacementLike = None,
                    timeout: timedelta = DEFAULT_TIMEOUT, ranks_per_node: Optional[int] = None,
                    overlap: str = "none", chunks: Union[str, int] = "auto", transport: str = "auto") -> nn.Module:
    """Convert every MoELayer of ``model`` in place to run expert parallel over ``group``.

    Args:
        model: holds the full (single-device) weights on every rank, identical on all ranks
            (e.g. built from the same seed or loaded from one checkpoint).
        group: a process group, a 1-D ``DeviceMesh`` (or a dimension of one), or None for the
            default group. Its W ranks split the experts.
        placement: None (contiguous: rank r holds experts ``[r*E/W, (r+1)*E/W)``, needs W | E),
            the path of a ``moekit plan`` JSON, its dict, or a planner ``Placement``; its
            ``num_gpus`` must be W and its layers the model's MoE layers in module order.
        timeout: how long a collective waits for the other ranks before failing with an
            :class:`~moekit.parallel.comm.ExpertParallelError`.
        ranks_per_node: None: one flat all-to-all over the group. L: Tutel's two-level (2DH)
            all-to-all, intra-node then inter-node, with rank r on node r // L (L must divide W;
            the group must span every process, since the node subgroups are created with
            ``dist.new_group``). Same results as flat, fewer and larger inter-node messages.
        overlap: "none" (dispatch, experts and combine one after the other: the reference),
            "chunked" (Tutel's pipelining: d chunks, the exchange of one overlapping the experts
            of another) or "fine" (Comet: local rows first, each peer's rows computed as they
            arrive and sent back at once), forward and backward; see :mod:`moekit.parallel.overlap`.
        chunks: with overlap, the number of chunks ("chunked") or row blocks per peer
            ("fine"), or "auto": measured per shape on the first calls and cached.
        transport: with overlap, how its messages are posted: "auto" (NCCL groups: grouped
            ``batch_isend_irecv`` waves in the same order on every rank; gloo groups: tagged
            messages, every receive posted first), "tagged" (gloo only) or "waves" (NCCL or gloo).

    Returns ``model``. Each rank keeps only its slots' expert weights.
    """
    from moekit.parallel import overlap as _overlap  # it subclasses AllToAllDispatcher

    _overlap.check_overlap(overlap, chunks, ranks_per_node, transport)
    group = _group_of(group)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("expert_parallel: the model has no MoELayer")
    sig = {"num_moe_layers": len(layers), "layer_names": [n for n, _ in layers], "overlap": overlap,
           "chunks": chunks, "transport": transport}
    for i, (_, layer) in enumerate(layers):
        for k, v in _layer_signature(layer).items():
            sig[f"layers[{i}].{k}"] = v
    placements = None
    error = None
    try:
        E = {layer.config.num_experts for _, layer in layers}
        if len(E) != 1:
            raise ValueError(f"expert_parallel: MoE layers differ in num_experts {sorted(E)}")
        placements = resolve(placement, E.pop(), W, len(layers))
        sig["placement"] = [p.phy2log for p in placements]
    except (ValueError, TypeError) as exc:
        error = exc
        sig["placement"] = f"error: {exc}"
    _check_same_everywhere(sig, group, "the model or the placement")  # collective: before raising
    if error is not None:
        raise error
    rows_group = None if ranks_per_node is None else HierarchicalTopology(group, ranks_per_node)
    for (name, layer), pl in zip(layers, placements):
        if isinstance(layer.dispatcher, AllToAllDispatcher):
            raise ValueError(f"expert_parallel: layer {name!r} is already expert parallel")
        layer.experts = ExpertShard(layer.experts, pl.slots_of(rank))
        if overlap == "none":
            layer.dispatcher = AllToAllDispatcher(group, pl, rank, name, timeout, rows_group)
        else:
            layer.dispatcher = _overlap.OverlapDispatcher(group, pl, rank, name, timeout, overlap, chunks, transport)
        layer.global_batch = GroupBatch(group, timeout, name)
    return model


def _ep_layers(model: nn.Module):
    """Layers whose experts are split over ranks: expert parallel, or adaptive (whose experts
    have ``full_weights`` / ``load_full``, see :mod:`moekit.parallel.adaptive`)."""
    return [(n, m) for n, m in moe_layers(model)
            if isinstance(m.dispatcher, AllToAllDispatcher) or hasattr(m.experts, "full_weights")]


def expert_param_names(model: nn.Module) -> list[str]:
    """Names of the expert-parallel parameters (each rank holds different ones): what DDP must
    ignore (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)."""
    return [f"{n}.experts.{p}" for n, _ in _ep_layers(model) for p in ("w_in", "w_out")]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module, *, world_average: bool = False, data_parallel_group=None,
                        timeout: Optional[timedelta] = None) -> None:
    """Finish the expert gradients after backward (before ``optimizer.step()``):

    - replicas of an expert each saw part of its tokens: their gradients are summed (one
      all-reduce per layer with replicas), so every replica takes the same step;
    - ``data_parallel_group`` (the expert-data-parallel group: the ranks holding the same
      experts in other expert-parallel groups, e.g. the other dimension of a 2-D DeviceMesh):
      expert gradients are summed over it, so every copy of an expert takes the step of all
      the tokens it served anywhere;
    - ``world_average=True`` divides every expert gradient by the number of ranks whose losses
      were summed (W, times the expert-data-parallel size): use it when DDP or FSDP averages
      the dense gradients over all those ranks, so the whole model follows their mean loss.
    """
    if data_parallel_group is not None and hasattr(data_parallel_group, "get_group"):
        data_parallel_group = data_parallel_group.get_group()
    dp = dist.get_world_size(data_parallel_group) if data_parallel_group is not None else 1
    for name, layer in _ep_layers(model):
        params = [p for p in (layer.experts.w_in, layer.experts.w_out) if p.grad is not None]
        if hasattr(layer.experts, "full_weights"):  # adaptive: the gather's backward summed the shards
            W = layer.experts.layout.world_size
            wait_for = layer.experts.timeout
        else:
            d: AllToAllDispatcher = layer.dispatcher
            W, wait_for = d.placement.world_size, d.timeout
            if d.placement.replicated and params:
                _sum_replicas(name, d, layer.experts, params)
        if dp > 1:
            for p in params:
                comm.wait(dist.all_reduce(p.grad, group=data_parallel_group, async_op=True), timeout or wait_for,
                          f"expert-data-parallel gradient sum of layer {name!r}")
        if world_average:
            for p in params:
                p.grad.div_(W * dp)


def _sum_replicas(name: str, d: AllToAllDispatcher, shard: ExpertShard, params: list) -> None:
    reps = d.placement.replicas()
    rep_experts = [e for e, r in enumerate(reps) if len(r) > 1]
    local = [(s, shard.logical_ids[s]) for s in range(len(shard.logical_ids))
             if len(reps[shard.logical_ids[s]]) > 1]
    index = {e: i for i, e in enumerate(rep_experts)}
    for p in params:
        buf = p.grad.new_zeros(len(rep_experts), *p.shape[1:])
        for s, e in local:
            buf[index[e]] += p.grad[s]
        comm.wait(dist.all_reduce(buf, group=d.group, async_op=True), d.timeout,
                  f"replica gradient sum of layer {name!r}")
        for s, e in local:
            p.grad[s].copy_(buf[index[e]])


# ---- full state dict -------------------------------------------------------------------------------

@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the unconverted model (same keys and shapes), on every rank: each
    expert-parallel layer's ``experts.w_in [E, H, D]`` / ``w_out [E, D, F]`` gathered from the
    ranks (an expert's first replica). A collective: call it on every rank."""
    sd = model.state_dict()
    for name, layer in _ep_layers(model):
        if hasattr(layer.experts, "full_weights"):
            sd[f"{name}.experts.w_in"], sd[f"{name}.experts.w_out"] = layer.experts.full_weights()
            continue
        d: AllToAllDispatcher = layer.dispatcher
        first_slot = torch.tensor([r[0] for r in d.placement.replicas()], dtype=torch.long)
        for pname in ("w_in", "w_out"):
            full = comm.all_gather_rows(getattr(layer.experts, pname).detach(), d.group, d.timeout,
                                        f"full_state_dict of layer {name!r}")
            sd[f"{name}.experts.{pname}"] = full.index_select(0, first_slot.to(full.device))
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Load an unconverted model's state dict into an expert-parallel model: each rank takes
    its slots' rows of the full expert tensors. Returns ``load_state_dict``'s result."""
    sd = dict(state_dict)
    for name, layer in _ep_layers(model):
        keys = [f"{name}.experts.{p}" for p in ("w_in", "w_out")]
        E = layer.config.num_experts
        for key in keys:
            if key in sd and sd[key].shape[0] != E:
                raise ValueError(f"{key} has {sd[key].shape[0]} experts, the model {E}")
        if hasattr(layer.experts, "shard_of"):
            if all(k in sd for k in keys):
                sd[keys[0]], sd[keys[1]] = (t.contiguous() for t in layer.experts.shard_of(sd[keys[0]], sd[keys[1]]))
            continue
        idx = torch.tensor(layer.experts.logical_ids, dtype=torch.long)
        for key in keys:
            if key in sd:
                sd[key] = sd[key].index_select(0, idx.to(sd[key].device))
    return model.load_state_dict(sd, strict=strict)
