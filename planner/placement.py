"""Placement: which logical expert sits in which physical slot, per MoE layer.

Legend: L layers, E logical experts, G GPUs, S slots per GPU, P = G*S physical slots.
Physical slot ``p`` lives on GPU ``p // S``. Tokens routed to a logical expert are split
equally among its replicas (EPLB / SGLang semantics), so replica ``r`` of expert ``e``
serves ``load[e] / logcnt[e]``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Placement", "load_placement", "PlacementError"]


class PlacementError(ValueError):
    """An invalid placement (expert missing, wrong slot count, id out of range)."""


@dataclass
class Placement:
    """``phy2log[l, p]`` = logical expert in physical slot ``p`` of layer ``l`` (int64 [L, G*S])."""

    phy2log: np.ndarray
    num_gpus: int
    slots_per_gpu: int
    num_experts: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.phy2log = np.asarray(self.phy2log, dtype=np.int64)
        if self.phy2log.ndim == 1:
            self.phy2log = self.phy2log[None]
        self.num_gpus, self.slots_per_gpu, self.num_experts = int(self.num_gpus), int(self.slots_per_gpu), int(self.num_experts)

    # --- shapes -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.phy2log.shape[0])

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def gpu_of_slot(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.slots_per_gpu

    # --- derived maps (EPLB's names) ---------------------------------------------------
    @property
    def logcnt(self) -> np.ndarray:
        """[L, E] replica count of each logical expert."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for l in range(self.num_layers):
            out[l] = np.bincount(self.phy2log[l], minlength=self.num_experts)[: self.num_experts]
        return out

    @property
    def log2phy(self) -> np.ndarray:
        """[L, E, max replicas] physical slots of each logical expert, -1 padded."""
        cnt = self.logcnt
        m = max(1, int(cnt.max()))
        out = np.full((self.num_layers, self.num_experts, m), -1, dtype=np.int64)
        for l in range(self.num_layers):
            fill = np.zeros(self.num_experts, dtype=np.int64)
            for p, e in enumerate(self.phy2log[l]):
                out[l, e, fill[e]] = p
                fill[e] += 1
        return out

    def share_matrix(self, l: int) -> np.ndarray:
        """[E, G] fraction of expert e's tokens served on GPU g in layer l (rows sum to 1)."""
        E, G = self.num_experts, self.num_gpus
        cnt = np.bincount(self.phy2log[l], minlength=E)[:E].astype(np.float64)
        M = np.zeros((E, G))
        np.add.at(M, (self.phy2log[l], self.gpu_of_slot()), 1.0)
        return M / np.maximum(cnt, 1)[:, None]

    def slot_loads(self, loads_LE: np.ndarray) -> np.ndarray:
        """[L, P] tokens each physical replica serves (the replicas of e sum to loads[l, e])."""
        loads_LE = np.asarray(loads_LE, dtype=np.float64)
        cnt = self.logcnt.astype(np.float64)
        per = loads_LE / np.maximum(cnt, 1)
        return np.take_along_axis(per, self.phy2log, axis=1)

    def gpu_loads(self, loads_LE: np.ndarray) -> np.ndarray:
        """[L, G] tokens per GPU."""
        return self.slot_loads(loads_LE).reshape(self.num_layers, self.num_gpus, self.slots_per_gpu).sum(-1)

    # --- checks -------------------------------------------------------------------------
    def validate(self) -> "Placement":
        L, P = self.phy2log.shape
        if P != self.num_slots:
            raise PlacementError(f"each layer must have num_gpus*slots_per_gpu = {self.num_slots} slots, got {P}")
        if self.phy2log.min() < 0 or self.phy2log.max() >= self.num_experts:
            raise PlacementError(f"expert ids must be in [0, {self.num_experts - 1}]")
        cnt = self.logcnt
        missing = np.argwhere(cnt == 0)
        if missing.size:
            l, e = missing[0]
            raise PlacementError(f"layer {l}: expert {e} has no slot ({len(missing)} missing in all)")
        return self

    # --- I/O --------------------------------------------------------------------------
    def to_json_dict(self, eplb: bool = False) -> dict:
        d = {
            "physical_to_logical_map": self.phy2log.tolist(),
            "num_gpus": self.num_gpus,
            "slots_per_gpu": self.slots_per_gpu,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "num_physical_experts": self.num_slots,
            "replica_split": "equal",
        }
        if eplb:
            d["phy2log"] = self.phy2log.tolist()
            d["log2phy"] = self.log2phy.tolist()
            d["logcnt"] = self.logcnt.tolist()
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "Placement":
        m = d.get("physical_to_logical_map", d.get("phy2log"))
        if m is None:
            raise PlacementError("placement JSON lacks 'physical_to_logical_map'")
        a = np.asarray(m, dtype=np.int64)
        if a.ndim != 2:
            raise PlacementError(f"physical_to_logical_map must be a list of per-layer lists, got shape {a.shape}")
        G = int(d.get("num_gpus", 0))
        S = int(d.get("slots_per_gpu", 0))
        if G <= 0 or S <= 0:
            if G > 0:
                S = a.shape[1] // G
            else:
                raise PlacementError("placement JSON lacks 'num_gpus'")
        E = int(d.get("num_experts", int(a.max()) + 1))
        return cls(a, G, S, E, meta={k: v for k, v in d.items() if k in ("method", "metrics", "topology")}).validate()


def load_placement(path) -> Placement:
    """Read a placement JSON written by ``moekit plan`` (or any file with ``physical_to_logical_map``)."""
    with open(Path(path)) as f:
        return Placement.from_json_dict(json.load(f))
