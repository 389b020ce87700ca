"""MoELayer: router + capacity + routed experts (+ shared experts), single-device semantics.

This layer is the reference every parallel, fused and offloaded path is tested against.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, B batch, S sequence.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Protocol

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.dispatch import LocalDispatcher
from moekit.experts import DenseMLP, GroupedExperts
from moekit.router import Routing, TopKRouter, apply_capacity, count_per_expert, expert_capacity

RoutingObserver = Callable[["MoELayer", Routing], None]
RoutingTransform = Callable[[Routing], Routing]


class GlobalBatch(Protocol):
    """What a layer whose tokens are split over ranks (expert parallel) asks of the other ranks,
    so capacity and losses are those of the single-device layer on the global batch."""

    def totals(self, tokens_per_expert_E: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_per_expert_E summed over ranks, the global T as an int64 0-d tensor)."""

    def apply_capacity(self, routing: Routing, capacity: Optional[int], drop_policy: str,
                       global_tokens_per_expert_E: torch.Tensor) -> Routing:
        """:func:`~moekit.router.apply_capacity` decided on the global batch; this rank's part."""


class _AttachLoss(torch.autograd.Function):
    """Identity on ``y`` whose backward also sends ``d(loss) = scale`` into ``loss`` (Megatron's
    aux-loss autoscaler): the loss trains the router without changing ``forward``'s return
    type. ``scale`` is read from the layer when backward runs, so it can be set after the
    forward (see :func:`set_aux_loss_scale`). Gradients flow only where ``y`` reaches the
    final loss."""

    @staticmethod
    def forward(ctx, y, loss, layer: "MoELayer"):
        ctx.layer, ctx.loss_dtype = layer, loss.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        scale = ctx.layer.aux_loss_scale
        grad_loss = torch.ones((), dtype=ctx.loss_dtype, device=grad_y.device)
        if isinstance(scale, torch.Tensor):
            grad_loss = grad_loss * scale.to(device=grad_y.device, dtype=ctx.loss_dtype)
        elif scale != 1.0:
            grad_loss = grad_loss * scale
        return grad_y, grad_loss, None


