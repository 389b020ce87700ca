"""Routing-trace recording: what the recorder writes is what the layers routed, and the
planner's reader loads it back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from moekit import MoEConfig, MoELayer
from moekit.planner.traces import TraceFormatError, read_trace
from moekit.trace import expert_load_table, record


class _Stack(nn.Module):
    def __init__(self, cfg: MoEConfig, n: int):
        super().__init__()
        self.layers = nn.ModuleList(MoELayer(cfg) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_record_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=5, top_k=2, capacity_factor=-0.5)
    model = _Stack(cfg, 3)
    seen = []
    model.layers[1].add_routing_observer(lambda layer, r: seen.append(r.topk_ids_TK.clone()))
    with record(model, model_name="stack") as rec:
        model(torch.randn(2, 7, 12))
        model(torch.randn(5, 12))
    model(torch.randn(3, 12))  # after the context: not recorded
    trace = rec.trace()
    assert trace.num_layers == 3 and trace.top_k == 2 and trace.num_experts == 5
    assert trace.num_tokens == [19, 19, 19] and trace.aligned
    np.testing.assert_array_equal(trace.topk_ids[1], torch.cat(seen[:2]).numpy())
    assert (trace.topk_ids[0] == -1).any(), "capacity drops are recorded as -1"
    path = rec.save(tmp_path / "t.npz")
    back = read_trace(path)
    for a, b in zip(trace.topk_ids, back.topk_ids):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(trace.topk_weights, back.topk_weights):
        np.testing.assert_array_equal(a, b)
    assert back.meta["model"] == "stack" and back.meta["layer_names"] == ["layers.0", "layers.1", "layers.2"]
    loads = expert_load_table(back)
    assert loads.shape == (3, 5)
    assert loads[2].tolist() == np.bincount(back.topk_ids[2][back.topk_ids[2] >= 0], minlength=5).tolist()


def test_record_errors(tmp_path):
    with pytest.raises(ValueError, match="no moekit.MoELayer"):
        with record(nn.Linear(3, 3)):
            pass
    model = _Stack(MoEConfig(hidden_size=6, ffn_hidden_size=4, num_experts=3, top_k=1), 1)
    with record(model) as rec:
        pass
    with pytest.raises(RuntimeError, match="nothing recorded"):
        rec.trace()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(TraceFormatError):
        read_trace(bad)
