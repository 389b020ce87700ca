"""moekit.hf: HF MoE blocks <-> MoELayer, patched models match HF exactly (fp32, CPU).

Every model is built from a small config with odd sizes (D=72, F=40, E=12, K=3), random
weights (router std 0.5 so many experts win), saved with ``save_pretrained`` and loaded back
with ``from_pretrained`` (the real loading path, Hub key layout included).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

# moekit.hf targets the transformers 5.x module layout (fused experts, hook-recorded router logits)
transformers = pytest.importorskip("transformers", minversion="5.0")

from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit import hf as H  # noqa: E402

V, D, F_, E, K = 97, 72, 40, 12, 3
B, S = 2, 11
TOL = 1e-5
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def make_config(family: str, **over):
    T = transformers
    common = dict(vocab_size=V, hidden_size=D, num_attention_heads=4, max_position_embeddings=64,
                  initializer_range=0.15, tie_word_embeddings=False, attention_dropout=0.0)
    if family == "mixtral":
        c = T.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=F_, num_local_experts=E,
                            num_experts_per_tok=K, num_hidden_layers=2, router_aux_loss_coef=0.05)
    elif family == "qwen2_moe":  # MoE layers: (i+1) % 1 == 0 and i not in [1] -> 0, 2, 3
        c = T.Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=56, moe_intermediate_size=F_,
                             shared_expert_intermediate_size=48, num_experts=E, num_experts_per_tok=K,
                             num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[1],
                             norm_topk_prob=False, router_aux_loss_coef=0.05)
    elif family == "qwen3_moe":  # MoE layers: (i+1) % 2 == 0 -> 1, 3
        c = T.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=18, intermediate_size=56,
                             moe_intermediate_size=F_, num_experts=E, num_experts_per_tok=K, num_hidden_layers=4,
                             decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True,
                             router_aux_loss_coef=0.05)
    elif family == "olmoe":
        c = T.OlmoeConfig(**common, num_key_value_heads=2, intermediate_size=F_, num_experts=E,
                          num_experts_per_tok=K, num_hidden_layers=2, norm_topk_prob=False,
                          router_aux_loss_coef=0.05)
    elif family == "deepseek_v3":  # MoE layers: i >= first_k_dense_replace=1 -> 1, 2
        c = T.DeepseekV3Config(**common, num_key_value_heads=4, intermediate_size=56, moe_intermediate_size=F_,
                               n_routed_experts=E, num_experts_per_tok=K, n_group=4, topk_group=2,
                               first_k_dense_replace=1, num_hidden_layers=3, n_shared_experts=1,
                               routed_scaling_factor=2.5, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24,
                               qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    else:
        raise AssertionError(family)
    for k, v in over.items():
        setattr(c, k, v)
    return c


EXPECTED_MOE_LAYERS = {"mixtral": [0, 1], "qwen2_moe": [0, 2, 3], "qwen3_moe": [1, 3], "olmoe": [0, 1],
                       "deepseek_v3": [1, 2]}


def build(family: str, tmp_dir, seed: int = 0, experts_implementation=None, **over):
    """Random HF model -> save_pretrained -> from_pretrained (fp32, eval). HF's default experts
    implementation in 5.x is grouped_mm; ``experts_implementation="eager"`` loads the
    reference per-expert loop of the modeling file instead."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family, **over))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
    model.save_pretrained(tmp_dir)
    extra = {"experts_implementation": experts_implementation} if experts_implementation else {}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_dir, dtype=torch.float32, **extra)
    if experts_implementation:
        assert loaded.config._experts_implementation == experts_implementation
    return loaded.eval()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add sync overhead, and on a loaded 2-core
    box OpenMP spinning made this file 10-100x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_CACHE: dict[tuple, nn.Module] = {}


@pytest.fixture(scope="session")
def get_model(tmp_path_factory):
    """get_model(family, **config_overrides) -> a cached loaded HF model (deep-copy before changing it)."""
    def get(family, **over):
        key = (family, tuple(sorted(over.items())))
        if key not in _CACHE:
            _CACHE[key] = build(family, tmp_path_factory.mktemp(family), **over)
        return _CACHE[key]
    return get


@pytest.fixture
def hf_model(request, get_model):
    return get_model(request.param)


def ids_and_labels(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def moe_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]


