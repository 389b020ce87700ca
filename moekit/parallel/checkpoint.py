"""Checkpoints with ``torch.distributed.checkpoint`` (DCP) in the unconverted model's layout:
saved at one world size and placement, loaded at any other, or into the single-device model.

Legend: E logical experts, W ranks, S slots per rank, H = 2F (GLU) or F, D model dim, F expert
hidden dim.

A checkpoint directory holds the keys ``torch.distributed.checkpoint.state_dict.get_state_dict``
gives, as DCP flattens them: ``model.<fqn>`` for every entry of the unconverted model's state
dict (expert weights ``[E, H, D]`` / ``[E, D, F]``), ``optim.state.<fqn>.<name>`` for optimizer
state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``) and ``optim.param_groups.<i>.<hyper>``
(``params`` as fqns). So ``dcp.load({"model": model.state_dict()}, checkpoint_id=path)`` reads
it into a plain model too.

Expert rows travel as DCP chunks, nothing is gathered: a rank writes the rows of the experts
whose first replica (lowest physical slot) it holds, and reads the rows of every expert in its
slots, so each replica gets them. An optimizer state tensor shaped like its expert weight
(``[S, ...]``) follows the same rows; other entries (dense weights, ``step``) are written once
by DCP's deduplication and read whole by every rank.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from moekit.layer import moe_layers
from moekit.parallel.expert_parallel import AllToAllDispatcher

PathLike = Union[str, os.PathLike]


def _ep_group(model: nn.Module):
    """The process group of the model's expert-parallel layers, or None when it has none."""
    for name, layer in moe_layers(model):
        if hasattr(layer.experts, "full_weights"):  # adaptive (column shards) or FSSDP (owner map)
            raise NotImplementedError(
                f"layer {name!r} holds {type(layer.experts).__name__} experts: DCP checkpoints cover expert "
                f"parallel layouts only; save moekit.parallel.full_state_dict(model) instead (and, under "
                f"FSSDP, moekit.parallel.fssdp.full_optim_state for the optimizer)")
    groups = {id(layer.dispatcher.group): layer.dispatcher.group for _, layer in moe_layers(model)
              if isinstance(layer.dispatcher, AllToAllDispatcher)}
    if len(groups) > 1:
        raise ValueError("the model's expert-parallel layers use different process groups; "
                         "a checkpoint call is collective over one")
    return next(iter(groups.values()), None)


def _row_maps(model: nn.Module) -> dict[str, tuple[int, list[int], list[int]]]:
    """state-dict key -> (E, logical_ids_S, first_replica_slots) for each expert-parallel tensor:
    ``logical_ids_S[s]`` is slot s's expert; ``first_replica_slots`` the local slots whose expert
    has its first replica here."""
    maps = {}
    for name, layer in moe_layers(model):
        d = layer.dispatcher
        if not isinstance(d, AllToAllDispatcher):
            continue
        pl, ids = d.placement, list(layer.experts.logical_ids)
        base, reps = d.rank * pl.slots_per_rank, pl.replicas()
        firsts = [s for s in range(len(ids)) if reps[ids[s]][0] == base + s]
        for pname, t in layer.experts.state_dict().items():
            if t.dim() and t.shape[0] == len(ids):
                maps[f"{name}.experts.{pname}"] = (pl.num_experts, ids, firsts)
    return maps


def _runs(experts: list[int]) -> list[list[int]]:
    """Sorted distinct experts split into runs of consecutive ids (one DCP chunk each)."""
    runs: list[list[int]] = []
    for e in sorted(set(experts)):
        if runs and runs[-1][-1] == e - 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _save_blocks(t_S: torch.Tensor, row_map) -> tuple[torch.Size, list]:
    """(full size [E, ...], [(e0, rows of this rank's first replicas)]) of a local [S, ...] tensor."""
    E, ids, firsts = row_map
    slot_of = {ids[s]: s for s in firsts}
    blocks = [(run[0], t_S.detach().index_select(0, torch.tensor([slot_of[e] for e in run], device=t_S.device)))
              for run in _runs(list(slot_of))]
    return torch.Size([E, *t_S.shape[1:]]), blocks


def _load_blocks(E: int, ids: list[int], rest: torch.Size, dtype, device) -> tuple[torch.Size, list]:
    """Empty blocks for the rows of every expert in ``ids``."""
    return torch.Size([E, *rest]), [(run[0], torch.empty(len(run), *rest, dtype=dtype, device=device))
                                    for run in _runs(ids)]


