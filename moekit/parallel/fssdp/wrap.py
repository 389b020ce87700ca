"""``fssdp(model, group)``: fully sharded sparse data parallelism (Hecate) for every MoELayer.

Legend: T local tokens, D model dim, H = 2F (GLU) or F, E experts per layer, L MoE layers,
W ranks, O_d experts rank d owns in a layer, H_d experts it holds in P' (owned + replicas),
S slots per rank of the dispatch table (max_d H_d), M rows this rank's experts compute,
X = H*D + D*F elements of one expert.

Sharding: each layer's experts are owned one rank each (P; contiguous at conversion, changed
by re-sharding). A layer's ``experts`` becomes an :class:`FSSDPExperts` whose parameters
``w_in [O_d, H, D]`` / ``w_out [O_d, D, F]`` are the owned experts only (ascending id): they are
the only expert tensors in ``model.parameters()``, so an ordinary optimizer keeps expert
optimizer state on the owners only. Dense parameters (routers, shared experts, the rest of the
model) are replicated under DDP (or sharded under FSDP2, ``dense="fsdp2"``), applied here.

Each step (at the model's forward):

1. the per-expert token counts of the previous forward are all-reduced (one int64 collective
   for all layers) into a window of the last ``window`` steps (:class:`LoadWindow`);
2. every rank computes P' per layer with Algorithm 1 (:func:`choose_materialization`: memory
   cap m, overlap degree t) and all ranks compare a digest of all layers' P' (one all-gather
   of W int64): a rank whose P' differs makes every rank raise :class:`FSSDPError` instead of
   entering mismatched collectives;
3. layer l's SparseAllGather is launched asynchronously when layer l-1 finishes its forward
   (layer 0's at the model's forward), so it runs while the non-MoE layers between them do;
   the layer waits for it just before its experts;
4. tokens go to a holder of their expert: this rank if it holds it, else the holders on this
   rank's node, else all holders, split evenly (each source rank deals its assignments of an
   expert out in turn, starting at its own rank) (:class:`SparseDispatcher`);
5. in backward, the SparseAllGather's backward launches the SparseReduceScatter asynchronously
   (it runs while the layers below do their backward); when backward ends, owners' ``.grad``
   hold the sum of their copies' gradients, divided by W (DDP averages the dense gradients, so
   the whole model follows the mean of the ranks' local losses), before ``opt.step()``.

Training contract::

    model = fssdp(model)                       # returns the DDP-wrapped model
    opt = torch.optim.Adam(model.parameters())
    attach_optimizer(model, opt)               # only needed for reshard_every (moves optimizer state)
    for x in local_batches:                    # any number of tokens per rank, also none
        opt.zero_grad(); loss_fn(model(x)).backward(); opt.step()

equals one process running the unconverted model on the concatenation of every rank's tokens
with the mean of the ranks' losses. Every rank must run every forward and backward (the
collectives are matched across ranks). Aux losses computed on the global batch are shares of
the global value, and DDP divides their gradients by W too: call
``set_aux_loss_scale(model, W)`` to weigh them as on one device.

Collectives run on three process groups over the same ranks: ``group`` (token all-to-alls,
counts, P' digests), a weight group (sparse collectives, created here with ``dist.new_group``)
and DDP's own: the sparse reduce-scatters run in backward in an order (reverse layer order)
independent of when the token all-to-alls and DDP's buckets run, and separate groups keep the
three sequences from interleaving differently on different ranks. No per-subset groups.

Re-materialisation (``remat=True``): the layer's replicas are not kept for backward; the expert
computation (SparseAllGather + expert MLPs) runs under ``torch.utils.checkpoint`` (non-reentrant),
so backward fetches the replicas again (a second SparseAllGather) and recomputes the expert
activations; only the owned weights and the expert inputs are saved.
"""
from __future__ import annotations

import time
import warnings
import weakref
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moekit.experts import BACKENDS, GroupedExperts, resolve_backend
from moekit.layer import MoELayer, moe_layers
from moekit.parallel import comm
from moekit.parallel.comm import ExpertParallelError
from moekit.parallel.expert_parallel import (DEFAULT_TIMEOUT, AllToAllDispatcher, _check_same_everywhere,
                                             _group_of, _layer_signature, expert_param_names)
