"""Cluster topology for placement: GPUs, nodes, expert slots, link bandwidths.

Legend: G GPUs, N GPUs per node, S expert slots per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import PlanInputError

__all__ = ["Topology", "local_topology", "NVMLUnavailable"]


@dataclass
class Topology:
    """``num_gpus`` GPUs in nodes of ``gpus_per_node``; ``slots_per_gpu`` expert slots per GPU
    per MoE layer (the memory budget); bandwidths in GB/s (intra-node: NVLink-class, inter-node:
    per-GPU network). ``bandwidth`` optionally overrides with a full ``[G, G]`` matrix."""

    num_gpus: int
    slots_per_gpu: int
    gpus_per_node: int | None = None
    intra_node_bw: float = 450.0
    inter_node_bw: float = 50.0
    bandwidth: np.ndarray | None = None

    def __post_init__(self):
        for name in ("num_gpus", "slots_per_gpu"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise PlanInputError("{%s} must be a positive integer, got {0!r}" % name, v)
        self.num_gpus = int(self.num_gpus)
        self.slots_per_gpu = int(self.slots_per_gpu)
        if self.gpus_per_node is None:
            self.gpus_per_node = self.num_gpus
        self.gpus_per_node = int(self.gpus_per_node)
        if self.gpus_per_node <= 0 or self.num_gpus % self.gpus_per_node:
            raise PlanInputError("{gpus_per_node}={0} must divide {num_gpus}={1}", self.gpus_per_node, self.num_gpus)
        for name in ("intra_node_bw", "inter_node_bw"):
            if not getattr(self, name) > 0:
                raise PlanInputError("{%s} must be positive (GB/s), got {0!r}" % name, getattr(self, name))
        if self.bandwidth is not None:
            b = np.asarray(self.bandwidth, dtype=np.float64)
            if b.shape != (self.num_gpus, self.num_gpus):
                raise ValueError(f"bandwidth must be [{self.num_gpus}, {self.num_gpus}], got {b.shape}")
            self.bandwidth = b

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def num_slots(self) -> int:
        return self.num_gpus * self.slots_per_gpu

    def node_of(self, g) -> np.ndarray:
        return np.asarray(g) // self.gpus_per_node

    def bandwidth_matrix(self) -> np.ndarray:
        """[G, G] GB/s between GPUs (diagonal: inf, no link used)."""
        if self.bandwidth is not None:
            b = self.bandwidth.copy()
        else:
            n = np.arange(self.num_gpus) // self.gpus_per_node
            b = np.where(n[:, None] == n[None, :], self.intra_node_bw, self.inter_node_bw).astype(np.float64)
        np.fill_diagonal(b, np.inf)
        return b

    def to_dict(self) -> dict:
        return {"num_gpus": self.num_gpus, "slots_per_gpu": self.slots_per_gpu,
                "gpus_per_node": self.gpus_per_node, "num_nodes": self.num_nodes,
                "intra_node_bw_GBps": self.intra_node_bw, "inter_node_bw_GBps": self.inter_node_bw}


class NVMLUnavailable(RuntimeError):
    """NVML (nvidia-ml-py) is missing or finds no GPU."""


def local_topology(slots_per_gpu: int, intra_node_bw: float | None = None, inter_node_bw: float = 50.0,
                   num_gpus: int | None = None, gpus_per_node: int | None = None) -> Topology:
    """A cluster of nodes laid out like this machine, whose GPUs and NVLinks NVML reports.

    Each node is this machine's first ``gpus_per_node`` GPUs (default: all of them, or
    ``num_gpus`` when that is fewer); ``num_gpus`` (default: one node) must be a multiple of
    it, the nodes joined by ``inter_node_bw``. Within a node, GPU pairs joined by an active
    NVLink get 25 GB/s per link and direction (``intra_node_bw`` when given), other pairs PCIe
    (~25 GB/s); NVSwitch systems are all-to-all at ``intra_node_bw`` (default 450)."""
    node_bw = nvml_bandwidth(intra_node_bw)
    n = node_bw.shape[0]
    if gpus_per_node is None:
        gpus_per_node = n if num_gpus is None else min(n, num_gpus)
    if gpus_per_node > n:
        raise PlanInputError("{gpus_per_node}={0} exceeds the {1} GPUs NVML sees on this machine", gpus_per_node, n)
    G = gpus_per_node if num_gpus is None else num_gpus
    node_bw = node_bw[:gpus_per_node, :gpus_per_node]
    intra = float(np.max(node_bw[np.isfinite(node_bw)])) if gpus_per_node > 1 else (intra_node_bw or 450.0)
    topo = Topology(G, slots_per_gpu, gpus_per_node, intra, inter_node_bw)
    if topo.num_gpus == 1:
        return topo
    return replace(topo, bandwidth=tile_nodes(node_bw, topo.num_nodes, inter_node_bw))


def tile_nodes(node_bw: np.ndarray, num_nodes: int, inter_node_bw: float) -> np.ndarray:
    """[G, G] GB/s of ``num_nodes`` copies of one node's [N, N] matrix, joined by ``inter_node_bw``."""
    N = node_bw.shape[0]
    bw = np.full((num_nodes * N, num_nodes * N), float(inter_node_bw))
    for k in range(num_nodes):
        bw[k * N:(k + 1) * N, k * N:(k + 1) * N] = node_bw
    np.fill_diagonal(bw, np.inf)
    return bw


def nvml_bandwidth(intra_node_bw: float | None = None) -> np.ndarray:
    """[n, n] GB/s between this machine's n GPUs from NVML's NVLink states (diagonal: inf);
    see :func:`local_topology`. Raises NVMLUnavailable without NVML or a GPU."""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        raise NVMLUnavailable("--topology local needs NVML: install nvidia-ml-py (pip install nvidia-ml-py)") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        raise NVMLUnavailable(f"NVML is not usable on this machine (no NVIDIA driver/GPU?): {exc}") from None
    try:
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            raise NVMLUnavailable("NVML reports no GPU on this machine")
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        pci = [pynvml.nvmlDeviceGetPciInfo(h).busId for h in handles]
        pci = [p.decode() if isinstance(p, bytes) else p for p in pci]
        links = np.zeros((n, n))
        for i, h in enumerate(handles):
            for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link) != pynvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId
                    remote = remote.decode() if isinstance(remote, bytes) else remote
                except Exception:
                    continue
                for j, p in enumerate(pci):
                    if j != i and p.lower().endswith(remote.lower()[-12:]):
                        links[i, j] += 1
        bw = np.where(links > 0, links * 25.0 if intra_node_bw is None else intra_node_bw, 25.0)
        if not links.any():  # NVSwitch systems report links to the switch: treat as all-to-all
            nvswitch = any(_any_nvlink(pynvml, h) for h in handles)
            if nvswitch:
                bw = np.full((n, n), intra_node_bw or 450.0)
        np.fill_diagonal(bw, np.inf)
        return bw
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _any_nvlink(pynvml, h) -> bool:
    for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
        try:
            if pynvml.nvmlDeviceGetNvLinkState(h, link) == pynvml.NVML_FEATURE_ENABLED:
                return True
        except Exception:
            return False
    return False
