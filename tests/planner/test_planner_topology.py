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


def test_local_topology_is_a_cluster_of_this_node(monkeypatch):
    """Nodes laid out like this machine: --gpus a multiple of the node, --gpus-per-node a prefix
    of it, --intra-node-bw for its NVLink pairs, --inter-node-bw between nodes."""
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(3, {0: [1, 1], 1: [0, 0]}))
    t = local_topology(2, num_gpus=6, inter_node_bw=10.0)
    b = t.bandwidth_matrix()
    assert (t.num_gpus, t.gpus_per_node, t.num_nodes) == (6, 3, 2)
    assert b[0, 1] == b[3, 4] == 50.0 and b[0, 2] == b[3, 5] == 25.0 and b[0, 3] == b[2, 5] == 10.0
    t = local_topology(1, intra_node_bw=300.0, gpus_per_node=2, num_gpus=4)
    b = t.bandwidth_matrix()
    assert (t.gpus_per_node, t.num_nodes) == (2, 2) and b[0, 1] == b[2, 3] == 300.0 and b[1, 2] == 50.0
    assert local_topology(1, num_gpus=2).gpus_per_node == 2          # fewer GPUs than the node: one node
    with pytest.raises(ValueError, match="gpus_per_node=4 exceeds the 3 GPUs NVML sees"):
        local_topology(1, gpus_per_node=4)
    with pytest.raises(ValueError, match="gpus_per_node=3 must divide num_gpus=4"):
        local_topology(1, num_gpus=4)


def test_make_topology_local(monkeypatch):
    from moekit.planner import make_topology
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(4, {0: [1], 1: [0]}))
    t = make_topology(8, local=True)
    assert (t.num_gpus, t.slots_per_gpu, t.gpus_per_node) == (4, 2, 4) and t.bandwidth_matrix()[0, 1] == 25.0
    t = make_topology(8, num_gpus=8, local=True, intra_node_bw=None, inter_node_bw=12.5)
    assert (t.num_nodes, t.slots_per_gpu, t.bandwidth_matrix()[0, 4]) == (2, 1, 12.5)


def test_plan_cli_topology_local_honours_flags(monkeypatch, tmp_path, capsys):
    import json
    from moekit.cli import main
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(2, {0: [1], 1: [0]}))
    p = tmp_path / "m.json"
    p.write_text(json.dumps({str(l): [[0, 1], [2, 3], [1, 2], [0, 3]] for l in range(3)}))
    rc = main(["plan", "--trace", str(p), "--topology", "local", "--gpus", "4", "--gpus-per-node", "2",
               "--intra-node-bw", "300", "--inter-node-bw", "20", "--solver", "greedy", "--quiet",
               "--out", str(tmp_path / "o.json")])
    assert rc == 0, capsys.readouterr().err
    topo = json.loads((tmp_path / "o.json").read_text())["topology"]
    assert topo == {"num_gpus": 4, "slots_per_gpu": 1, "gpus_per_node": 2, "num_nodes": 2,
                    "intra_node_bw_GBps": 300.0, "inter_node_bw_GBps": 20.0}
    rc = main(["plan", "--trace", str(p), "--topology", "local", "--gpus-per-node", "4", "--quiet",
               "--out", str(tmp_path / "o.json")])
    assert rc == 2 and "--gpus-per-node=4 exceeds the 2 GPUs NVML sees" in capsys.readouterr().err
