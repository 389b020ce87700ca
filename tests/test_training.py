"""MoELayer the way people train: activation checkpointing (both kinds, and transformers'
``gradient_checkpointing_enable()`` on a patched model), loss scaling (GradScaler, ``loss * c``),
gradient accumulation, grads that outlive the model, ``torch.compile``.

Shapes follow the issue's report: D=256, F=128 (so 2F = D: buffers of [N, 2F] and [N, D]
have the same size) and >= 1k tokens per step.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import moekit
from moekit import MoEConfig, MoELayer

D, F_, E, K, T = 256, 128, 8, 2, 1024
BACKENDS = ["loop", "cpu", "grouped_mm"]


class Block(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.moe = MoELayer(cfg)

    def forward(self, x):
        return x + self.moe(self.norm(x))


class Stack(nn.Module):
    """Two MoE blocks, optionally checkpointed (``"reentrant"`` / ``"non_reentrant"``)."""

    def __init__(self, cfg: MoEConfig, ckpt: str | None = None):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg), Block(cfg)])
        self.head = nn.Linear(cfg.hidden_size, 16)
        self.ckpt = ckpt

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if self.ckpt is None else checkpoint(b, x, use_reentrant=self.ckpt == "reentrant")
        return self.head(x)


def _cfg(backend, **kw):
    return MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K, backend=backend,
                     aux_loss_coef=0.01, z_loss_coef=1e-3, **kw)


def _models(backend, ckpt):
    torch.manual_seed(0)
    ref = Stack(_cfg(backend))
    for m in ref.modules():
        if isinstance(m, MoELayer):
            with torch.no_grad():
                m.router.weight.normal_(0, D ** -0.5)
    other = copy.deepcopy(ref)
    other.ckpt = ckpt
    return ref, other


def _batches(n, tokens=T, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(tokens, D, generator=g), torch.randint(0, 16, (tokens,), generator=g)) for _ in range(n)]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ckpt", ["reentrant", "non_reentrant"])
def test_checkpointing_gives_the_reference_grads_every_step(backend, ckpt):
    ref, model = _models(backend, ckpt)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (ref, model)]
    for step, (x, y) in enumerate(_batches(3)):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            _loss(m, x.clone().requires_grad_(), y).backward()
        for (n, p), q in zip(ref.named_parameters(), model.parameters()):
            assert q.grad is not None, n
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=f"step {step}: {n}")
        for opt in opts:
            opt.step()
    for p, q in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_hf_gradient_checkpointing_enable_on_patched_model(tmp_path):
    """The issue's report: OLMoE patched, ``gradient_checkpointing_enable()`` (non-reentrant),
    1k tokens: every grad equals the unpatched HF model's, over several steps."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    import moekit.hf as H

    cfg = transformers.OlmoeConfig(vocab_size=101, hidden_size=D, intermediate_size=F_, num_experts=E,
                                   num_experts_per_tok=K, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, max_position_embeddings=512, norm_topk_prob=False,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.OlmoeForCausalLM(cfg).save_pretrained(tmp_path)
    hf_model = transformers.OlmoeForCausalLM.from_pretrained(tmp_path)
    patched = H.patch_model(transformers.OlmoeForCausalLM.from_pretrained(tmp_path))
    assert sum(1 for _ in moekit.moe_layers(patched)) == 2
    for m in (hf_model, patched):
        m.train()
        m.gradient_checkpointing_enable()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (hf_model, patched)]
    g = torch.Generator().manual_seed(2)
    for step in range(3):
        ids = torch.randint(0, 101, (4, 256), generator=g)  # 1024 tokens
        for m, opt in zip((hf_model, patched), opts):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
        hp, pp = dict(hf_model.named_parameters()), dict(patched.named_parameters())
        for name, p in hp.items():
            q = pp.get(name)
            if q is None:  # expert/router tensors live under moekit names in the patched model
                continue
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        for (hn, hblock), (_, layer) in zip(
                [(n, m) for n, m in hf_model.named_modules() if type(m).__name__ == "OlmoeSparseMoeBlock"],
                moekit.moe_layers(patched)):
            for key, ref_grad in ((f"{hn}.experts.gate_up_proj", layer.experts.w_in.grad),
                                  (f"{hn}.experts.down_proj", layer.experts.w_out.grad),
                                  (f"{hn}.gate.weight", layer.router.weight.grad)):
                torch.testing.assert_close(ref_grad, hp[key].grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {key}")
        for opt in opts:
            opt.step()


# ---- loss scaling and accumulation -------------------------------------------------------------

def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["loop", "cpu"])
def test_loss_times_c_scales_every_grad_by_c(backend):
    ref, model = _models(backend, None)
    (x, y), = _batches(1, tokens=300)
    _loss(ref, x, y).backward()
    c = 8.0  # a power of two: every scaled product is exact, so the grads must be exactly c x
    moekit.set_aux_loss_scale(model, c)
    (c * _loss(model, x, y)).backward()
    for n, g in _grads(ref).items():
        torch.testing.assert_close(model.get_parameter(n).grad, c * g, rtol=1e-6, atol=0, msg=n)
    router = dict(model.named_parameters())["blocks.0.moe.router.weight"]
    assert router.grad.abs().sum() > 0