def grad_of_hf_param(patched: nn.Module, name: str) -> torch.Tensor:
    """The patched model's gradient for the HF parameter ``name``, mapped by hand (not through
    moekit.hf) from MoELayer's layout: gate.weight <- router.weight, gate_up_proj <- w_in,
    down_proj <- w_out, shared gate/up_proj <- w_in rows [:S] / [S:], down_proj <- w_out."""
    for prefix, layer in moe_layers(patched):
        if not name.startswith(prefix + "."):
            continue
        rest = name[len(prefix) + 1:]
        S = layer.config.shared_hidden
        table = {
            "gate.weight": lambda: layer.router.weight.grad,
            "experts.gate_up_proj": lambda: layer.experts.w_in.grad,
            "experts.down_proj": lambda: layer.experts.w_out.grad,
            "shared_expert_gate.weight": lambda: layer.shared_expert_gate.weight.grad,
        }
        for shared in ("shared_expert", "shared_experts"):
            table[f"{shared}.gate_proj.weight"] = lambda: layer.shared_expert.w_in.grad[:S]
            table[f"{shared}.up_proj.weight"] = lambda: layer.shared_expert.w_in.grad[S:]
            table[f"{shared}.down_proj.weight"] = lambda: layer.shared_expert.w_out.grad
        return table[rest]()
    return patched.get_parameter(name).grad


# ---- whole models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hf_model", FAMILIES, indirect=True)
def test_patched_logits_match(hf_model):
    family = H.hf_family(next(m for m in hf_model.modules() if H.hf_family(m)))
    patched = H.patch_model(copy.deepcopy(hf_model))
    layers = patched.model.layers
    moe_idx = [i for i, l in enumerate(layers) if isinstance(l.mlp, MoELayer)]
    assert moe_idx == EXPECTED_MOE_LAYERS[family]
    for i, l in enumerate(layers):  # dense layers are untouched HF modules
        if i not in moe_idx:
            assert type(l.mlp) is type(hf_model.model.layers[i].mlp)
    ids, _ = ids_and_labels()
    # KV-cached greedy decoding (T = B tokens per step) gives the same tokens
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids, **gen), hf_model.generate(ids, **gen))
    with torch.no_grad():
        ref = hf_model(ids).logits
        out = patched(ids).logits
    err = rel(out, ref)
    assert err <= TOL, f"{family}: logits rel err {err:.3g}"
    # routing is non-trivial: many experts get tokens in every MoE layer
    for _, layer in moe_layers(patched):
        assert int((layer.tokens_per_expert > 0).sum()) >= 6
    # the comparison can fail: a 0.1% change to the busiest expert of the last layer shows
    name, layer = moe_layers(patched)[-1]
    busiest = int(layer.tokens_per_expert.argmax())
    with torch.no_grad():
        layer.experts.w_out[busiest] *= 1.001
        assert rel(patched(ids).logits, ref) > 10 * TOL


def test_patched_loop_backend_matches(get_model):
    hf_model = get_model("qwen2_moe")
    patched = H.patch_model(copy.deepcopy(hf_model), backend="loop")
    assert all(l.config.backend == "loop" for _, l in moe_layers(patched))
    ids, _ = ids_and_labels()
    with torch.no_grad():
        assert rel(patched(ids).logits, hf_model(ids).logits) <= TOL


