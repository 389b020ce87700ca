"""Bytes and memory of FSSDP, the formulas of REFERENCE.md §2.

Legend: L MoE layers, E experts per layer, W ranks (devices d), p elements per expert (w_in and
w_out together), b_w / b_g / b_o bytes per weight / gradient / optimizer-state element (Adam
in fp32: b_o = 8, +4 with an fp32 master copy), r_{l,e} holders of expert e of layer l in P',
m_{l,d} non-owned experts materialised on d.

- spAG bytes of layer l (all ranks together) = sum_e (r_{l,e} - 1) * p * b_w;
  spRS bytes = sum_e (r_{l,e} - 1) * p * b_g; with re-materialisation the spAG runs twice.
- bottleneck inbound bytes on d = m_{l,d} * p * b_w.
- memory on d: owned shard sum_l |owned_{l,d}| * p * (b_w + b_g + b_o); materialised replicas
  sum_l m_{l,d} * p * (b_w + b_g) without re-materialisation, max_l m_{l,d} * p * (b_w + b_g)
  with it (one layer's replicas alive at a time).
- expert parallel (for comparison): L * (E / W) * p * (b_w + b_g + b_o);
  FSDP2 sharding experts on dim 0 gathers E * p * b_w per layer (and reduce-scatters E * p * b_g).

The tests check these against what the collectives counted and the tensors a rank holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from moekit.parallel.fssdp.sparse import Materialization


def spag_bytes(mat: Materialization, p: int, b_w: int) -> int:
    """Bytes one SparseAllGather(P, P') moves in all: sum_e (r_e - 1) * p * b_w."""
    return sum(r - 1 for r in mat.copies_E) * p * b_w


def sprs_bytes(mat: Materialization, p: int, b_g: int) -> int:
    """Bytes one SparseReduceScatter(P', P) moves in all: sum_e (r_e - 1) * p * b_g."""
    return sum(r - 1 for r in mat.copies_E) * p * b_g


def inbound_bytes(mat: Materialization, rank: int, p: int, b_w: int) -> int:
    """Bytes ``rank`` receives in one spAG: m_{l,d} * p * b_w."""
    return len(mat.replicas(rank)) * p * b_w


@dataclass(frozen=True)
class Memory:
    """Bytes of expert state on one rank: ``owned`` (weights + grads + optimizer state of the
    owned experts) and ``materialized`` (weights + grads of the replicas)."""

    owned: int
    materialized: int

    @property
    def total(self) -> int:
        return self.owned + self.materialized


def fssdp_memory(mats: Sequence[Materialization], rank: int, p: int, b_w: int, b_g: int, b_o: int,
                 remat: bool = False) -> Memory:
    """Per-rank memory of an FSSDP model whose layers have placements ``mats``."""
    owned = sum(len(m.owned(rank)) for m in mats) * p * (b_w + b_g + b_o)
    reps = [len(m.replicas(rank)) for m in mats] or [0]
    mat = (max(reps) if remat else sum(reps)) * p * (b_w + b_g)
    return Memory(owned, mat)


def ep_memory(num_layers: int, num_experts: int, world_size: int, p: int, b_w: int, b_g: int, b_o: int) -> int:
    """Expert parallel: L * (E / W) * p * (b_w + b_g + b_o) (E / W rounded up)."""
    return num_layers * -(-num_experts // world_size) * p * (b_w + b_g + b_o)


def fsdp2_gather_bytes(num_experts: int, p: int, b_w: int) -> int:
    """FSDP2 on experts (dim 0): every rank's all-gather materialises E * p * b_w per layer."""
    return num_experts * p * b_w