def _rows_into(blocks, ids: list[int], out_S: torch.Tensor) -> None:
    """Copy the loaded expert rows into each slot of ``out_S`` [S, ...]."""
    row = {run0 + i: b[i] for run0, b in blocks for i in range(b.shape[0])}
    with torch.no_grad():
        for s, e in enumerate(ids):
            out_S[s].copy_(row[e])


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Fully qualified names of each param group's parameters."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        missing = [tuple(p.shape) for p in g["params"] if id(p) not in name_of]
        if missing:
            raise ValueError(f"optimizer param group {i} holds parameters that are not the model's "
                             f"(shapes {missing[:4]})")
        groups.append([name_of[id(p)] for p in g["params"]])
    return groups


def _run(fn, flat: dict, path: PathLike, planner, group, error: type, what: str) -> None:
    """``dcp.save`` / ``dcp.load`` over ``group`` (None: this process alone, DCP's ``no_dist``),
    its per-rank failures (a ``BaseException`` in DCP) re-raised as ``error`` naming the path."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():  # DCP warns that no_dist assumes one process: that is the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            fn(flat, checkpoint_id=os.fspath(path), planner=planner, process_group=group, no_dist=group is None)
    except CheckpointException as exc:
        rank, (cause, _) = next(iter(exc.failures.items()))
        raise error(f"checkpoint {os.fspath(path)!r} {what}: ranks {sorted(exc.failures)} failed; rank {rank}: "
                    f"{type(cause).__name__}: {cause}") from cause


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Save ``model`` (and ``optimizer``'s state) to the DCP directory ``path``.

    Collective over the expert-parallel group when ``model`` has been converted by
    :func:`~moekit.parallel.expert_parallel`: call it on every rank, with ``path`` on storage
    all ranks share. A model without expert-parallel layers is saved by this process alone
    (no process group needed; under DDP call it on one rank, as ``torch.save``).

    Each expert tensor ``[S, ...]`` (and optimizer state shaped like it) is written as rows of
    its ``[E, ...]`` entry by the ranks holding each expert's first replica: never gathered.
    Other entries are expected equal on every rank (as DDP keeps them) and DCP writes one copy.
    With several expert-parallel groups side by side (data parallel across them), call it from
    one group only: the groups would write the same files.
    """
    from torch.distributed.checkpoint import save

    from moekit.parallel._row_planners import RowBlockSavePlanner

    group = _ep_group(model)
    row_maps = _row_maps(model)
    flat: dict[str, object] = {}
    blocks = {}
    for k, t in model.state_dict().items():
        if k in row_maps:
            blocks[f"model.{k}"] = _save_blocks(t, row_maps[k])
        else:
            flat[f"model.{k}"] = t
    if optimizer is not None:
        names = _param_names(model, optimizer)
        params = dict(model.named_parameters())
        osd = optimizer.state_dict()
        flat_names = [n for g in names for n in g]
        for idx, state in osd["state"].items():
            n = flat_names[idx]
            for sk, v in state.items():
                key = f"optim.state.{n}.{sk}"
                if n in row_maps and isinstance(v, torch.Tensor) and v.shape == params[n].shape:
                    blocks[key] = _save_blocks(v, row_maps[n])
                else:
                    flat[key] = v
        for i, g in enumerate(osd["param_groups"]):
            for hk, v in g.items():
                flat[f"optim.param_groups.{i}.{hk}"] = names[i] if hk == "params" else v
    _run(save, flat, path, RowBlockSavePlanner(blocks), group, RuntimeError, "could not be written")