@pytest.mark.parametrize("hf_model", FAMILIES, indirect=True)
def test_patched_grads_match(hf_model):
    """Train mode: loss (CE + HF's router aux loss over the recorded router logits) -> every
    parameter's grad matches the HF model's; router logits and aux loss match too."""
    ref_model = copy.deepcopy(hf_model).train()
    ids, labels = ids_and_labels(2)
    kw = dict(labels=labels, output_router_logits=True)
    with torch.no_grad():  # HF installs its router-logit hooks now; patching afterwards must still record
        ref_model(ids, **kw)
    patched = H.patch_model(copy.deepcopy(ref_model)).train()
    out_ref = ref_model(ids, **kw)
    out = patched(ids, **kw)
    n_moe = len(moe_layers(patched))
    assert len(out.router_logits) == len(out_ref.router_logits) == n_moe
    for a, b in zip(out.router_logits, out_ref.router_logits):
        assert rel(a.float(), b.float()) <= TOL
    if out_ref.aux_loss is not None:
        assert out.aux_loss is not None
        assert abs(out.aux_loss.item() - out_ref.aux_loss.item()) <= TOL * out_ref.aux_loss.item()
    assert abs(out.loss.item() - out_ref.loss.item()) <= TOL * out_ref.loss.item()
    out_ref.loss.backward()
    out.loss.backward()
    checked = 0
    for name, p in ref_model.named_parameters():
        g_ref = p.grad
        g = grad_of_hf_param(patched, name)
        assert g_ref is not None and g is not None, name
        assert g.shape == g_ref.shape, name
        if g_ref.abs().max() == 0:  # e.g. embedding rows of unused tokens are exactly zero
            assert g.abs().max() == 0, name
        else:
            err = rel(g, g_ref)
            assert err <= TOL, f"{name}: grad rel err {err:.3g}"
        checked += 1
    assert checked == len(list(ref_model.parameters()))
    # the router got a gradient from the aux loss through the recorded logits (when HF has one)
    layer = moe_layers(patched)[0][1]
    assert layer.router.weight.grad.abs().max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_matches_hf_eager_experts(family, get_model):
    """Against HF's eager experts loop (the modeling file's reference formula): logits in eval,
    loss and every grad in train mode."""
    hf_model = get_model(family, experts_implementation="eager")
    patched = H.patch_model(copy.deepcopy(hf_model))
    ids, labels = ids_and_labels(6)
    with torch.no_grad():
        assert rel(patched(ids).logits, hf_model(ids).logits) <= TOL
    ref = copy.deepcopy(hf_model).train()
    patched.train()
    ref(ids, labels=labels, output_router_logits=True).loss.backward()
    patched(ids, labels=labels, output_router_logits=True).loss.backward()
    for name, p in ref.named_parameters():
        if p.grad.abs().max() > 0:
            assert rel(grad_of_hf_param(patched, name), p.grad) <= TOL, name


def test_mixtral_jitter_matches_in_training(get_model):
    """With router_jitter_noise > 0 in train mode, HF and moekit draw the same uniform noise
    from the same RNG state (same element count and order), so the outputs match exactly."""
    hf_model = copy.deepcopy(get_model("mixtral", router_jitter_noise=0.2))
    patched = H.patch_model(copy.deepcopy(hf_model))
    assert all(l.config.router_jitter == pytest.approx(0.2) for _, l in moe_layers(patched))
    ids, labels = ids_and_labels(3)
    hf_model.train(), patched.train()
    torch.manual_seed(123)
    ref = hf_model(ids, labels=labels)
    torch.manual_seed(123)
    out = patched(ids, labels=labels)
    assert rel(out.logits, ref.logits) <= TOL
    torch.manual_seed(7)  # different noise: different logits (the jitter is really applied)
    assert rel(patched(ids).logits, ref.logits) > 10 * TOL
    with torch.no_grad():  # eval: no jitter
        hf_model.eval(), patched.eval()
        assert rel(patched(ids).logits, hf_model(ids).logits) <= TOL


@pytest.mark.parametrize("hf_model", FAMILIES, indirect=True)
def test_export_round_trip(hf_model, tmp_path):
    """patch -> train a few steps -> save as an HF checkpoint -> fresh from_pretrained gives the
    patched model's logits; unpatch_model and export_state_dict agree."""
    patched = H.patch_model(copy.deepcopy(hf_model)).train()
    opt = torch.optim.Adam(patched.parameters(), lr=1e-2)
    for step in range(3):
        ids, labels = ids_and_labels(10 + step)
        opt.zero_grad()
        patched(ids, labels=labels).loss.backward()
        opt.step()
    patched.eval()
    ids, _ = ids_and_labels(4)
    with torch.no_grad():
        want = patched(ids).logits
        before = hf_model(ids).logits
    assert rel(want, before) > 1e-3  # training changed the model
    H.save_pretrained(patched, tmp_path)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not moe_layers(fresh)
    with torch.no_grad():
        assert rel(fresh(ids).logits, want) <= TOL
    # export_state_dict loads strictly into the un-patched class
    sd = H.export_state_dict(patched)
    blank = type(hf_model)(hf_model.config).eval()
    blank.load_state_dict(sd, strict=True)
    with torch.no_grad():
        assert rel(blank(ids).logits, want) <= TOL
    # unpatch_model puts HF blocks holding the trained weights back
    back = H.unpatch_model(copy.deepcopy(patched))
    assert not moe_layers(back)
    assert [type(l.mlp) for l in back.model.layers] == [type(l.mlp) for l in hf_model.model.layers]
    with torch.no_grad():
        assert rel(back(ids).logits, want) <= TOL


