"""The dispatch -> experts -> combine seam, tested apart and together.

Experts: every CPU-runnable backend (``cpu`` in each schedule, ``grouped_mm``) against the
``loop`` reference on rows sorted by expert (the Triton entry is tested in tests/kernels).
Dispatcher: exact permutation, exact weighted combine, deterministic backward.
"""
from __future__ import annotations

import pytest
import torch

import moekit.experts.cpu as cpu
from moekit import MoEConfig, MoELayer
from moekit.dispatch import LocalDispatcher
from moekit.experts import BACKENDS, GroupedExperts, resolve_backend
from moekit.router import Routing


def _rows(counts, D, F, activation="swiglu", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    E, N = len(counts), sum(counts)
    H = 2 * F if activation in ("swiglu", "geglu") else F
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w_in = (torch.randn(E, H, D, generator=g, dtype=torch.float64) * D ** -0.5).to(dtype)
    w_out = (torch.randn(E, D, F, generator=g, dtype=torch.float64) * F ** -0.5).to(dtype)
    return x, torch.tensor(counts, dtype=torch.long), w_in, w_out


def _run(backend, x, counts, w_in, w_out, activation):
    leaves = [t.clone().requires_grad_(True) for t in (x, w_in, w_out)]
    y = BACKENDS[backend](leaves[0], counts, leaves[1], leaves[2], activation)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(grad)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [y.detach()] + grads


@pytest.fixture(params=["workers2", "workers3", "inline"])
def schedule(request, monkeypatch):
    threads = torch.get_num_threads()
    if request.param == "inline":
        monkeypatch.setattr(cpu, "INLINE_MIN_MACS", 0)
    else:
        monkeypatch.setattr(cpu, "INLINE_MIN_MACS", 1 << 62)
        torch.set_num_threads(int(request.param[-1]))
    yield request.param
    torch.set_num_threads(threads)


CASES = [
    ([5, 9, 0, 13, 4, 7, 1], 24, 20, "swiglu"),
    ([40, 3, 11, 0, 6], 17, 11, "geglu"),
    ([0, 0, 50, 0], 16, 12, "relu"),   # every row on one expert, three experts empty
    ([1, 0, 0, 0, 0, 0], 24, 20, "swiglu"),  # a single row (T=1, K=1)
    ([3, 2, 4], 8, 6, "gelu"),
    ([3, 2, 4], 12, 8, "gelu"),
    ([7, 7, 7], 8, 6, "silu"),
    ([0, 0, 0], 8, 6, "swiglu"),       # no rows at all
]


@pytest.mark.parametrize("counts,D,F,activation", CASES)
def test_cpu_backend_matches_loop(schedule, counts, D, F, activation):
    case = _rows(counts, D, F, activation)
    ref = _run("loop", *case, activation)
    got = _run("cpu", *case, activation)
    for name, a, b in zip(("y", "grad_x", "grad_w_in", "grad_w_out"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{schedule}: {name}")


@pytest.mark.parametrize("counts,D,F,activation", CASES)
def test_grouped_mm_backend_matches_loop(counts, D, F, activation):
    case = _rows(counts, D, F, activation, dtype=torch.float32)
    ref = _run("loop", *case, activation)
    H = case[2].shape[1]
    if any(n % 4 for n in (D, H, F)):  # fp32 rows must be 16-byte multiples
        with pytest.raises(ValueError, match="multiples of 4"):
            _run("grouped_mm", *case, activation)
        return
    got = _run("grouped_mm", *case, activation)
    for name, a, b in zip(("y", "grad_x", "grad_w_in", "grad_w_out"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_plan_parts_picks_schedule_by_expert_size(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # OLMoE-like: 256 rows x 1024 x 1024 per expert -> one range per worker
    parts = cpu.plan_parts([256] * 64, 1024, 1024)
    assert len(parts) == 2 and sum(b - a for p in parts for _, a, b in p) == 256 * 64
    # Mixtral-like: 512 rows x 1024 x 4096 -> one part, experts in order, each whole
    parts = cpu.plan_parts([512, 0, 700, 300, 512, 512, 512, 1048], 1024, 4096)
    assert parts == [[(0, 0, 512), (2, 512, 1212), (3, 1212, 1512), (4, 1512, 2024), (5, 2024, 2536),
                      (6, 2536, 3048), (7, 3048, 4096)]]
    assert cpu.plan_parts([0, 0], 8, 8) == [[]]


def test_backend_errors_are_clear():
    x, counts, w_in, w_out = _rows([2, 3], 8, 6)
    with pytest.raises(TypeError, match="grouped_mm.*float64"):
        BACKENDS["grouped_mm"](x, counts, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="backend='nope'"):
        resolve_backend("nope", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        MoEConfig.preset("debug", backend="nope")
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


# ---- double backward: exact where supported, a clear error where not --------------------------

def _second_order(backend, x, counts, w_in, w_out):
    leaves = [t.clone().requires_grad_(True) for t in (x, w_in, w_out)]
    y = BACKENDS[backend](leaves[0], counts, leaves[1], leaves[2], "swiglu")
    (gx,) = torch.autograd.grad(y.square().sum(), leaves[0], create_graph=True)
    gx.square().sum().backward()  # a gradient penalty
    return [t.grad for t in leaves]


def test_double_backward_exact_or_refused():
    case = _rows([3, 0, 5, 2], 8, 8, dtype=torch.float32)
    ref = _second_order("loop", *case)
    got = _second_order("grouped_mm", *case)
    for name, a, b in zip(("x", "w_in", "w_out"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError, match="twice|double backward|once_differentiable|doesn't support"):
        _second_order("cpu", *case)


def test_layer_gradient_penalty_on_default_cpu_path_is_refused_or_exact():
    """The issue's case: a gradient-penalty backward through the default CPU path must not
    silently differ from ``loop``."""
    cfg = MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=4, top_k=2)
    torch.manual_seed(0)
    ref_layer = MoELayer(cfg.replace(backend="loop")).double()
    layer = MoELayer(cfg).double()
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)

    def penalty(m):
        (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        gx.square().sum().backward()
        return m.experts.w_in.grad

    ref = penalty(ref_layer)
    assert ref is not None and ref.abs().sum() > 0
    with pytest.raises(RuntimeError):
        penalty(layer)


# ---- the dispatcher ----------------------------------------------------------------------------

def _routing(ids_TK, weights_TK, E):
    kept = ids_TK >= 0
    counts = torch.bincount(ids_TK[kept], minlength=E)
    T = ids_TK.shape[0]
    return Routing(ids_TK, weights_TK, torch.zeros(T, E), torch.zeros(T, E), counts,
                   num_dropped=int((~kept).sum()))


def test_dispatch_sorts_rows_by_expert_and_combine_weights_them_exactly():
    # integer-valued data: every sum below is exact, so equality is exact
    ids = torch.tensor([[2, 0], [1, 2], [2, -1], [0, 1], [-1, -1]])
    w = torch.tensor([[1., 2.], [3., 4.], [5., 0.], [6., 7.], [0., 0.]])
    x = torch.arange(5 * 3, dtype=torch.float64).view(5, 3)
    d = LocalDispatcher()
    x_ND, counts_E, ctx = d.dispatch(x, _routing(ids, w, 3))
    assert counts_E.tolist() == [2, 2, 3]
    # stable: token order within each expert
    torch.testing.assert_close(x_ND, x[[0, 3, 1, 3, 0, 1, 2]], rtol=0, atol=0)
    y = d.combine(x_ND * 10, ctx)
    expect = torch.zeros(5, 3, dtype=torch.float64)
    for t in range(5):
        for k in range(2):
            if ids[t, k] >= 0:
                expect[t] += w[t, k] * 10 * x[t]
    torch.testing.assert_close(y, expect, rtol=0, atol=0)


def test_dispatch_backward_sums_slot_grads_exactly():
    ids = torch.tensor([[1, 0, 2], [2, 1, 0], [0, 2, 1], [1, 2, -1]])
    routing = _routing(ids, torch.ones(4, 3), 3)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    x_ND, _, ctx = LocalDispatcher().dispatch(x, routing)
    g = torch.randint(-8, 8, x_ND.shape, dtype=torch.float64)
    x_ND.backward(g)
    expect = torch.zeros(4, 5, dtype=torch.float64)
    token_N = ctx.order_N // 3
    for n in range(token_N.numel()):
        expect[token_N[n]] += g[n]
    torch.testing.assert_close(x.grad, expect, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["loop", "cpu", "grouped_mm"])
def test_experts_module_and_dispatcher_together_match_token_loop(backend):
    """dispatch -> GroupedExperts -> combine equals a per-token, per-slot loop (fp64)."""
    cfg = MoEConfig(hidden_size=12, ffn_hidden_size=8, num_experts=5, top_k=2, backend=backend)
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "grouped_mm" else torch.float64
    experts = GroupedExperts(cfg).to(dtype)
    x = torch.randn(11, 12, dtype=dtype)
    ids = torch.stack([torch.randperm(5)[:2] for _ in range(11)])
    ids[3, 1] = -1
    w = torch.rand(11, 2)
    w[3, 1] = 0
    d = LocalDispatcher()
    x_ND, counts_E, ctx = d.dispatch(x, _routing(ids, w, 5))
    y = d.combine(experts(x_ND, counts_E), ctx)
    from moekit.kernels.activations import activation_ref
    expect = torch.zeros_like(x)
    for t in range(11):
        for k in range(2):
            e = int(ids[t, k])
            if e >= 0:
                h = activation_ref(x[t] @ experts.w_in[e].t(), "swiglu") @ experts.w_out[e].t()
                expect[t] += w[t, k].to(dtype) * h
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y.detach(), expect.detach(), **tol)


def test_layer_takes_swapped_parts():
    """The layer calls whatever dispatcher and experts it is given, through the seam only."""
    cfg = MoEConfig.preset("debug")
    calls = []

    class CountingExperts(GroupedExperts):
        def forward(self, x_ND, tokens_per_expert_E, backend=None):
            calls.append((x_ND.shape[0], tokens_per_expert_E.sum().item()))
            return super().forward(x_ND, tokens_per_expert_E, backend)

    torch.manual_seed(0)
    ref = MoELayer(cfg)
    layer = MoELayer(cfg, experts=CountingExperts(cfg), dispatcher=LocalDispatcher())
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(7, cfg.hidden_size)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)
    assert calls == [(7 * cfg.top_k, 7 * cfg.top_k)]


def test_dispatch_and_combine_have_exact_second_order_grads():
    """gradgradcheck (fp64) of dispatch -> loop experts -> combine, w.r.t. the input, the
    routing weights and the expert weights: the seam's own autograd is twice differentiable."""
    ids = torch.tensor([[1, 0], [2, 1], [0, -1], [1, 2]])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, generator=g).masked_fill(ids < 0, 0).requires_grad_()
    w_in = torch.randn(3, 8, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w_out = torch.randn(3, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    d = LocalDispatcher()

    def f(x, w, w_in, w_out):
        x_ND, counts, ctx = d.dispatch(x, _routing(ids, w, 3))
        return d.combine(BACKENDS["loop"](x_ND, counts, w_in, w_out, "swiglu"), ctx)

    assert torch.autograd.gradcheck(f, (x, w, w_in, w_out))
    assert torch.autograd.gradgradcheck(f, (x, w, w_in, w_out))
