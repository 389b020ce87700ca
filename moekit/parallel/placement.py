"""Where each layer's experts live: contiguous, or a placement written by ``moekit plan``.

Legend: E logical experts, W ranks, S slots per rank, P = W*S physical slots. Physical slot
``p`` lives on rank ``p // S`` and holds logical expert ``phy2log[p]``; an expert in several
slots is replicated, and its tokens are split evenly between the replicas (the planner's
model, EPLB's and SGLang's).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from moekit.planner.placement import Placement, PlacementError

PlacementLike = Union[str, Path, dict, Placement, None]


@dataclass(frozen=True)
class LayerPlacement:
    """One layer's map. ``phy2log`` int64 [P]; ``world_size`` W; ``slots_per_rank`` S."""

    phy2log: tuple[int, ...]
    world_size: int
    slots_per_rank: int
    num_experts: int

    def slots_of(self, rank: int) -> list[int]:
        """Logical expert of each of ``rank``'s S slots, in slot order."""
        S = self.slots_per_rank
        return list(self.phy2log[rank * S:(rank + 1) * S])

    def replicas(self) -> list[list[int]]:
        """Physical slots of each logical expert, in slot order (every list non-empty)."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.phy2log):
            out[e].append(p)
        return out

    @property
    def replicated(self) -> bool:
        return len(self.phy2log) > self.num_experts

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(count_E int64 [E], slot_ER int64 [E, Rmax]) for mapping ids to physical slots."""
        reps = self.replicas()
        R = max(len(r) for r in reps)
        slot_ER = torch.tensor([r + [r[0]] * (R - len(r)) for r in reps], dtype=torch.long, device=device)
        return torch.tensor([len(r) for r in reps], dtype=torch.long, device=device), slot_ER


def contiguous(num_experts: int, world_size: int, num_layers: int) -> list[LayerPlacement]:
    """Experts ``[r*E/W, (r+1)*E/W)`` on rank r; needs W to divide E."""
    if num_experts % world_size:
        raise ValueError(
            f"{num_experts} experts do not divide evenly over {world_size} ranks: pass placement= a plan "
            f"with replicas (`moekit plan --trace TRACE --gpus {world_size} --slots-per-gpu "
            f"{-(-num_experts // world_size)} --out placement.json`)")
    S = num_experts // world_size
    return [LayerPlacement(tuple(range(num_experts)), world_size, S, num_experts)] * num_layers


def resolve(placement: PlacementLike, num_experts: int, world_size: int, num_layers: int) -> list[LayerPlacement]:
    """Per-layer placements from None (contiguous), a path, a dict or a planner Placement;
    refuses a placement made for another model shape or world size, with the reason."""
    if placement is None:
        return contiguous(num_experts, world_size, num_layers)
    if isinstance(placement, (str, Path)):
        try:
            placement = json.loads(Path(placement).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read placement file {str(placement)!r}: {exc}") from exc
    if isinstance(placement, dict):
        try:
            placement = Placement.from_json_dict(placement)
        except PlacementError as exc:
            raise ValueError(f"invalid placement: {exc}") from exc
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a path, a dict or a moekit.planner Placement, got "
                        f"{type(placement).__name__}")
    if placement.num_gpus != world_size:
        raise ValueError(f"the placement is for num_gpus={placement.num_gpus} but the process group has "
                         f"{world_size} ranks; plan again with --gpus {world_size}")
    if placement.num_experts != num_experts:
        raise ValueError(f"the placement is for {placement.num_experts} experts but the model's MoE layers "
                         f"have {num_experts}: it was planned for another model")
    if placement.num_layers != num_layers:
        raise ValueError(f"the placement has {placement.num_layers} layers but the model has {num_layers} "
                         f"MoE layers: it was planned for another model")
    phy2log = np.asarray(placement.phy2log)
    for l in range(num_layers):
        missing = sorted(set(range(num_experts)) - set(phy2log[l].tolist()))
        if missing:
            raise ValueError(f"placement layer {l} has no slot for experts {missing[:8]}")
    return [LayerPlacement(tuple(int(e) for e in phy2log[l]), world_size, placement.slots_per_gpu, num_experts)
            for l in range(num_layers)]
