"""Topology: bandwidth matrix, and --topology local through a fake NVML (no GPU needed)."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from moekit.planner import NVMLUnavailable, Topology, local_topology


def test_bandwidth_matrix():
    t = Topology(4, 2, gpus_per_node=2, intra_node_bw=400, inter_node_bw=40)
    b = t.bandwidth_matrix()
    assert np.isinf(np.diag(b)).all() and b[0, 1] == 400 and b[0, 2] == 40 and t.num_nodes == 2
    with pytest.raises(ValueError, match="must divide"):
        Topology(4, 2, gpus_per_node=3)
    with pytest.raises(ValueError, match="positive integer"):
        Topology(0, 2)


def _fake_nvml(n, links, fail_init=False):
    m = types.ModuleType("pynvml")
    m.NVML_FEATURE_ENABLED = 1
    m.NVML_NVLINK_MAX_LINKS = 4
    bus = [f"00000000:{0x10 + i:02X}:00.0" for i in range(n)]

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: n
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=bus[h].encode())

    def state(h, link):
        return 1 if link < len(links.get(h, [])) else 0

    def remote(h, link):
        return types.SimpleNamespace(busId=bus[links[h][link]])
    m.nvmlDeviceGetNvLinkState = state
    m.nvmlDeviceGetNvLinkRemotePciInfo = remote
    return m


def test_local_topology_fake_nvml(monkeypatch):
    # GPUs 0-1 joined by two NVLinks, GPU 2 alone (PCIe)
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(3, {0: [1, 1], 1: [0, 0]}))
    t = local_topology(slots_per_gpu=4)
    assert t.num_gpus == 3 and t.slots_per_gpu == 4
    b = t.bandwidth_matrix()
    assert b[0, 1] == 50.0 and b[0, 2] == 25.0 and np.isinf(b[1, 1])


def test_local_topology_no_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(0, {}, fail_init=True))
    with pytest.raises(NVMLUnavailable, match="NVML is not usable"):
        local_topology(1)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(NVMLUnavailable, match="nvidia-ml-py"):
        local_topology(1)
