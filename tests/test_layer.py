"""MoELayer single-device semantics: routers, capacity, losses, backends, errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer, register_bias_update_hook, switch_aux_loss
from moekit.kernels.activations import activation_ref as activate
from moekit.router import apply_capacity, expert_capacity


def _dense_reference(layer: MoELayer, x_TD: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor):
    """Token-by-token reference: y[t] = sum_k w * expert(x[t]) (+ shared)."""
    cfg = layer.config
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            h = activate(x_TD[t] @ layer.experts.w_in[e].t(), cfg.activation)
            y[t] += w_TK[t, k] * (h @ layer.experts.w_out[e].t())
    if layer.shared_expert is not None:
        s = layer.shared_expert(x_TD)
        if layer.shared_expert_gate is not None:
            s = torch.sigmoid(layer.shared_expert_gate(x_TD)) * s
        y = y + s
    return y


def _make(cfg: MoEConfig, seed=0, router_std=0.5, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = MoELayer(cfg).to(dtype)
    with torch.no_grad():
        layer.router.weight.normal_(0, router_std)
        for p in layer.experts.parameters():
            p.normal_(0, 0.2)
    return layer


# ---- routers ---------------------------------------------------------------------------------

def test_softmax_router_matches_formula():
    cfg = MoEConfig(hidden_size=20, ffn_hidden_size=12, num_experts=7, top_k=3, norm_topk_prob=True)
    layer = _make(cfg)
    x = torch.randn(11, 20, dtype=torch.float64)
    r = layer.router(x)
    logits = x.float() @ layer.router.weight.float().t()
    p = logits.softmax(-1)
    w, idx = p.topk(3, -1)
    w = w / w.sum(-1, keepdim=True)
    assert torch.equal(r.topk_ids_TK, idx)
    torch.testing.assert_close(r.topk_weights_TK, w)
    assert r.logits_TE.dtype == torch.float32  # router computes in fp32 whatever the input
    assert r.tokens_per_expert_E.sum() == 33


def test_topk_before_softmax_equals_renormalised_softmax():
    base = dict(hidden_size=16, ffn_hidden_size=8, num_experts=9, top_k=4)
    a = _make(MoEConfig(**base, topk_before_softmax=True))
    b = _make(MoEConfig(**base, norm_topk_prob=True))
    x = torch.randn(13, 16, dtype=torch.float64)
    ra, rb = a.router(x), b.router(x)
    assert torch.equal(ra.topk_ids_TK, rb.topk_ids_TK)
    torch.testing.assert_close(ra.topk_weights_TK, rb.topk_weights_TK)


def test_sigmoid_group_limited_router_matches_formula():
    cfg = MoEConfig(hidden_size=18, ffn_hidden_size=10, num_experts=12, top_k=3, router="sigmoid",
                    n_group=4, topk_group=2, score_correction_bias=True, routed_scaling_factor=2.5)
    layer = _make(cfg)
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 12))
    x = torch.randn(17, 18, dtype=torch.float64)
    r = layer.router(x)
    s = (x.float() @ layer.router.weight.float().t()).sigmoid()
    c = s + layer.router.e_score_correction_bias
    for t in range(17):
        groups = c[t].view(4, 3)
        gscore = groups.topk(2, -1).values.sum(-1)
        keep = set(gscore.topk(2).indices.tolist())
        allowed = [e for e in range(12) if e // 3 in keep]
        chosen = sorted(allowed, key=lambda e: -float(c[t, e].detach()))[:3]
        assert sorted(r.topk_ids_TK[t].tolist()) == sorted(chosen)
        w = s[t, r.topk_ids_TK[t]]
        torch.testing.assert_close(r.topk_weights_TK[t], 2.5 * w / (w.sum() + 1e-20))
        assert all(int(e) // 3 in keep for e in r.topk_ids_TK[t])


def test_layer_output_matches_token_by_token_reference():
    cfg = MoEConfig(hidden_size=24, ffn_hidden_size=40, num_experts=5, top_k=2, num_shared_experts=1,
                    shared_expert_gate=True, shared_expert_hidden_size=36, backend="loop")
    layer = _make(cfg)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    y = layer(x)
    r = layer.router(x.view(-1, 24))
    ref = _dense_reference(layer, x.view(-1, 24), r.topk_ids_TK, r.topk_weights_TK.double())
    torch.testing.assert_close(y.view(-1, 24), ref)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (130, 24)])
def test_backends_agree_outputs_and_grads(activation, shape):
    """cpu and grouped_mm vs loop in fp32: outputs, input grads and every parameter grad."""
    T, D = shape
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=40, num_experts=5, top_k=3, activation=activation,
                    num_shared_experts=1, aux_loss_coef=0.01, z_loss_coef=0.001)
    results = []
    for backend in ("loop", "cpu", "grouped_mm"):
        layer = _make(cfg.replace(backend=backend), dtype=torch.float32)
        torch.manual_seed(1)
        x = torch.randn(T, D, requires_grad=True)
        y = layer(x)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        results.append((y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}))
    y0, gx0, gp0 = results[0]
    for y1, gx1, gp1 in results[1:]:
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
        for n in gp0:
            torch.testing.assert_close(gp1[n], gp0[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("backend", ["loop", "cpu", "grouped_mm"])
def test_zero_token_expert_and_all_tokens_on_one_expert(backend):
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=6, top_k=1, backend=backend)
    layer = _make(cfg, dtype=torch.float32)
    with torch.no_grad():  # expert 4 always wins: every token on one expert, five experts empty
        layer.router.weight.zero_()
        layer.router.weight[4] = 1.0
    x = torch.rand(9, 16) + 0.1
    y = layer(x)
    assert layer.tokens_per_expert.tolist() == [0, 0, 0, 0, 9, 0]
    ref = activate(x @ layer.experts.w_in[4].t(), "swiglu") @ layer.experts.w_out[4].t()
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert layer.experts.w_in.grad[:4].abs().sum() == 0 and layer.experts.w_in.grad[4].abs().sum() > 0


def test_parameters_after_optimizer_steps_agree_between_backends():
    cfg = MoEConfig(hidden_size=20, ffn_hidden_size=12, num_experts=7, top_k=2, aux_loss_coef=0.01)
    params = []
    for backend in ("loop", "cpu", "grouped_mm"):
        layer = _make(cfg.replace(backend=backend), dtype=torch.float32)
        opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
        torch.manual_seed(3)
        for _ in range(5):
            x = torch.randn(4, 5, 20)
            loss = (layer(x) - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        params.append(dict(layer.named_parameters()))
    for other in params[1:]:
        for n, p in params[0].items():
            torch.testing.assert_close(other[n], p, rtol=1e-5, atol=1e-6, msg=n)


# ---- capacity --------------------------------------------------------------------------------

def _routing_for(ids, weights, E):
    layer = _make(MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=E, top_k=ids.shape[1]))
    r = layer.router(torch.randn(ids.shape[0], 4, dtype=torch.float64))
    r.topk_ids_TK = ids
    r.topk_weights_TK = weights
    r.tokens_per_expert_E = torch.bincount(ids.flatten(), minlength=E)
    return r


def test_capacity_position_keeps_first_tokens():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    w = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.9, 0.1], [0.6, 0.4]])
    out = apply_capacity(_routing_for(ids, w, 3), 2, "position")
    assert out.topk_ids_TK.tolist() == [[0, 1], [0, 2], [-1, 1], [-1, -1]]
    assert out.tokens_per_expert_E.tolist() == [2, 2, 1]
    assert out.topk_weights_TK[3].tolist() == [0.0, 0.0]


def test_capacity_probs_keeps_highest_weights():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    w = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.9, 0.1], [0.6, 0.4]])
    out = apply_capacity(_routing_for(ids, w, 3), 2, "probs")
    # expert 0 weights: t0 .1, t1 .8, t2 .9, t3 .4 -> keep t2, t1; expert 1: .9, .1, .6 -> keep t0, t3
    assert out.topk_ids_TK.tolist() == [[-1, 1], [0, 2], [0, -1], [1, -1]]


def test_capacity_formulas_tutel_semantics():
    counts = torch.tensor([10, 2, 0, 4])
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=4, num_experts=4, top_k=2)
    assert expert_capacity(cfg, 8, counts) is None
    assert expert_capacity(cfg.replace(capacity_factor=1.25), 8, counts) == 2 * int(1.25 * 2)
    assert expert_capacity(cfg.replace(capacity_factor=0.0), 8, counts) == 10
    assert expert_capacity(cfg.replace(capacity_factor=-1.0), 8, counts) == min(2 * 2, 10)
    assert expert_capacity(cfg.replace(capacity_factor=-9.0), 8, counts) == 10


def test_capacity_drops_change_the_output_and_counts():
    cfg = MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=4, top_k=2, capacity_factor=0.5,
                    backend="loop")
    layer = _make(cfg)
    x = torch.randn(16, 12, dtype=torch.float64)
    y = layer(x)
    cap = 2 * int(0.5 * math.ceil(16 / 4))
    assert int(layer.tokens_per_expert.max()) <= cap
    r = layer.router(x)
    kept = apply_capacity(r, cap, "probs")
    torch.testing.assert_close(y, _dense_reference(layer, x, kept.topk_ids_TK, kept.topk_weights_TK.double()))


def test_impossible_capacity_raises():
    layer = _make(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=64, top_k=1, capacity_factor=0.1))
    with pytest.raises(ValueError, match="capacity"):
        layer(torch.randn(4, 8, dtype=torch.float64))


# ---- losses ----------------------------------------------------------------------------------

def test_aux_loss_hf_is_k_times_megatron_and_matches_hf_formula():
    scores = torch.rand(10, 6).softmax(-1)
    ids = scores.topk(3, -1).indices
    hf = switch_aux_loss(scores, ids, 3, "hf")
    meg = switch_aux_loss(scores, ids, 3, "megatron")
    torch.testing.assert_close(hf, 3 * meg)
    # HF load_balancing_loss_func for one layer: E * sum(mean(one_hot over k summed) * mean(p))
    one_hot = F.one_hot(ids, 6).float()  # [T, K, E]
    tokens_per_expert = one_hot.mean(0)  # [K, E]
    expected = 6 * (tokens_per_expert * scores.mean(0).unsqueeze(0)).sum()
    torch.testing.assert_close(hf, expected)


def test_losses_are_in_the_graph_and_train_the_router():
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, aux_loss_coef=1.0)
    layer = _make(cfg, dtype=torch.float32)
    x = torch.randn(32, 16)
    y = layer(x)
    (y * 0).sum().backward()  # only the aux loss contributes
    g_aux = layer.router.weight.grad.clone()
    assert g_aux.abs().sum() > 0
    layer.zero_grad()
    r = layer.router(x)
    (cfg.aux_loss_coef * switch_aux_loss(r.scores_TE, r.topk_ids_TK, 2, "hf")).backward()
    torch.testing.assert_close(g_aux, layer.router.weight.grad)
    assert layer.aux_loss is not None and not layer.aux_loss.requires_grad


def test_z_and_seq_aux_loss_values():
    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=8, num_experts=4, top_k=2, z_loss_coef=0.1,
                    seq_aux_loss_coef=0.2)
    layer = _make(cfg, dtype=torch.float32)
    x = torch.randn(3, 5, 16)
    layer(x)
    r = layer.router(x.view(-1, 16))
    torch.testing.assert_close(layer.z_loss, 0.1 * torch.logsumexp(r.logits_TE, -1).square().mean())
    per = [switch_aux_loss(r.scores_TE[b * 5:(b + 1) * 5], r.topk_ids_TK[b * 5:(b + 1) * 5], 2, "hf")
           for b in range(3)]
    torch.testing.assert_close(layer.seq_aux_loss, 0.2 * torch.stack(per).mean())
    layer.eval()
    layer(x)
    assert layer.z_loss is None  # no losses outside training


def test_aux_free_bias_update_moves_toward_balance():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, router="sigmoid",
                    score_correction_bias=True, bias_update_rate=0.01)
    layer = _make(cfg, dtype=torch.float32)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # expert 0 always chosen for positive inputs
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    register_bias_update_hook(opt, layer)
    x = torch.rand(20, 8)
    layer(x).sum().backward()
    assert layer.expert_load.tolist() == [20, 0, 0, 0]
    opt.step()
    torch.testing.assert_close(layer.router.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert layer.expert_load.sum() == 0
    # weights still come from the unbiased scores
    r = layer.router(x)
    torch.testing.assert_close(r.topk_weights_TK, torch.ones(20, 1))


def test_jitter_only_in_training_and_changes_expert_input():
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, router_jitter=0.1)
    layer = _make(cfg, dtype=torch.float32)
    x = torch.randn(6, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


# ---- errors ----------------------------------------------------------------------------------

def test_errors_are_clear():
    layer = _make(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"\[\.\.\., D=8\]"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="shape"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(3, 8, dtype=torch.float64))
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/inf.*token index 1"):
        layer(x)
    with pytest.raises(ValueError, match="top_k=5 exceeds num_experts=4"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="activation"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, activation="tanh")
    with pytest.raises(ValueError, match="hidden_size"):
        MoEConfig(hidden_size=0, ffn_hidden_size=8, num_experts=4, top_k=1)
    with pytest.raises(ValueError, match="n_group"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=10, top_k=1, n_group=3)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=1, capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="unknown preset"):
        MoEConfig.preset("gpt5")
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer({"hidden_size": 8})


@pytest.mark.parametrize("name", ["debug", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"])
def test_presets_build_and_run_shrunk(name):
    over = dict(hidden_size=24, ffn_hidden_size=16)
    if name != "debug":
        over["num_experts"] = 16
    cfg = MoEConfig.preset(name, **over)
    layer = MoELayer(cfg)
    y = layer(torch.randn(2, 3, 24))
    assert y.shape == (2, 3, 24) and torch.isfinite(y).all()


def test_empty_input_and_single_token():
    layer = _make(MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, aux_loss_coef=0.1),
                  dtype=torch.float32)
    assert layer(torch.randn(0, 8)).shape == (0, 8)
    x = torch.randn(1, 8, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.shape == (1, 8)


def test_import_does_not_touch_cuda_or_triton():
    import subprocess
    import sys
    code = ("import sys, moekit; import torch; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "assert not torch.cuda.is_initialized(), 'cuda initialised'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_planner_imports_without_torch():
    """moekit's package init is lazy: the numpy-only planner does not pull in torch."""
    import subprocess
    import sys
    code = "import sys, moekit.planner; assert 'torch' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