def read_checkpoint_metadata(path: PathLike):
    """The DCP ``Metadata`` of the checkpoint at ``path``; ``FileNotFoundError`` when there is
    none, ``ValueError`` when it cannot be read."""
    from torch.distributed.checkpoint import FileSystemReader

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {str(p)!r}")
    if not (p / ".metadata").is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a torch.distributed.checkpoint directory: no .metadata "
                                f"file (an interrupted save, or another format)")
    try:
        return FileSystemReader(os.fspath(p)).read_metadata()
    except Exception as exc:  # a truncated or foreign file fails inside pickle with any error
        raise ValueError(f"cannot read checkpoint metadata {str(p / '.metadata')!r}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _check_entry(path: PathLike, key: str, md_entries: dict, size: torch.Size) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if key not in md_entries:
        raise ValueError(f"checkpoint {str(path)!r} has no entry {key!r}")
    md = md_entries[key]
    if not isinstance(md, TensorStorageMetadata):
        raise ValueError(f"checkpoint {str(path)!r}: {key} is not a tensor there")
    if tuple(md.size) != tuple(size):
        raise ValueError(f"checkpoint {str(path)!r}: {key} has shape {tuple(md.size)} there but "
                         f"{tuple(size)} in the model (a checkpoint of another model shape?)")


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                    *, strict: bool = True) -> None:
    """Load the DCP checkpoint at ``path`` into ``model`` (and ``optimizer``), in place.

    ``model`` may be expert parallel at any world size and placement (collective over its group:
    call it on every rank) or the plain single-device model (this process alone, no process
    group needed). Each rank reads the rows of its slots' experts; every replica gets them, and
    their optimizer state. ``optimizer`` may be fresh (no state yet); its param groups must hold
    the same parameters as at save, and take the saved hyperparameters (lr, betas, ...).

    Raises ``FileNotFoundError`` for a missing checkpoint, ``ValueError`` for an unreadable one,
    an entry of another shape (naming the key and both shapes), or with ``strict`` a model entry
    missing on either side.
    """
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from moekit.parallel._row_planners import RowBlockLoadPlanner

    md = read_checkpoint_metadata(path).state_dict_metadata
    group = _ep_group(model)
    row_maps = _row_maps(model)
    flat: dict[str, object] = {}
    blocks = {}
    sd = model.state_dict()
    for k, t in sd.items():
        key = f"model.{k}"
        if k in row_maps:
            E, ids, _ = row_maps[k]
            size = torch.Size([E, *t.shape[1:]])
        else:
            size = t.shape
        if key not in md and not strict:
            continue
        _check_entry(path, key, md, size)
        if k in row_maps:
            blocks[key] = _load_blocks(E, ids, t.shape[1:], t.dtype, t.device)
        else:
            flat[key] = t
    if strict:
        extra = sorted(k[len("model."):] for k in md if k.startswith("model.") and k[len("model."):] not in sd)
        if extra:
            raise ValueError(f"checkpoint {str(path)!r} has model entries the model lacks: {extra[:8]}")
    opt_entries: dict[str, tuple[str, str]] = {}  # checkpoint key -> (param name, state name)
    if optimizer is not None:
        names = _param_names(model, optimizer)
        n_groups = len({k.split(".")[2] for k in md if k.startswith("optim.param_groups.")})
        if n_groups != len(names):
            raise ValueError(f"checkpoint {str(path)!r} has {n_groups} optimizer param groups, the optimizer "
                             f"{len(names)}" + (" (saved without an optimizer?)" if n_groups == 0 else ""))
        params = dict(model.named_parameters())
        for n in (n for g in names for n in g):
            prefix = f"optim.state.{n}."
            for key in (k for k in md if k.startswith(prefix)):
                opt_entries[key] = (n, key[len(prefix):])
                entry = md[key]
                if not isinstance(entry, TensorStorageMetadata):
                    flat[key] = None  # a pickled value: DCP replaces the placeholder
                elif n in row_maps and tuple(entry.size) == (row_maps[n][0], *params[n].shape[1:]):
                    blocks[key] = _load_blocks(row_maps[n][0], row_maps[n][1], params[n].shape[1:],
                                               entry.properties.dtype, "cpu")
                else:  # on the CPU: Optimizer.load_state_dict moves each entry where it belongs
                    flat[key] = torch.empty(entry.size, dtype=entry.properties.dtype)
        for k in md:
            if k.startswith("optim.param_groups."):
                flat[k] = None
    _run(load, flat, path, RowBlockLoadPlanner(blocks), group, ValueError, "could not be read")
    for k in row_maps:
        if f"model.{k}" in blocks:
            _rows_into(blocks[f"model.{k}"][1], row_maps[k][1], sd[k])
    if optimizer is not None:
        _load_optimizer(path, optimizer, names, flat, blocks, opt_entries, row_maps, params)


def _load_optimizer(path: PathLike, optimizer: torch.optim.Optimizer, names: list[list[str]], flat: dict,
                    blocks: dict, opt_entries: dict[str, tuple[str, str]], row_maps: dict,
                    params: dict[str, nn.Parameter]) -> None:
    """Hand the loaded entries to ``optimizer.load_state_dict`` in its own parameter order."""
    groups: list[dict] = [{} for _ in names]
    for k, v in flat.items():
        if k.startswith("optim.param_groups."):
            _, _, i, hk = k.split(".", 3)
            groups[int(i)][hk] = v
    index, state = {}, {}
    for i, g in enumerate(groups):
        if list(g.get("params", [])) != names[i]:
            raise ValueError(f"checkpoint {str(path)!r}: optimizer param group {i} holds {g.get('params')} there "
                             f"but {names[i]} here")
        g["params"] = list(range(len(index), len(index) + len(names[i])))
        index.update({n: j for n, j in zip(names[i], g["params"])})
    for key, (n, sk) in opt_entries.items():
        if key in blocks:
            out = torch.empty(params[n].shape, dtype=blocks[key][1][0][1].dtype)
            _rows_into(blocks[key][1], row_maps[n][1], out)
        else:
            out = flat[key]
        state.setdefault(index[n], {})[sk] = out
    optimizer.load_state_dict({"state": state, "param_groups": groups})
