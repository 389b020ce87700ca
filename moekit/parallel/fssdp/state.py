"""Optimizer state of an FSSDP model in the unconverted layout, independent of the owner map.

Legend: E experts per layer, O_d experts rank d owns in a layer.

The model's weights are covered by :func:`moekit.parallel.full_state_dict` /
:func:`~moekit.parallel.load_full_state_dict` (each layer's ``experts.w_in [E, H, D]`` /
``w_out [E, D, F]`` gathered from the owners). :func:`full_optim_state` does the same for the
optimizer: every state tensor shaped like an owned expert parameter (``[O_d, ...]``: Adam's
moments, SGD's momentum) becomes ``[E, ...]`` on every rank, by one SparseAllGather to everywhere
per tensor; other entries (``step``, the dense parameters' state, equal on every rank under DDP)
are copied. :func:`load_full_optim_state` takes each rank's owned rows back, whatever the owners
are now (after re-sharding, or in a model converted afresh at another world size), so a
checkpoint of ``(full_state_dict(model.module), full_optim_state(model, opt))`` resumes training
anywhere. Keyed by parameter name (the unconverted model's names).
"""
from __future__ import annotations

import torch
from torch import nn

from moekit.parallel.fssdp.sparse import Materialization, launch_all_gather


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _expert_params(model: nn.Module) -> dict[str, tuple]:
    """name -> (param, FSSDPExperts module) for every owned-expert parameter."""
    from moekit.parallel.fssdp.wrap import FSSDPExperts

    out = {}
    for mname, mod in _inner(model).named_modules():
        if isinstance(mod, FSSDPExperts):
            for pname in ("w_in", "w_out"):
                out[f"{mname}.{pname}"] = (getattr(mod, pname), mod)
    return out


@torch.no_grad()
def full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """``{param name: {state key: value}}`` with expert state tensors ``[E, ...]`` (every rank
    the same). A collective over the FSSDP group: call it on every rank."""
    experts = _expert_params(model)
    out: dict[str, dict] = {}
    for name, p in _inner(model).named_parameters():
        state = optimizer.state.get(p, {})
        entry = {}
        if name in experts:
            mod = experts[name][1]
            c = mod._ctl
            everywhere = Materialization.everywhere(c.owners[mod.index], c.world_size)
            keys = sorted(state)
            # every rank must join the same gathers: which keys exist is the same everywhere
            # (all ranks step the same parameters), zero-row shards included
            for k in keys:
                v = state[k]
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape == p.shape:
                    X = int(torch.Size(p.shape[1:]).numel())
                    entry[k] = launch_all_gather(v.reshape(v.shape[0], X), everywhere, c.wgroup, timeout=c.timeout,
                                                 what=f"optimizer state {name}.{k}").wait().reshape(
                                                     -1, *p.shape[1:]).clone()
                else:
                    entry[k] = v.clone() if isinstance(v, torch.Tensor) else v
        else:
            entry = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
        if entry:
            out[name] = entry
    return out


@torch.no_grad()
def load_full_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Set ``optimizer``'s state from :func:`full_optim_state` output: each rank keeps its
    owned experts' rows of the ``[E, ...]`` tensors. Parameters absent from ``state`` keep none."""
    experts = _expert_params(model)
    for name, p in _inner(model).named_parameters():
        if name not in state:
            continue
        entry = {}
        for k, v in state[name].items():
            if name in experts and isinstance(v, torch.Tensor) and v.dim() > 0:
                mod = experts[name][1]
                E = mod._ctl.num_experts
                if v.shape[0] != E or v.shape[1:] != p.shape[1:]:
                    raise ValueError(f"optimizer state {name}.{k} has shape {tuple(v.shape)}, expected "
                                     f"[{E}, {', '.join(map(str, p.shape[1:]))}]")
                idx = torch.tensor(mod.owned_ids, dtype=torch.long, device=v.device)
                entry[k] = v.index_select(0, idx).to(p.device).clone()
            else:
                entry[k] = v.clone() if isinstance(v, torch.Tensor) else v
        optimizer.state[p] = entry