# ---- single blocks -------------------------------------------------------------------------------

def first_block(model):
    return next(m for m in model.modules() if H.hf_family(m) is not None)


def block_input(seed=5, shape=(3, 7, D)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hf_model", FAMILIES, indirect=True)
def test_from_hf_block_and_to_hf(hf_model):
    block = copy.deepcopy(first_block(hf_model)).eval()
    x = block_input()
    layer = H.from_hf(block).eval()
    assert isinstance(layer, MoELayer) and layer.hf_spec.experts_layout == "fused"
    with torch.no_grad():
        ref = block(x)
        out = layer(x)
    assert out.shape == ref.shape and rel(out, ref) <= TOL
    assert int((layer.tokens_per_expert > 0).sum()) >= 6
    # to_hf writes changed weights back into (another copy of) the block
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if layer.router.e_score_correction_bias is not None:
            layer.router.e_score_correction_bias.add_(0.05)
    other = H.to_hf(layer, copy.deepcopy(block))
    with torch.no_grad():
        new = layer(x)
        assert rel(new, ref) > 1e-3
        assert rel(other(x), new) <= TOL


def test_from_hf_matches_grads_of_a_block(get_model):
    hf_model = get_model("deepseek_v3")
    block = copy.deepcopy(first_block(hf_model)).train()
    layer = H.from_hf(block)
    assert layer.training
    x1 = block_input(6).requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    w = block_input(7)
    (block(x1) * w).sum().backward()
    (layer(x2) * w).sum().backward()
    assert rel(x2.grad, x1.grad) <= TOL
    assert rel(layer.router.weight.grad, block.gate.weight.grad) <= TOL
    assert rel(layer.experts.w_in.grad, block.experts.gate_up_proj.grad) <= TOL
    assert rel(layer.experts.w_out.grad, block.experts.down_proj.grad) <= TOL
    sg = torch.cat([block.shared_experts.gate_proj.weight.grad, block.shared_experts.up_proj.weight.grad])
    assert rel(layer.shared_expert.w_in.grad, sg) <= TOL


def test_config_mapping(get_model):
    c = H.from_hf(first_block(get_model("deepseek_v3"))).config
    assert (c.router, c.n_group, c.topk_group, c.top_k, c.routed_scaling_factor, c.norm_topk_prob,
            c.score_correction_bias, c.shared_hidden, c.shared_expert_gate) == \
        ("sigmoid", 4, 2, K, 2.5, True, True, F_, False)
    c = H.from_hf(first_block(get_model("qwen2_moe"))).config
    assert (c.router, c.norm_topk_prob, c.shared_hidden, c.shared_expert_gate, c.ffn_hidden_size) == \
        ("softmax", False, 48, True, F_)
    c = H.from_hf(first_block(get_model("mixtral", router_jitter_noise=0.2))).config
    assert (c.norm_topk_prob, c.router_jitter, c.num_experts, c.activation) == (True, 0.2, E, "swiglu")


def test_config_overrides_bias_update(get_model, tmp_path):
    """config_overrides turns on DeepSeek's aux-loss-free bias update on the patched model;
    the updated correction bias is exported with the weights."""
    from moekit import register_bias_update_hook

    model = H.patch_model(copy.deepcopy(get_model("deepseek_v3")), config_overrides={"bias_update_rate": 1e-2})
    layer = model.model.layers[1].mlp
    assert layer.config.bias_update_rate == 1e-2 and layer.config.n_group == 4
    bias0 = layer.router.e_score_correction_bias.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    register_bias_update_hook(opt, model)
    ids, labels = ids_and_labels(20)
    model.train()
    model(ids, labels=labels).loss.backward()
    load = layer.expert_load.clone().float()
    assert load.sum() == B * S * K
    opt.step()
    step = layer.router.e_score_correction_bias - bias0
    torch.testing.assert_close(step, 1e-2 * torch.sign(load.mean() - load))
    assert step.abs().max() > 0
    H.save_pretrained(model.eval(), tmp_path)
    fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(fresh.model.layers[1].mlp.gate.e_score_correction_bias,
                               layer.router.e_score_correction_bias, rtol=0, atol=0)
    with torch.no_grad():
        assert rel(fresh(ids).logits, model(ids).logits) <= TOL
    for bad in ({"top_k": 2}, {"norm_topk_prob": False}, {"n_group": 1}, {"no_such_field": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            H.from_hf(first_block(get_model("deepseek_v3")), config_overrides=bad)


# ---- share_weights -----------------------------------------------------------------------------

def _storage_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() == sb.data_ptr()


@pytest.mark.parametrize("share", [True, False])
def test_share_weights(share, get_model):
    hf_model = get_model("qwen2_moe")
    block = copy.deepcopy(first_block(hf_model)).eval()
    x = block_input(8)
    layer = H.from_hf(block, share_weights=share).eval()
    pairs = [(layer.router.weight, block.gate.weight), (layer.experts.w_in, block.experts.gate_up_proj),
             (layer.experts.w_out, block.experts.down_proj),
             (layer.shared_expert.w_out, block.shared_expert.down_proj.weight),
             (layer.shared_expert_gate.weight, block.shared_expert_gate.weight),
             (layer.shared_expert.w_in, block.shared_expert.gate_proj.weight),
             (layer.shared_expert.w_in, block.shared_expert.up_proj.weight)]
    for i, (a, b) in enumerate(pairs):
        assert _storage_overlaps(a, b) == share, i
        if i < 5:
            assert (a is b) == share, i
    # an optimizer step on the layer is seen by the block iff shared
    with torch.no_grad():
        before = block(x)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        after_block, after_layer = block(x), layer(x)
    assert rel(after_layer, before) > 1e-3
    if share:
        assert rel(after_block, after_layer) <= TOL
    else:
        assert torch.equal(after_block, before)


def test_patch_model_share_weights_keeps_hf_parameters(get_model):
    hf_model = get_model("deepseek_v3")
    model = copy.deepcopy(hf_model)
    block = model.model.layers[1].mlp
    keep_alive = list(model.parameters())  # so no id() below is reused by a new object
    hf_params = {id(p) for p in keep_alive}
    H.patch_model(model, share_weights=True)
    layer = model.model.layers[1].mlp
    assert isinstance(layer, MoELayer)
    assert layer.router.weight is block.gate.weight and layer.experts.w_in is block.experts.gate_up_proj
    assert layer.router.e_score_correction_bias is block.gate.e_score_correction_bias
    # every tensor of the patched model is an HF tensor, except the stacked shared w_in (its HF
    # halves are views into it)
    new = [n for n, p in model.named_parameters() if id(p) not in hf_params]
    assert sorted(new) == ["model.layers.1.mlp.shared_expert.w_in", "model.layers.2.mlp.shared_expert.w_in"]
    assert _storage_overlaps(layer.shared_expert.w_in, block.shared_experts.up_proj.weight)


def test_dtype_device_and_idempotent_patch(get_model):
    block = copy.deepcopy(first_block(get_model("deepseek_v3"))).to(torch.bfloat16)
    layer = H.from_hf(block)
    assert layer.experts.w_in.dtype == layer.router.weight.dtype == layer.shared_expert.w_in.dtype == torch.bfloat16
    assert layer.router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(layer.router.e_score_correction_bias, block.gate.e_score_correction_bias.float())
    y = layer(block_input().to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    model = H.patch_model(copy.deepcopy(get_model("olmoe")))
    layers = [id(m) for _, m in moe_layers(model)]
    assert H.patch_model(model) is model and [id(m) for _, m in moe_layers(model)] == layers


# ---- older layouts: per-expert ModuleList, Linear router, tuple-returning blocks -------------------

class _Expert(nn.Module):
    def __init__(self, names, gate, up, down):
        super().__init__()
        g, u, d = names
        for n, w in ((g, gate), (u, up), (d, down)):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight = nn.Parameter(w.detach().clone())
            setattr(self, n, lin)
        self.names = names
        self.act_fn = nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


def legacy_block(v5_block, names):
    """A transformers-4.x-style block of the v5 block's family: Linear router, ModuleList
    experts with per-expert Linear layers, forward returning (hidden, router_logits)."""
    base = type(v5_block)

    class Legacy(base):
        def __init__(self, src):
            nn.Module.__init__(self)
            self.top_k = src.gate.top_k
            self.norm_topk_prob = getattr(src.gate, "norm_topk_prob", True)
            self.jitter_noise = getattr(src, "jitter_noise", 0.0)
            self.gate = nn.Linear(D, E, bias=False)
            self.gate.weight = nn.Parameter(src.gate.weight.detach().clone())
            Fh = src.experts.down_proj.shape[-1]
            gu, dn = src.experts.gate_up_proj, src.experts.down_proj
            self.experts = nn.ModuleList(_Expert(names, gu[e, :Fh], gu[e, Fh:], dn[e]) for e in range(E))

        def forward(self, h):
            x = h.reshape(-1, D)
            logits = self.gate(x)
            p = logits.softmax(-1, dtype=torch.float)
            w, idx = p.topk(self.top_k, -1)
            if self.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
            y = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for j in range(self.top_k):
                    y[t] += w[t, j] * self.experts[int(idx[t, j])](x[t])
            return y.view_as(h), logits

    return Legacy(v5_block)


class _Caller(nn.Module):
    """A decoder-layer stand-in that unpacks (hidden, router_logits) like transformers 4.x."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, h):
        y, logits = self.mlp(h)
        return h + y, logits


@pytest.mark.parametrize("family,names", [("mixtral", ("w1", "w3", "w2")),
                                          ("olmoe", ("gate_proj", "up_proj", "down_proj"))])
def test_legacy_modulelist_block(family, names, get_model):
    v5 = first_block(get_model(family)).eval()
    legacy = legacy_block(v5, names).eval()
    x = block_input(9, (2, 5, D))
    with torch.no_grad():
        ref_y, ref_logits = legacy(x)
        assert rel(ref_y, v5(x)) <= TOL  # the stand-in is faithful
    layer = H.from_hf(legacy).eval()
    assert layer.hf_spec.experts_layout == ("w123" if names[0] == "w1" else "gate_up_down")
    with torch.no_grad():
        assert rel(layer(x), ref_y) <= TOL
    # patch_model wraps the layer so the caller still gets (hidden, router_logits)
    caller = _Caller(legacy_block(v5, names)).eval()
    H.patch_model(caller)
    assert isinstance(caller.mlp, H.HFMoEAdapter) and caller.mlp.moe.hf_spec.returns_tuple
    with torch.no_grad():
        y, logits = caller(x)
    assert rel(y, x + ref_y) <= TOL and rel(logits, ref_logits) <= TOL
    # export writes the per-expert layout back; share_weights views the per-expert Linears
    sd = H.export_state_dict(caller)
    assert f"mlp.experts.{E - 1}.{names[2]}.weight" in sd and "mlp.gate.weight" in sd
    fresh = _Caller(legacy_block(v5, names))
    fresh.load_state_dict(sd, strict=True)
    shared_src = legacy_block(v5, names)
    shared = H.from_hf(shared_src, share_weights=True)
    assert _storage_overlaps(shared.experts.w_in, shared_src.experts[3].get_submodule(names[1]).weight)
    with torch.no_grad():
        shared.experts.w_out[3].zero_()
    assert shared_src.experts[3].get_submodule(names[2]).weight.abs().max() == 0


# ---- errors -------------------------------------------------------------------------------------

def test_unsupported_blocks_raise(get_model):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
    from transformers.models.phimoe.modeling_phimoe import PhimoeSparseMoeBlock

    gpt = GptOssMLP(transformers.GptOssConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                                              num_experts_per_tok=K))
    with pytest.raises(NotImplementedError, match="GptOssMLP"):
        H.from_hf(gpt)
    with pytest.raises(NotImplementedError, match="GptOssMLP"):
        H.patch_model(_Caller(gpt))
    phi = PhimoeSparseMoeBlock(transformers.PhimoeConfig(hidden_size=D, intermediate_size=F_, num_local_experts=E,
                                                         num_experts_per_tok=2))
    with pytest.raises(TypeError, match="PhimoeSparseMoeBlock"):
        H.from_hf(phi)
    with pytest.raises(TypeError, match="PhimoeSparseMoeBlock"):
        H.patch_model(_Caller(phi))
    with pytest.raises(TypeError, match="Linear"):
        H.from_hf(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no Hugging Face MoE block"):
        H.patch_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="hidden_size"):
        H.to_hf(MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=4, num_experts=4, top_k=2)),
                first_block(get_model("olmoe")))


def test_to_hf_rejects_mismatched_block(get_model):
    layer = H.from_hf(first_block(get_model("olmoe")))
    with pytest.raises(ValueError, match="shared_hidden|router|norm_topk_prob"):
        H.to_hf(layer, first_block(get_model("deepseek_v3")))


