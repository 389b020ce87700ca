"""Data parallelism for the dense part of an expert-parallel model (the FSDP2 recipe).

Legend: W ranks (one group: experts split over it, dense parameters sharded over it).

After :func:`~moekit.parallel.expert_parallel`, each rank holds different expert weights and the
same dense weights (embeddings, attention, norms, routers, shared experts). :func:`shard_dense`
puts the dense parameters under FSDP2 (``torch.distributed.fsdp.fully_shard``) over a 1-D
``DeviceMesh`` and leaves the expert parameters out of it (``ignored_params``): FSDP neither
shards them nor reduces their gradients, they stay plain ``nn.Parameter``s of this rank's slots.

A training step is then::

    loss = loss_fn(model(x_local)); loss.backward()   # FSDP: dense grads reduce-scattered, / W
    reduce_expert_grads(model, world_average=True)     # experts: replicas summed, / W
    opt.step()

FSDP2 averages the dense gradients over the mesh (``ReduceOp.AVG`` for fp32/bf16 gradients,
a sum then a division by W for fp64/fp16), so the expert gradients, which autograd through the
all-to-all gives as those of the sum of the ranks' losses, are divided by W too: the whole model
follows the mean of the ranks' losses, as on one device with the global batch.
"""
from __future__ import annotations

from typing import Iterable

import torch.distributed as dist
from torch import nn

from moekit.parallel.expert_parallel import _ep_layers, expert_param_names


def shard_dense(model: nn.Module, mesh=None, *, modules: Iterable[nn.Module] = (),
                **fully_shard_kwargs) -> nn.Module:
    """FSDP2 on the dense parameters of an expert-parallel ``model``; the experts stay this rank's.

    Args:
        model: converted by :func:`~moekit.parallel.expert_parallel` (call that first: sharding
            the full model first would split the experts' rows as well).
        mesh: a 1-D ``DeviceMesh`` over the ranks of the expert-parallel group (e.g.
            ``init_device_mesh("cpu", (W,))`` with gloo, ``("cuda", (W,))`` with NCCL), or None
            for FSDP's default mesh over the whole world.
        modules: submodules to shard as their own FSDP units first, in order (transformer blocks,
            or the MoE layers themselves: the router and the shared expert are then gathered
            only around that layer); nested ones are sharded innermost first, the root last.
        fully_shard_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``,
            ``mp_policy``, ``offload_policy``, ...); ``ignored_params`` are added to the experts.

    Returns ``model`` (now an ``FSDPModule``): dense parameters are ``DTensor`` shards, expert
    parameters plain tensors. Finish each backward with
    ``reduce_expert_grads(model, world_average=True)`` (it divides by W, FSDP's default; with
    ``set_gradient_divide_factor`` the expert gradients would need the same factor).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_dense: model must be an nn.Module, got {type(model).__name__}")
    layers = _ep_layers(model)
    if not layers:
        raise ValueError("shard_dense: the model has no expert-parallel MoELayer: call "
                         "moekit.parallel.expert_parallel(model, group) first (or fully_shard directly "
                         "for a model without expert parallelism)")
    modules = list(modules)
    for m in [model, *modules]:
        if isinstance(m, FSDPModule):
            raise ValueError(f"shard_dense: {type(m).__name__} is already sharded by fully_shard")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"shard_dense: mesh must be 1-D (the ranks of the expert-parallel group), got "
                         f"{mesh.ndim}-D with shape {tuple(mesh.shape)}")
    mesh_ranks = (sorted(mesh.mesh.flatten().tolist()) if mesh is not None
                  else list(range(dist.get_world_size())))
    for name, layer in layers:
        ep_ranks = sorted(dist.get_process_group_ranks(layer.dispatcher.group))
        if ep_ranks != mesh_ranks:
            raise ValueError(f"shard_dense: layer {name!r} is expert parallel over ranks {ep_ranks} but the "
                             f"mesh spans ranks {mesh_ranks}: this recipe needs the same ranks (the dense "
                             f"and the expert gradients are both averaged over them)")
    qualname = {m: n for n, m in model.named_modules() if n}
    for i, m in enumerate(modules):
        if m not in qualname:
            raise ValueError(f"shard_dense: modules[{i}] ({type(m).__name__}) is not a proper submodule of model")
    modules.sort(key=lambda m: -qualname[m].count("."))  # fully_shard goes bottom-up: inner units first
    ignored = {model.get_parameter(n) for n in expert_param_names(model)}
    ignored |= set(fully_shard_kwargs.pop("ignored_params", None) or ())
    for m in modules:
        fully_shard(m, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    return model
