"""Predictors: router look-ahead on a real MoELayer stack; the learned path predictor's held-out recall."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.offload.predict import PathPredictor, lookahead_topk

TRACES = Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _recall(pred_TK, true_TK):
    return np.mean([len(set(p.tolist()) & set(t.tolist())) / len(t) for p, t in zip(pred_TK, true_TK)])


def test_lookahead_on_moelayer_stack():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=16, top_k=2)
    layers = [MoELayer(cfg).eval() for _ in range(4)]
    h = torch.randn(64, 32)
    inputs, chosen = [], []
    with torch.no_grad():
        for layer in layers:
            inputs.append(h)
            chosen.append(layer.router(h).topk_ids_TK)
            h = h + 0.1 * layer(h)                       # residual stream: small change per layer
        own = lookahead_topk(inputs[0], [layers[0].router.weight], 2)[0]
        assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(own, chosen[0]))   # exact on itself
        ahead = lookahead_topk(inputs[0], [l.router.weight for l in layers[1:]], 2)
    for i, pred in enumerate(ahead, start=1):
        assert _recall(pred, chosen[i]) > 0.5 > 2 / 16          # far above chance (K/E = 0.125)
    with pytest.raises(ValueError, match="router_weights_ED"):
        lookahead_topk(inputs[0], [torch.randn(16, 8)], 2)


def test_path_predictor_learns_a_deterministic_path():
    ids = np.zeros((3, 40, 1), dtype=np.int32)
    rng = np.random.default_rng(0)
    ids[0, :, 0] = rng.integers(0, 4, 40)
    ids[1, :, 0] = (ids[0, :, 0] + 1) % 4
    ids[2, :, 0] = (ids[1, :, 0] * 2) % 4
    p = PathPredictor(3, 4, 1, temporal_weight=0.0, prior_weight=0.0).fit(ids[:, :30])
    assert p.recall(ids[:, 30:], mode="cross") == 1.0
    assert p.recall(ids[:, 30:], mode="path", horizon=2) == 1.0


@pytest.mark.skipif(not (TRACES / "qwen.route.csv").exists(), reason="../shared/traces is absent")
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_path_predictor_held_out_recall_reported(name):
    from moekit.offload.simulate import load_trace

    tr = load_trace(TRACES / f"{name}.route.csv")
    phase = np.asarray(tr.meta["phase"])
    ids = np.stack(tr.topk_ids)[:, phase == 1]           # decode tokens, in order
    split = ids.shape[1] * 2 // 3
    p = PathPredictor(tr.num_layers, tr.num_experts, tr.top_k).fit(ids[:, :split])
    held = ids[:, split:]
    r = {m: p.recall(held, mode=m) for m in ("prior", "cross", "temporal", "cross+temporal")}
    r["path h=2"] = p.recall(held, mode="path", horizon=2)
    print(f"{name} held-out top-{tr.top_k} recall:", {k: round(v, 3) for k, v in r.items()})
    chance = tr.top_k / tr.num_experts
    assert r["cross"] > max(r["prior"], 5 * chance)


def test_whole_path_predictor_learns_a_deterministic_path():
    from moekit.offload.predict import WholePathPredictor

    rng = np.random.default_rng(0)
    ids = np.zeros((4, 60, 1), dtype=np.int32)
    ids[0, :, 0] = rng.integers(0, 6, 60)
    for l in range(1, 4):
        ids[l, :, 0] = (ids[l - 1, :, 0] * 5 + l) % 6
    p = WholePathPredictor(4, 6, 1).fit(ids[:, :40])
    p.new_sequence()
    held = ids[:, 40:]
    hit = tot = 0
    for t in range(held.shape[1]):                   # layers 1.. from the token's own earlier layers
        for l in range(4):
            if l:
                hit += p.predict(l)[0] == held[l, t, 0]
                tot += 1
            p.observe(l, [int(held[l, t, 0])])
        p.end_token()
    assert hit == tot
    s = p.scores(1)
    assert 0 <= s.min() and s.max() <= 1
    with pytest.raises(ValueError, match="ids_LTK"):
        p.fit(np.zeros((3, 2, 1), dtype=np.int32))


def test_whole_path_predictor_memory_cap():
    """max_tokens: the oldest quarter is forgotten when full; what is kept still predicts, successor
    links stay with their tokens, and the last finished token is a copy (no view into the memory)."""
    from moekit.offload.predict import WholePathPredictor

    ids = np.zeros((3, 50, 1), dtype=np.int32)
    ids[0, :, 0] = np.arange(50) % 5
    for l in (1, 2):
        ids[l, :, 0] = (ids[l - 1, :, 0] + l) % 5
    p = WholePathPredictor(3, 5, 1, max_tokens=16).fit(ids, continues=True)
    assert p.n <= 16 and p._succ_T[: p.n - 1].all() and not p._succ_T[p.n - 1]
    last = p.last_LE.copy()
    assert np.array_equal(last, p._paths_TLE[p.n - 1])
    for t in range(10):                              # keep decoding past the cap
        for l in range(3):
            if l:
                assert p.predict(l)[0] == ids[l, t, 0]
            p.observe(l, [int(ids[l, t, 0])])
        p.end_token()
        assert p.n <= 16
    assert np.array_equal(p.last_LE, p._paths_TLE[p.n - 1]) and p.last_LE.base is None
    with pytest.raises(ValueError, match="max_tokens"):
        WholePathPredictor(3, 5, 1, max_tokens=1)


@pytest.mark.skipif(not (TRACES / "qwen.route.csv").exists(), reason="../shared/traces is absent")
@pytest.mark.parametrize("name", ["qwen", "gemma"])
def test_whole_path_predictor_held_out_recall_beats_co_activation(name):
    from moekit.offload.predict import WholePathPredictor
    from moekit.offload.simulate import load_trace

    tr = load_trace(TRACES / f"{name}.route.csv")
    phase = np.asarray(tr.meta["phase"])
    ids = np.stack(tr.topk_ids)[:, phase == 1]
    split = ids.shape[1] * 2 // 3
    held = ids[:, split:]
    cross = PathPredictor(tr.num_layers, tr.num_experts, tr.top_k).fit(ids[:, :split]).recall(held, mode="cross")
    wp = WholePathPredictor(tr.num_layers, tr.num_experts, tr.top_k).fit(ids[:, :split])
    r = wp.recall(held, online=False)                # trained on the first 2/3 only, frozen
    print(f"{name} held-out top-{tr.top_k} recall: whole path {r:.3f}, co-activation from the previous layer {cross:.3f}")
    assert r > cross + 0.03