from moekit.parallel.fssdp.materialize import LoadWindow, choose_materialization, overlap_degree
from moekit.parallel.fssdp.sharding import move_owned_rows, reshard_owners
from moekit.parallel.fssdp.sparse import (Materialization, PendingGather, PendingReduce, Traffic, launch_all_gather,
                                          launch_reduce_scatter)
from moekit.parallel.global_batch import GroupBatch
from moekit.parallel.placement import LayerPlacement


class FSSDPError(ExpertParallelError):
    """FSSDP's per-step agreement failed (ranks computed different placements P')."""


class FSSDPExperts(nn.Module):
    """One layer's experts under FSSDP: owned rows ``w_in [O_d, H, D]``, ``w_out [O_d, D, F]``
    (parameters); ``forward(x_MD, tokens_per_slot_S)`` materialises the held experts of the
    step's P' (SparseAllGather) and runs the layer's backend over them (slot s = the s-th held
    expert in ascending id; slots past H_d have no rows)."""

    def __init__(self, full: GroupedExperts, owned_ids: list[int], ctl: "FSSDPController", index: int):
        super().__init__()
        self.config = full.config
        self.owned_ids = list(owned_ids)
        self.in_shape, self.out_shape = tuple(full.w_in.shape[1:]), tuple(full.w_out.shape[1:])
        idx = torch.tensor(self.owned_ids, dtype=torch.long, device=full.w_in.device)
        rg = full.w_in.requires_grad
        self.w_in = nn.Parameter(full.w_in.detach().index_select(0, idx).clone(), requires_grad=rg)
        self.w_out = nn.Parameter(full.w_out.detach().index_select(0, idx).clone(), requires_grad=rg)
        self._ctl = weakref.proxy(ctl)  # the controller holds the layers; no cycle through modules
        self.index = index
        self.mat: Optional[Materialization] = None  # this step's P'
        self._pending: Optional[PendingGather] = None
        self._live: list = []  # weak references to materialised tensors (replica bytes alive)

    @property
    def elements_per_expert(self) -> int:
        """p: elements of one expert (w_in and w_out)."""
        return int(torch.Size(self.in_shape).numel() + torch.Size(self.out_shape).numel())

    @property
    def bytes_per_expert(self) -> int:
        """Bytes of one expert's weights (what the sparse collectives move per copy)."""
        return self.elements_per_expert * self.w_in.element_size()

    def _pack(self, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
        """[O, H, D], [O, D, F] -> x_OX [O, X] (differentiable)."""
        O = w_in.shape[0]
        n_in, n_out = int(torch.Size(self.in_shape).numel()), int(torch.Size(self.out_shape).numel())
        return torch.cat([w_in.reshape(O, n_in), w_out.reshape(O, n_out)], 1)

    def _unpack(self, x_HX: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = int(torch.Size(self.in_shape).numel())
        H = x_HX.shape[0]
        return x_HX[:, :n].reshape(H, *self.in_shape), x_HX[:, n:].reshape(H, *self.out_shape)

    def prefetch(self) -> None:
        """Launch this step's SparseAllGather asynchronously (awaited in forward)."""
        if self._pending is None and self.mat is not None:
            c = self._ctl
            self._pending = launch_all_gather(self._pack(self.w_in, self.w_out).detach(), self.mat, c.wgroup,
                                              traffic=c.spag_traffic, timeout=c.timeout,
                                              what=f"SparseAllGather of layer {c.names[self.index]!r}")

    def forward(self, x_MD: torch.Tensor, tokens_per_slot_S: torch.Tensor) -> torch.Tensor:
        """x_MD [M, D] sorted by slot, tokens_per_slot_S int [S] -> y_MD [M, D] (unweighted)."""
        if self.mat is None:
            raise RuntimeError("FSSDPExperts called outside an FSSDP model's forward (no placement for this step)")
        if self._ctl.remat and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._compute, x_MD, tokens_per_slot_S, self.w_in, self.w_out, self.mat,
                              use_reentrant=False)
        return self._compute(x_MD, tokens_per_slot_S, self.w_in, self.w_out, self.mat)

    def _compute(self, x_MD, tokens_per_slot_S, w_in, w_out, mat):
        c = self._ctl
        pending, self._pending = self._pending, None  # a recompute in backward fetches again
        if pending is None:
            pending = launch_all_gather(self._pack(w_in, w_out).detach(), mat, c.wgroup, traffic=c.spag_traffic,
                                        timeout=c.timeout, what=f"SparseAllGather of layer {c.names[self.index]!r}")
        w_HX = _Materialize.apply(self._pack(w_in, w_out), self, mat, pending)
        self._live = [r for r in self._live if r() is not None] + [weakref.ref(w_HX)]
        w_in_H, w_out_H = self._unpack(w_HX)
        H = w_HX.shape[0]
        name = resolve_backend(self.config.backend, x_MD.device, x_MD.dtype,
                               (x_MD.shape[-1], w_in_H.shape[1], w_out_H.shape[-1]))
        return BACKENDS[name](x_MD, tokens_per_slot_S[:H], w_in_H, w_out_H, self.config.activation)

    @torch.no_grad()
    def _add_remote_grads(self, pr: PendingReduce) -> None:
        """End of backward: wait for the spRS launched in backward and add the other holders'
        rows (times the gradient scale) to the owned experts' ``.grad``, in ascending source rank."""
        recv_nX, idx = pr.wait()
        if not idx or self.w_in.grad is None or self.w_out.grad is None:
            return
        n_in = int(torch.Size(self.in_shape).numel())
        recv_nX = recv_nX * self._ctl.grad_scale if self._ctl.grad_scale != 1.0 else recv_nX
        g_in = recv_nX[:, :n_in].reshape(-1, *self.in_shape)
        g_out = recv_nX[:, n_in:].reshape(-1, *self.out_shape)
        for i, j in enumerate(idx):
            self.w_in.grad[j] += g_in[i]
            self.w_out.grad[j] += g_out[i]

    def live_materialized_bytes(self) -> int:
        """Bytes of replica weights (non-owned rows of materialised tensors) still alive."""
        total = 0
        for r in self._live:
            t = r()
            if t is not None and self.mat is not None:
                total += (t.shape[0] - len(self.owned_ids)) * t[0].numel() * t.element_size() if t.shape[0] else 0
        return total

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [E, H, D], w_out [E, D, F]) on every rank: one SparseAllGather to everywhere. A collective."""
        c = self._ctl
        owners = c.owners[self.index]
        everywhere = Materialization.everywhere(owners, c.world_size)
        full = launch_all_gather(self._pack(self.w_in, self.w_out), everywhere, c.wgroup, timeout=c.timeout,
                                 what=f"full weights of layer {c.names[self.index]!r}").wait()
        return self._unpack(full)

    def shard_of(self, full_in: torch.Tensor, full_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's owned rows of full ``[E, ...]`` tensors (load_full_state_dict)."""
        idx = torch.tensor(self.owned_ids, dtype=torch.long, device=full_in.device)
        return full_in.index_select(0, idx), full_out.index_select(0, idx.to(full_out.device))

    def extra_repr(self) -> str:
        return f"owned={self.owned_ids}, in={self.in_shape}, out={self.out_shape}"