class MoELayer(nn.Module):
    """A drop-in Mixture-of-Experts block.

    ``forward(hidden [..., D]) -> [..., D]``. After each forward:

    - ``tokens_per_expert``: int64 [E] assignments kept per expert (after capacity);
    - ``aux_loss``, ``z_loss``, ``seq_aux_loss``: the weighted loss terms of the last
      training forward (detached, for logging; already in the graph through the output);
    - ``expert_load``: int64 [E] selections accumulated since the last :meth:`update_bias`.

    Submodules and parameters (HF-compatible orientation, see :mod:`moekit.hf`):
    ``router.weight [E, D]``, ``experts.w_in [E, H, D]`` (H = 2F for GLU, gate rows
    first), ``experts.w_out [E, D, F]``, ``shared_expert.w_in [H_s, D]``,
    ``shared_expert.w_out [D, S]``, ``shared_expert_gate.weight [1, D]``.
    """

    def __init__(self, config: MoEConfig, *, experts: Optional[nn.Module] = None,
                 dispatcher: Optional[LocalDispatcher] = None):
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, got {type(config).__name__}")
        self.config = config
        self.router = TopKRouter(config)
        self.experts = experts if experts is not None else GroupedExperts(config)
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.routing_transform: Optional[RoutingTransform] = None
        self.aux_loss_scale: float | torch.Tensor = 1.0
        # Statistics over the tokens of several ranks (expert parallel): None = this call's tokens
        self.global_batch: Optional[GlobalBatch] = None
        if config.num_shared_experts:
            self.shared_expert = DenseMLP(config.hidden_size, config.shared_hidden, config.activation,
                                          config.init_std)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        else:
            self.shared_expert = None
            self.shared_expert_gate = None
        E = config.num_experts
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.long), persistent=False)
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.long), persistent=False)
        self.aux_loss: Optional[torch.Tensor] = None
        self.seq_aux_loss: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        self._observers: list[RoutingObserver] = []

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> [..., D]."""
        cfg = self.config
        self._check_input(hidden)
        shape = hidden.shape
        x_TD = hidden.reshape(-1, cfg.hidden_size)
        if self.training and cfg.router_jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter)
            x_TD = x_TD * noise
        routing = self.router(x_TD)
        with torch.no_grad():
            self.expert_load += routing.tokens_per_expert_E
        totals = self._batch_totals(routing)
        losses = self._compute_losses(routing, shape, totals)
        if cfg.capacity_factor is not None:
            counts_E, T_all = totals if totals is not None else (routing.tokens_per_expert_E, routing.num_tokens)
            capacity = expert_capacity(cfg, int(T_all), counts_E)
            if self.global_batch is None:
                routing = apply_capacity(routing, capacity, cfg.drop_policy)
            else:
                routing = self.global_batch.apply_capacity(routing, capacity, cfg.drop_policy, counts_E)
        self.tokens_per_expert.copy_(routing.tokens_per_expert_E)
        for observe in self._observers:
            observe(self, routing)
        if self.routing_transform is not None:  # logical -> physical expert ids (placement, cache)
            routing = self.routing_transform(routing)
        if hasattr(self.dispatcher, "run"):  # dispatch, experts and combine pipelined as one block
            y_TD = self.dispatcher.run(x_TD, routing, self.experts)
        else:
            x_ND, tokens_per_expert_E, ctx = self.dispatcher.dispatch(x_TD, routing)
            y_ND = self.experts(x_ND, tokens_per_expert_E)
            y_TD = self.dispatcher.combine(y_ND, ctx)
        if self.shared_expert is not None:
            shared_TD = self.shared_expert(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        if losses:
            y_TD = _AttachLoss.apply(y_TD, sum(losses.values()), self)
        return y_TD.view(shape)

    def _batch_totals(self, routing: Routing):
        """(tokens_per_expert_E, T) over the global batch when ``global_batch`` is set and the
        capacity or a loss needs them (a collective: the condition is the same on every rank);
        else None. T is an int64 0-d tensor."""
        cfg = self.config
        if self.global_batch is None:
            return None
        wants_losses = self.training and torch.is_grad_enabled() and (
            cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0 or cfg.z_loss_coef > 0)
        if cfg.capacity_factor is None and not wants_losses:
            return None
        return self.global_batch.totals(routing.tokens_per_expert_E, routing.num_tokens)

    def _check_input(self, hidden: torch.Tensor) -> None:
        if not isinstance(hidden, torch.Tensor):
            raise TypeError(f"MoELayer input must be a torch.Tensor, got {type(hidden).__name__}")
        if not hidden.is_floating_point():
            raise TypeError(f"MoELayer input must be floating point, got dtype {hidden.dtype}")
        if hidden.dim() < 1 or hidden.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"MoELayer input must have shape [..., D={self.config.hidden_size}], got {tuple(hidden.shape)}")
        w_dtype = self.router.weight.dtype
        if hidden.dtype != w_dtype and not torch.is_autocast_enabled(hidden.device.type):
            raise TypeError(f"MoELayer input dtype {hidden.dtype} differs from the parameters' {w_dtype}; "
                            f"cast one of them (layer.to(dtype) or input.to(dtype))")

    # ---- losses -------------------------------------------------------------------------------
    def _compute_losses(self, routing: Routing, shape: torch.Size, totals=None) -> dict[str, torch.Tensor]:
        """Weighted loss terms (in the graph) of a training forward; also stored detached
        on the layer as ``aux_loss``, ``seq_aux_loss``, ``z_loss`` for logging.

        With ``totals = (tokens_per_expert_E, T)`` of a global batch (expert parallel), each
        term is this rank's share: counts are global and sums over tokens are divided by the
        global T, so the shares of all ranks add up to the single-device value on the global
        batch, and so do their gradients."""
        cfg = self.config
        self.aux_loss = self.seq_aux_loss = self.z_loss = None
        losses: dict[str, torch.Tensor] = {}
        if not (self.training and torch.is_grad_enabled()):
            return losses
        if totals is None:
            if routing.num_tokens == 0:
                return losses
            counts_E, T_all = routing.tokens_per_expert_E, None
        else:  # no host sync on T: a global batch of 0 tokens gives 0 / 1 everywhere
            counts_E, T_all = totals[0], totals[1].clamp(min=1)
        if cfg.aux_loss_coef > 0:
            losses["aux_loss"] = cfg.aux_loss_coef * switch_aux_loss(
                routing.scores_TE, routing.topk_ids_TK, cfg.top_k, cfg.aux_loss_norm, cfg.router == "sigmoid",
                counts_E=counts_E, num_tokens=T_all)
        if cfg.seq_aux_loss_coef > 0:
            if len(shape) < 3:
                raise ValueError(f"seq_aux_loss_coef needs input shaped [B, S, D], got {tuple(shape)}")
            S = shape[-2]
            B = routing.num_tokens // S
            scores_BSE = routing.scores_TE.view(B, S, cfg.num_experts)
            ids_BSK = routing.topk_ids_TK.view(B, S, cfg.top_k)
            per_seq = [switch_aux_loss(scores_BSE[b], ids_BSK[b], cfg.top_k, cfg.aux_loss_norm,
                                       cfg.router == "sigmoid") for b in range(B)]
            if totals is None:
                seq_loss = torch.stack(per_seq).mean()
            else:  # this rank's sequences' share of the mean over every rank's sequences
                num_seqs = (T_all // S).clamp(min=1)
                seq_loss = (torch.stack(per_seq).sum() if per_seq else routing.scores_TE.sum() * 0.0) / num_seqs
            losses["seq_aux_loss"] = cfg.seq_aux_loss_coef * seq_loss
        if cfg.z_loss_coef > 0:
            z_T = torch.logsumexp(routing.logits_TE, dim=-1).square()
            losses["z_loss"] = cfg.z_loss_coef * (z_T.mean() if totals is None else z_T.sum() / T_all)
        for name, value in losses.items():
            setattr(self, name, value.detach())
        return losses

    # ---- aux-loss-free balancing -------------------------------------------------------------
    @torch.no_grad()
    def update_bias(self, group: Optional["torch.distributed.ProcessGroup"] = None) -> torch.Tensor:
        """DeepSeek's aux-loss-free update ``b += rate * sign(mean(load) - load)`` from the
        selections accumulated since the last call (all-reduced over ``group`` when given),
        then resets the accumulator. Returns the load used, int64 [E]."""
        cfg = self.config
        if self.router.e_score_correction_bias is None:
            raise RuntimeError("update_bias needs MoEConfig(score_correction_bias=True)")
        load_E = self.expert_load.clone()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(load_E, group=group)
        load_f = load_E.float()
        self.router.e_score_correction_bias += cfg.bias_update_rate * torch.sign(load_f.mean() - load_f)
        self.expert_load.zero_()
        return load_E

    # ---- observers (trace recording, expert-parallel hooks) -----------------------------------
    def add_routing_observer(self, fn: RoutingObserver) -> Callable[[], None]:
        """Call ``fn(layer, routing)`` after routing (capacity applied) in every forward.
        Returns a function that removes it."""
        self._observers.append(fn)
        return lambda: self._observers.remove(fn)

    def extra_repr(self) -> str:
        c = self.config
        return (f"D={c.hidden_size}, F={c.ffn_hidden_size}, E={c.num_experts}, K={c.top_k}, "
                f"router={c.router}, activation={c.activation}, shared={c.shared_hidden}, backend={c.backend}")


def switch_aux_loss(scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, top_k: int, norm: str,
                    normalize_scores: bool = False, counts_E: Optional[torch.Tensor] = None,
                    num_tokens: Optional[int | torch.Tensor] = None) -> torch.Tensor:
    """Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` (unweighted).

    f_e: top-k selections of expert e per token, divided by T (``norm="hf"``, sums to K,
    equals HF's ``load_balancing_loss_func`` for one layer) or by T*K (``"megatron"``,
    sums to 1). P_e: mean router probability (sigmoid scores normalised per token first).
    Ids of -1 are ignored. ``counts_E`` (int [E], selections per expert) is counted from the
    ids when not given (the layer passes the router's own count). With ``num_tokens`` (the
    global batch's T, and ``counts_E`` its counts), the result is this shard's share: P_e sums
    this shard's scores divided by the global T, so shares add up to the global loss.
    """
    T, E = scores_TE.shape
    share = num_tokens is not None
    if not share:
        num_tokens = T
    if T == 0:
        return scores_TE.sum() * 0.0
    if normalize_scores:
        scores_TE = scores_TE / (scores_TE.sum(-1, keepdim=True) + 1e-20)
    if counts_E is None:
        counts_E = count_per_expert(topk_ids_TK, E)
    counts_E = counts_E.to(scores_TE.dtype)
    f_E = counts_E / (num_tokens if norm == "hf" else num_tokens * top_k)
    P_E = scores_TE.sum(0) / num_tokens if share else scores_TE.mean(0)
    return E * (f_E * P_E).sum()


def moe_layers(model: nn.Module) -> Iterable[tuple[str, MoELayer]]:
    """(qualified name, layer) for every MoELayer inside ``model``, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, MoELayer))


def set_aux_loss_scale(model: nn.Module, scale: float | torch.Tensor) -> None:
    """Scale the gradient that every MoELayer of ``model`` injects for its aux/z losses.

    The losses ride in the graph through the layer output (Megatron's autoscaler), so their
    gradient cannot see how the user scaled the main loss. Set ``scale`` to the factor the
    backpropagated loss carries, and the result is as if the aux losses had been added to
    the loss before that scaling:

    - gradient accumulation over N micro-batches with ``(loss / N).backward()``: ``1 / N``;
    - AMP: ``scaler.scale(loss).backward()``: ``scaler.get_scale()`` (or the scaler's scale
      tensor, which avoids a host sync); with accumulation ``scaler.get_scale() / N``;
    - ``(c * loss).backward()``: ``c``.

    The scale is read when backward runs (default 1.0). It is a plain attribute of each
    layer (``layer.aux_loss_scale``), not saved in the state dict.
    """
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a one-element float tensor, got {tuple(scale.shape)} "
                             f"{scale.dtype}")
        scale = scale.detach().reshape(())
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite non-negative number, got {scale!r}")
    layers = [m for _, m in moe_layers(model)]
    if not layers:
        raise ValueError("set_aux_loss_scale: the model has no MoELayer")
    for layer in layers:
        layer.aux_loss_scale = scale


def register_bias_update_hook(optimizer: torch.optim.Optimizer, model: nn.Module,
                              group: Optional["torch.distributed.ProcessGroup"] = None):
    """After every ``optimizer.step()``, apply :meth:`MoELayer.update_bias` to each layer of
    ``model`` that has a correction bias and ``bias_update_rate > 0``. Returns the hook handle."""
    layers = [m for _, m in moe_layers(model)
              if m.router.e_score_correction_bias is not None and m.config.bias_update_rate > 0]
    if not layers:
        raise ValueError("no MoELayer in the model has score_correction_bias and bias_update_rate > 0")

    def hook(opt, args, kwargs):
        for layer in layers:
            layer.update_bias(group)

    return optimizer.register_step_post_hook(hook)