def test_grad_scaler_behaves_as_if_aux_loss_were_in_the_loss():
    ref, model = _models("cpu", None)
    (x, y), = _batches(1, tokens=300)
    _loss(ref, x, y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    loss = scaler.scale(_loss(model, x, y))
    moekit.set_aux_loss_scale(model, scaler.get_scale())
    loss.backward()
    scaler.unscale_(opt)
    for n, g in _grads(ref).items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-7, msg=n)


def test_without_the_scale_the_router_grad_is_wrong():
    """The failure the scale fixes: loss * 10 without telling moekit gives a router grad that
    is not 10x (the aux/z part stays 1x). Guards the test above against a vacuous pass."""
    ref, model = _models("cpu", None)
    (x, y), = _batches(1, tokens=300)
    _loss(ref, x, y).backward()
    (10.0 * _loss(model, x, y)).backward()
    n = "blocks.0.moe.router.weight"
    ratio = model.get_parameter(n).grad.norm() / ref.get_parameter(n).grad.norm()
    assert abs(ratio - 10.0) > 0.1


def test_accumulation_over_micro_batches():
    """``(loss / N).backward()`` per micro-batch with the scale 1/N gives (a) exactly the sum of
    the micro-batches' own (loss + aux) grads over N, and (b) with only token-linear losses
    (z-loss), the grads of one batch of all the tokens."""
    N = 4
    batches = _batches(N, tokens=256)
    ref, model = _models("cpu", None)
    total = {}
    for x, y in batches:  # (a) reference: each micro-batch alone, unscaled
        ref.zero_grad()
        _loss(ref, x, y).backward()
        for n, g in _grads(ref).items():
            total[n] = total.get(n, 0) + g / N
    moekit.set_aux_loss_scale(model, 1.0 / N)
    for x, y in batches:
        (_loss(model, x, y) / N).backward()
    for n, g in total.items():
        torch.testing.assert_close(model.get_parameter(n).grad, g, rtol=1e-5, atol=1e-7, msg=n)

    torch.manual_seed(0)  # (b) z-loss only: one batch == accumulated micro-batches
    one = Stack(MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K, z_loss_coef=1e-2))
    acc = copy.deepcopy(one)
    x_all = torch.cat([x for x, _ in batches])
    y_all = torch.cat([y for _, y in batches])
    _loss(one, x_all, y_all).backward()
    moekit.set_aux_loss_scale(acc, 1.0 / N)
    for x, y in batches:
        (_loss(acc, x, y) / N).backward()
    for n, g in _grads(one).items():
        torch.testing.assert_close(acc.get_parameter(n).grad, g, rtol=1e-4, atol=1e-7, msg=n)


def test_set_aux_loss_scale_errors():
    model = Stack(MoEConfig.preset("debug"))
    for bad in (float("nan"), -1.0, "2", torch.ones(2)):
        with pytest.raises(ValueError, match="scale"):
            moekit.set_aux_loss_scale(model, bad)
    with pytest.raises(ValueError, match="no MoELayer"):
        moekit.set_aux_loss_scale(nn.Linear(2, 2), 1.0)


# ---- lifetimes ---------------------------------------------------------------------------------

def test_grads_outlive_the_model_and_the_process_exits_cleanly():
    code = textwrap.dedent("""
        import gc, torch, moekit
        cfg = moekit.MoEConfig(hidden_size=256, ffn_hidden_size=128, num_experts=8, top_k=2)
        layer = moekit.MoELayer(cfg)
        layer(torch.randn(1024, 256)).square().mean().backward()
        kept = [layer.experts.w_in.grad, layer.experts.w_out.grad]
        del layer; gc.collect()
        print(float(sum(g.abs().sum() for g in kept)) > 0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


# ---- torch.compile ------------------------------------------------------------------------------

def test_torch_compile_matches_eager():
    torch._dynamo.reset()
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=4, top_k=2, aux_loss_coef=0.01)
    torch.manual_seed(0)
    eager = Stack(cfg)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x = torch.randn(40, 32)
    y = torch.randint(0, 16, (40,))
    out_e = eager(x)
    out_c = compiled(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    nn.functional.cross_entropy(out_e, y).backward()
    nn.functional.cross_entropy(out_c, y).backward()
    for (n, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