class _Materialize(torch.autograd.Function):
    """x_OX (owned rows, packed) -> x_HX (held rows): the layer's SparseAllGather (already
    launched: ``pending``). Backward: the SparseReduceScatter is launched asynchronously; the
    owned rows' own gradient returns at once and the other holders' rows are added to the
    owners' ``.grad`` when backward ends (an autograd engine callback), so the exchange overlaps
    the backward of the layers below."""

    @staticmethod
    def forward(ctx, x_OX, experts: "FSSDPExperts", mat: Materialization, pending: PendingGather):
        ctx.experts, ctx.mat = experts, mat
        return pending.wait()

    @staticmethod
    def backward(ctx, grad_HX):
        ex: FSSDPExperts = ctx.experts
        c = ex._ctl
        pr = launch_reduce_scatter(grad_HX, ctx.mat, c.wgroup, traffic=c.sprs_traffic, timeout=c.timeout,
                                   what=f"SparseReduceScatter of layer {c.names[ex.index]!r}")
        torch.autograd.Variable._execution_engine.queue_callback(lambda: ex._add_remote_grads(pr))
        g = pr.owned
        if c.grad_scale != 1.0:
            g = g * c.grad_scale
        return g, None, None, None


class SparseDispatcher(AllToAllDispatcher):
    """The all-to-all dispatcher over this step's P' (see the module docstring, step 4).

    Rank q's slots are the experts it holds, ascending (padded to S = max_q H_q with slots that
    get no rows). ``rows_computed``: expert rows this rank computed (accumulated)."""

    def __init__(self, group, rank: int, name: str, timeout: timedelta, num_experts: int,
                 ranks_per_node: Optional[int]):
        W = dist.get_world_size(group)
        super().__init__(group, LayerPlacement(tuple(range(num_experts)), 1, num_experts, num_experts), rank,
                         name, timeout)
        self.world_size, self.num_experts, self.ranks_per_node = W, num_experts, ranks_per_node or W
        self.rows_computed = 0
        self.mat: Optional[Materialization] = None

    def set_materialization(self, mat: Materialization) -> None:
        W, E = self.world_size, self.num_experts
        if mat.num_experts != E or mat.world_size != W:
            raise ValueError(f"placement for {mat.num_experts} experts over {mat.world_size} ranks; layer "
                             f"{self.name!r} has {E} experts over {W} ranks")
        held = [mat.held(q) for q in range(W)]
        S = max(1, max(len(h) for h in held))
        phy2log = []
        slot_of = {}
        for q, hs in enumerate(held):
            for s, e in enumerate(hs):
                slot_of[(q, e)] = q * S + s
            phy2log += hs + [hs[-1] if hs else 0] * (S - len(hs))
        self.placement = LayerPlacement(tuple(phy2log), W, S, E)
        node = [r // self.ranks_per_node for r in range(W)]
        me = self.rank
        cands = []
        for e in range(E):
            hs = mat.holders_E[e]
            if me in hs:
                c = [me]
            else:
                c = [q for q in hs if node[q] == node[me]] or list(hs)
            cands.append([slot_of[(q, e)] for q in c])
        R = max(len(c) for c in cands)
        self._count_E = torch.tensor([len(c) for c in cands], dtype=torch.long)
        self._cand_ER = torch.tensor([c + [c[0]] * (R - len(c)) for c in cands], dtype=torch.long)
        self.mat = mat

    def _physical(self, ids_N: torch.Tensor) -> torch.Tensor:
        """Logical ids [N] -> physical slots [N]: the k-th assignment (token order) of expert e
        from this rank goes to candidate (k + rank) mod n_e."""
        count_E = self._count_E.to(ids_N.device)
        cand_ER = self._cand_ER.to(ids_N.device)
        N = ids_N.numel()
        order = torch.sort(ids_N, stable=True).indices
        sorted_ids = ids_N[order]
        first = torch.searchsorted(sorted_ids, sorted_ids, right=False)
        occ_N = torch.empty_like(ids_N)
        occ_N[order] = torch.arange(N, device=ids_N.device) - first
        turn_N = (occ_N + self.rank) % count_E[ids_N]
        return cand_ER[ids_N, turn_N]

    def dispatch(self, x_TD, routing):
        x_MD, tokens_per_slot_S, ctx = super().dispatch(x_TD, routing)
        self.rows_computed += x_MD.shape[0]
        return x_MD, tokens_per_slot_S, ctx


class FSSDPController:
    """Per-model FSSDP state: owners P, the load window, this step's P', traffic counters, the
    hooks. Reachable as ``fssdp_state(model)``."""

    def __init__(self, layers, group, *, memory_cap: int, overlap, bandwidth, window: int,
                 remat: bool, reshard_every: Optional[int], ranks_per_node: Optional[int], timeout: timedelta,
                 grad_scale: float):
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        ranks = dist.get_process_group_ranks(group)
        self.wgroup = dist.new_group(ranks=ranks, timeout=timeout)  # the sparse collectives' own sequence
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.memory_cap, self.overlap, self.bandwidth = memory_cap, overlap, bandwidth
        self.remat, self.reshard_every, self.ranks_per_node = remat, reshard_every, ranks_per_node
        self.timeout, self.grad_scale = timeout, grad_scale
        E, W = self.layers[0].config.num_experts, self.world_size
        self.num_experts = E
        self.owners: list[list[int]] = [[e * W // E for e in range(E)] for _ in self.layers]
        self.window = LoadWindow(len(self.layers), E, window)
        self.mats: list[Materialization] = [Materialization.owners_only(o, W) for o in self.owners]
        self.spag_traffic, self.sprs_traffic, self.move_traffic = Traffic(), Traffic(), Traffic()
        self.steps = 0  # forwards begun
        self.optimizer_steps = 0
        self.last_overlap: list[Optional[int]] = [None] * len(self.layers)
        self._counts = torch.zeros(len(self.layers), E, dtype=torch.long)
        self._counted = False
        self._non_moe_us = [0] * len(self.layers)
        self._t_mark = None
        self.digest_check: bool = True  # compare P' digests across ranks each step (one all-gather)
        self._hooks = []

    # ---- per step --------------------------------------------------------------------------------
    def begin_step(self, *_args) -> None:
        L = len(self.layers)
        if self._counted:  # previous forward's counts (and non-MoE times) -> the window
            buf = torch.cat([self._counts.reshape(-1), torch.tensor(self._non_moe_us, dtype=torch.long)])
            comm.wait(dist.all_reduce(buf, group=self.group, async_op=True), self.timeout,
                      "FSSDP expert loads")
            self.window.push(buf[:-L].view(L, self.num_experts))
            self._non_moe_s = [v / 1e6 / self.world_size for v in buf[-L:].tolist()]
            self._counts.zero_()
            self._counted = False
        total = self.window.total()
        mats = []
        for l, layer in enumerate(self.layers):
            t = self._overlap_for(l, layer)
            self.last_overlap[l] = t
            mats.append(choose_materialization(total[l].tolist(), self.owners[l], self.world_size, self.memory_cap,
                                               t, self.ranks_per_node))
        self.set_materializations(mats)
        self.steps += 1
        self._t_mark = time.perf_counter()
        if self.layers:
            self.layers[0].experts.prefetch()

    def _overlap_for(self, l: int, layer: MoELayer) -> Optional[int]:
        if self.overlap != "auto":
            return self.overlap
        if not len(self.window):
            return None
        return overlap_degree(self._non_moe_s[l], self.bandwidth, layer.experts.bytes_per_expert)

    def set_materializations(self, mats: list[Materialization]) -> None:
        """Use ``mats`` (one P' per layer) for the next forward, after checking that every rank
        has the same (one all-gather of a digest). A collective."""
        if self.digest_check:
            h = Materialization.owners_only([0], 1).digest()
            for m in mats:
                h = hash((h, m.digest())) & ((1 << 62) - 1)
            mine = torch.tensor([h], dtype=torch.long)
            allh = comm.all_gather_rows(mine, self.group, self.timeout, "FSSDP placement agreement").tolist()
            if len(set(allh)) > 1:
                groups: dict = {}
                for r, v in enumerate(allh):
                    groups.setdefault(v, []).append(r)
                detail = "; ".join(f"ranks {rs}" for rs in groups.values())
                raise FSSDPError(f"moekit fssdp: ranks computed different placements P' at step {self.steps} "
                                 f"(groups agreeing: {detail}); their loads, owners or settings diverged")
        self.mats = list(mats)
        for layer, mat in zip(self.layers, mats):
            layer.experts.mat = mat
            layer.experts._pending = None
            layer.dispatcher.set_materialization(mat)

    def before_layer(self, l: int) -> None:
        now = time.perf_counter()
        if self._t_mark is not None:
            self._non_moe_us[l] = int((now - self._t_mark) * 1e6)

    def after_layer(self, l: int, layer: MoELayer) -> None:
        self._counts[l] += layer.tokens_per_expert.cpu()
        self._counted = True
        if l + 1 < len(self.layers):
            self.layers[l + 1].experts.prefetch()
        self._t_mark = time.perf_counter()

    # ---- re-sharding ---------------------------------------------------------------------------
    @torch.no_grad()
    def reshard(self, optimizer: Optional[torch.optim.Optimizer] = None) -> list[list[int]]:
        """Algorithm 2 from the windowed loads: new owners for every layer; parameters (and the
        optimizer's state tensors shaped like them) move to the new owners. A collective.
        Returns the new owners [L][E]."""
        total = self.window.total().tolist()
        new = reshard_owners(total, self.owners, self.world_size, self.ranks_per_node)
        for l, layer in enumerate(self.layers):
            old = self.owners[l]
            if new[l] == old:
                continue
            ex: FSSDPExperts = layer.experts
            for p in (ex.w_in, ex.w_out):
                states = optimizer.state.get(p, {}) if optimizer is not None else {}
                moved = {k: v for k, v in states.items() if isinstance(v, torch.Tensor) and v.shape == p.shape
                         and v.dim() > 0}
                for k, v in moved.items():
                    states[k] = move_owned_rows(v, old, new[l], self.rank, self.wgroup, traffic=self.move_traffic,
                                                timeout=self.timeout)
                p.data = move_owned_rows(p.data, old, new[l], self.rank, self.wgroup, traffic=self.move_traffic,
                                         timeout=self.timeout)
                p.grad = None
            ex.owned_ids = [e for e in range(self.num_experts) if new[l][e] == self.rank]
            self.owners[l] = list(new[l])
        self.mats = [Materialization.owners_only(o, self.world_size) for o in self.owners]
        return new

    def _on_step(self, optimizer) -> None:
        self.optimizer_steps += 1
        if self.reshard_every and self.optimizer_steps % self.reshard_every == 0:
            self.reshard(optimizer)


def _device_type(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cpu" if p is None else p.device.type


def _controller(model: nn.Module) -> FSSDPController:
    inner = getattr(model, "module", model)
    ctl = getattr(inner, "_fssdp", None)
    if ctl is None:
        raise ValueError("the model was not converted by moekit.parallel.fssdp")
    return ctl


def fssdp_state(model: nn.Module) -> FSSDPController:
    """The :class:`FSSDPController` of a model returned by :func:`fssdp` (owners, P', traffic)."""
    return _controller(model)


def attach_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Re-shard (Algorithm 2) after every ``reshard_every``-th ``optimizer.step()``, moving the
    optimizer's state with the parameters. Returns the hook handle."""
    ctl = _controller(model)
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: ctl._on_step(opt))


def fssdp(model: nn.Module, group=None, *, memory_cap: Optional[int] = None, overlap=None,
          bandwidth: Optional[float] = None, window: int = 5, remat: bool = False,
          reshard_every: Optional[int] = None, ranks_per_node: Optional[int] = None, dense: Optional[str] = "ddp",
          timeout: timedelta = DEFAULT_TIMEOUT) -> nn.Module:
    """Convert every MoELayer of ``model`` to FSSDP over ``group`` (see the module docstring).

    Args:
        model: the full single-device model, identical on every rank.
        group: process group (or 1-D DeviceMesh), None for the world. Creating the weight group
            calls ``dist.new_group``: every process of the world must call ``fssdp``.
        memory_cap: m, non-owned experts a rank may materialise per layer (default ceil(E/W):
            twice expert parallelism's expert memory at most).
        overlap: t, an int, None (no limit: the memory cap decides) or "auto" (measured: the
            non-MoE time before each layer in the previous step, averaged over ranks, times
            ``bandwidth`` bytes/s, divided by an expert's bytes).
        bandwidth: for "auto"; None: measured once here (``measure_link``'s all-to-all fit).
        window: steps of loads averaged (Hecate: 5).
        remat: re-materialisation (free replicas after forward, fetch again in backward).
        reshard_every: R; re-shard after every R-th optimizer step (needs :func:`attach_optimizer`).
        ranks_per_node: rank r is on node r // ranks_per_node (dispatch and placement prefer
            same-node copies); None: one node.
        dense: "ddp" (wrap in DistributedDataParallel over a group of the same ranks, expert
            parameters ignored; the result is the DDP module), "fsdp2" (``fully_shard`` on the
            dense parameters over a 1-D mesh of a group of the same ranks, experts ignored, in
            place: :func:`~moekit.parallel.shard_dense`; ``full_state_dict`` then holds DTensors
            for them, ``.full_tensor()`` gathers) or None (dense gradients left as each rank
            computes them; expert gradients are then those of the sum of the ranks' losses).

    Returns the DDP-wrapped model (``dense="ddp"``) or ``model`` (converted in place)."""
    group = _group_of(group)
    W, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = list(moe_layers(model))
    if not layers:
        raise ValueError("fssdp: the model has no MoELayer")
    if dense not in ("ddp", "fsdp2", None):
        raise ValueError(f"fssdp: dense must be 'ddp', 'fsdp2' or None, got {dense!r}")
    if overlap not in (None, "auto") and (not isinstance(overlap, int) or overlap < 0):
        raise ValueError(f"fssdp: overlap must be a non-negative int, None or 'auto', got {overlap!r}")
    if overlap == "auto" and bandwidth is not None and not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ValueError(f"fssdp: bandwidth must be bytes/s > 0 (or None: measured), got {bandwidth!r}")
    if reshard_every is not None and (not isinstance(reshard_every, int) or reshard_every < 1):
        raise ValueError(f"fssdp: reshard_every must be a positive int, got {reshard_every!r}")
    if ranks_per_node is not None and (ranks_per_node < 1 or W % ranks_per_node):
        raise ValueError(f"fssdp: ranks_per_node={ranks_per_node} must divide the group size {W}")
    sig = {"num_moe_layers": len(layers), "layer_names": [n for n, _ in layers],
           "settings": repr((memory_cap, overlap, bandwidth, window, remat, reshard_every, ranks_per_node, dense))}
    for i, (_, layer) in enumerate(layers):
        for k, v in _layer_signature(layer).items():
            sig[f"layers[{i}].{k}"] = v
    _check_same_everywhere(sig, group, "the model or the fssdp settings")
    Es = {layer.config.num_experts for _, layer in layers}
    if len(Es) != 1:
        raise ValueError(f"fssdp: MoE layers differ in num_experts {sorted(Es)}")
    E = Es.pop()
    for name, layer in layers:
        if isinstance(layer.dispatcher, AllToAllDispatcher) or not isinstance(layer.experts, GroupedExperts):
            raise ValueError(f"fssdp: layer {name!r} is already parallel or has non-standard experts")
    if overlap == "auto" and bandwidth is None:  # the group's all-to-all bandwidth, the same on every rank
        from moekit.parallel.adaptive import measure_link

        bandwidth = measure_link(group, timeout).all_to_all.bandwidth_Bps
    m = -(-E // W) if memory_cap is None else memory_cap
    if not isinstance(m, int) or m < 0:
        raise ValueError(f"fssdp: memory_cap must be a non-negative int, got {memory_cap!r}")
    ctl = FSSDPController(layers, group, memory_cap=m, overlap=overlap, bandwidth=bandwidth, window=window,
                          remat=remat, reshard_every=reshard_every, ranks_per_node=ranks_per_node, timeout=timeout,
                          grad_scale=1.0 / W if dense in ("ddp", "fsdp2") else 1.0)
    for l, (name, layer) in enumerate(layers):
        owned = [e for e in range(E) if ctl.owners[l][e] == rank]
        layer.experts = FSSDPExperts(layer.experts, owned, ctl, l)
        layer.dispatcher = SparseDispatcher(group, rank, name, timeout, E, ranks_per_node)
        layer.dispatcher.set_materialization(ctl.mats[l])
        layer.global_batch = GroupBatch(group, timeout, name)
        ctl._hooks.append(layer.register_forward_pre_hook(lambda mod, args, l=l: ctl.before_layer(l)))
        ctl._hooks.append(layer.register_forward_hook(lambda mod, args, out, l=l: ctl.after_layer(l, mod)))
    ctl._hooks.append(model.register_forward_pre_hook(ctl.begin_step))
    model._fssdp = ctl  # a plain attribute: not a submodule, not in the state dict
    if dense is not None:  # the dense parameters' own group (its collectives run apart from the experts')
        dgroup = dist.new_group(ranks=dist.get_process_group_ranks(group), timeout=timeout)
    if dense == "fsdp2":  # averages the dense gradients over the mesh, as DDP does
        from torch.distributed.device_mesh import DeviceMesh

        from moekit.parallel.recipes import shard_dense

        return shard_dense(model, DeviceMesh.from_group(dgroup, device_type=_device_type(model)))
    if dense == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
        with warnings.catch_warnings():  # the layers' load counters are rank-local: never synced
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DDP(model, process_group=dgroup, broadcast_buffers=False)
    return model
