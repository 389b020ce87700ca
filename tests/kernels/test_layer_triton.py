"""MoELayer(backend="triton") vs MoELayer(backend="loop"): output, input grad, every param grad."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_testutil import DEVICE, INTERPRET, assert_rel_close  # noqa: E402

layer_mod = pytest.importorskip("moekit.layer", reason="moekit.layer.MoELayer is not available")
from moekit import MoEConfig  # noqa: E402

CONFIGS = [
    dict(hidden_size=24, ffn_hidden_size=40, num_experts=5, top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3),
    dict(hidden_size=24, ffn_hidden_size=40, num_experts=8, top_k=3, router="sigmoid", n_group=4, topk_group=2,
         routed_scaling_factor=2.5, score_correction_bias=True, num_shared_experts=1),
    dict(hidden_size=24, ffn_hidden_size=40, num_experts=6, top_k=2, capacity_factor=1.0, activation="geglu"),
    dict(hidden_size=24, ffn_hidden_size=40, num_experts=4, top_k=1, activation="gelu", norm_topk_prob=False,
         num_shared_experts=1, shared_expert_gate=True),
]


def _run(layer, x):
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["softmax-aux", "sigmoid-group-shared", "capacity-geglu",
                                              "gelu-gated-shared"])
def test_triton_backend_matches_loop(device, cfg, dtype, tol):
    torch.manual_seed(0)
    loop = layer_mod.MoELayer(MoEConfig(**cfg, backend="loop")).to(device=device, dtype=dtype)
    tri = layer_mod.MoELayer(MoEConfig(**cfg, backend="triton")).to(device=device, dtype=dtype)
    tri.load_state_dict(loop.state_dict())
    for layer in (loop, tri):
        layer.train()
    x = torch.randn(3, 11, cfg["hidden_size"], device=device, dtype=dtype)
    y_l, gx_l, gp_l = _run(loop, x)
    y_t, gx_t, gp_t = _run(tri, x)
    assert torch.equal(loop.tokens_per_expert, tri.tokens_per_expert)
    if cfg.get("capacity_factor") is not None:
        assert int(tri.tokens_per_expert.sum()) < x.shape[0] * x.shape[1] * cfg["top_k"], "no slot was dropped"
    assert_rel_close(y_t, y_l, tol, "output")
    assert_rel_close(gx_t, gx_l, tol, "input grad")
    assert gp_l.keys() == gp_t.keys()
    for name in gp_l:
        if gp_l[name] is None:
            assert gp_t[name] is None, name
            continue
        assert_rel_close(gp_t[name], gp_l[name], tol, name)


@pytest.mark.skipif(not (DEVICE == "cuda" and not INTERPRET), reason="'auto' picks triton only on CUDA")
def test_auto_backend_picks_triton_on_cuda():
    from moekit.experts import resolve_backend
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
