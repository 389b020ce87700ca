"""route_topk (Triton) vs route_topk_ref: ids and counts exact, weights to fp32 rounding."""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels import route_topk, route_topk_ref  # noqa: E402

from _kernel_testutil import assert_rel_close  # noqa: E402

CASES = []
for T, E, K in itertools.product([1, 7, 130], [1, 5, 16], [1, 2, 3]):
    if K > E:
        continue
    CASES.append(("softmax", T, E, K, 1, 1, False))
    CASES.append(("sigmoid", T, E, K, 1, 1, True))
    CASES.append(("softmax_topk", T, E, K, 1, 1, False))
# group-limited (DeepSeek-V3 style): G groups, keep topk_group
CASES += [("sigmoid", T, 16, K, 4, 2, True) for T in (1, 7, 130) for K in (1, 2, 3)]
CASES += [("sigmoid", 33, 256, 8, 8, 4, True), ("softmax", 33, 60, 4, 1, 1, False),
          ("softmax", 7, 16, 3, 4, 3, True), ("softmax_topk", 33, 32, 4, 1, 1, True)]


@pytest.mark.parametrize("score_func,T,E,K,n_group,topk_group,bias", CASES)
@pytest.mark.parametrize("renorm", [True, False])
def test_route_topk_matches_ref(device, score_func, T, E, K, n_group, topk_group, bias, renorm):
    g = torch.Generator().manual_seed(T * 1000 + E * 10 + K)
    logits = torch.randn(T, E, generator=g).to(device)
    b = (torch.randn(E, generator=g) * 0.3).to(device) if bias else None
    kw = dict(score_func=score_func, bias_E=b, n_group=n_group, topk_group=topk_group,
              renormalize=renorm, scaling_factor=2.5 if score_func == "sigmoid" else 1.0)
    ids, w, counts = route_topk(logits, K, **kw)
    rids, rw, rcounts = route_topk_ref(logits, K, **kw)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and counts.dtype == torch.int32
    assert torch.equal(ids.cpu(), rids.cpu())
    assert torch.equal(counts.cpu(), rcounts.cpu())
    assert int(counts.sum()) == T * K
    assert_rel_close(w, rw, 1e-6, "weights")
    if renorm or score_func == "softmax_topk":
        assert_rel_close(w.sum(-1), torch.full((T,), kw["scaling_factor"]), 1e-6, "renormalised sum")


def test_softmax_topk_formula(device):
    """topk_before_softmax (Megatron / GPT-OSS): softmax over the selected logits."""
    logits = torch.randn(9, 8, device=device)
    ids, w, _ = route_topk(logits, 3, score_func="softmax_topk")
    top = logits.double().cpu().topk(3, dim=-1)
    assert torch.equal(ids.cpu().long(), top.indices)
    assert_rel_close(w, torch.softmax(top.values, -1), 1e-6)


def test_ties_break_toward_lower_index(device):
    logits = torch.zeros(4, 8, device=device)
    logits[1, 5] = logits[1, 6] = 1.0  # tie between 5 and 6 at the top
    for fn in (route_topk, route_topk_ref):
        ids, w, _ = fn(logits, 3)
        assert ids[0].tolist() == [0, 1, 2]
        assert ids[1].tolist() == [5, 6, 0]
    # equal group scores: the lower group wins
    ids, _, _ = route_topk(torch.zeros(2, 8, device=device), 2, score_func="sigmoid", n_group=4, topk_group=1)
    assert ids.tolist() == [[0, 1], [0, 1]]


def test_half_precision_logits_and_strided(device):
    logits = torch.randn(20, 24, device=device).to(torch.bfloat16)[:, :16]  # non-contiguous rows
    ids, w, c = route_topk(logits, 2)
    rids, rw, rc = route_topk_ref(logits, 2)
    assert torch.equal(ids.cpu(), rids.cpu()) and torch.equal(c.cpu(), rc.cpu())
    assert_rel_close(w, rw, 1e-6)


def test_matches_deepseek_formula(device):
    """Independent check of the sigmoid / group-limited formula (REFERENCE.md section 1)."""
    T, E, G, TG, K = 9, 16, 4, 2, 3
    logits = torch.randn(T, E, device=device)
    bias = torch.randn(E, device=device) * 0.1
    ids, w, _ = route_topk(logits, K, score_func="sigmoid", bias_E=bias, n_group=G, topk_group=TG,
                           scaling_factor=2.5)
    s = torch.sigmoid(logits.double().cpu())
    c = s + bias.double().cpu()
    gs = c.view(T, G, E // G).topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, G, dtype=torch.bool).scatter(1, gs.topk(TG, -1).indices, True)
    c = c.masked_fill(~keep.repeat_interleave(E // G, 1), float("-inf"))
    idx = c.topk(K, -1).indices
    ww = s.gather(1, idx)
    ww = ww / (ww.sum(-1, keepdim=True) + 1e-20) * 2.5
    assert torch.equal(ids.cpu().long(), idx)
    assert_rel_close(w, ww, 1e-6)


@pytest.mark.parametrize("bad", [
    dict(top_k=0), dict(top_k=9), dict(score_func="tanh"), dict(n_group=3), dict(n_group=4, topk_group=5),
    dict(n_group=8), dict(n_group=4, topk_group=1, top_k=3), dict(scaling_factor=0.0),
    dict(bias_E=torch.zeros(7)),
])
def test_validation(device, bad):
    kw = dict(top_k=2)
    kw.update(bad)
    top_k = kw.pop("top_k")
    with pytest.raises(ValueError):
        route_topk(torch.randn(3, 8, device=device), top_k, **kw)
    with pytest.raises(ValueError):
        route_topk_ref(torch.randn(3, 8), top_k, **kw)


ROUTER_CONFIGS = [
    dict(num_experts=8, top_k=2),
    dict(num_experts=60, top_k=4, norm_topk_prob=False),
    dict(num_experts=32, top_k=4, topk_before_softmax=True),
    dict(num_experts=16, top_k=3, router="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
         score_correction_bias=True),
    dict(num_experts=8, top_k=2, router="sigmoid", norm_topk_prob=False),
]


@pytest.mark.parametrize("cfg", ROUTER_CONFIGS)
def test_matches_moekit_router(device, cfg):
    """route_topk with the arguments a MoEConfig implies == moekit.router.TopKRouter."""
    router_mod = pytest.importorskip("moekit.router")
    from moekit import MoEConfig

    config = MoEConfig(hidden_size=16, ffn_hidden_size=8, **cfg)
    router = router_mod.TopKRouter(config)
    if config.score_correction_bias:
        router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(37, 16)
    r = router(x)
    if config.router == "softmax":
        score_func = "softmax_topk" if config.topk_before_softmax else "softmax"
    else:
        score_func = "sigmoid"
    ids, w, counts = route_topk(r.logits_TE.detach().to(device), config.top_k, score_func=score_func,
                                bias_E=None if router.e_score_correction_bias is None
                                else router.e_score_correction_bias.to(device),
                                n_group=config.n_group, topk_group=config.topk_group,
                                renormalize=config.norm_topk_prob, scaling_factor=config.routed_scaling_factor)
    assert torch.equal(ids.cpu().long(), r.topk_ids_TK)
    assert_rel_close(w, r.topk_weights_TK, 1e-6)
    assert torch.equal(counts.cpu().long(), r.tokens_per_expert_E)
