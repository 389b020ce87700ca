"""The CPU expert path (``grouped_mm`` backend on CPU): both schedules against the loop
reference, and the buffer pool it draws its large intermediates from."""
from __future__ import annotations

import os

import pytest
import torch

import moekit.experts as experts
from moekit.experts import BACKENDS, _plan_parts
from moekit.workspace import POOL, BufferPool, Lease


def _case(T, D, F, E, K, activation="swiglu", seed=0, drop=False, one_expert=False):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if activation in ("swiglu", "geglu") else F
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, H, D, generator=g, dtype=torch.float64) * D ** -0.5
    w_out = torch.randn(E, D, F, generator=g, dtype=torch.float64) * F ** -0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.long)
    if one_expert:
        ids[:, 0] = E - 1
    if drop and T:
        ids[::3, -1] = -1  # dropped slots
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    return x, ids, w, w_in, w_out


def _run(backend, x, ids, w, w_in, w_out, activation):
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w_in, w_out)]
    y = BACKENDS[backend](leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(grad)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.fixture(params=["workers2", "workers3", "inline"])
def schedule(request, monkeypatch):
    threads = torch.get_num_threads()
    if request.param == "inline":
        monkeypatch.setattr(experts, "INLINE_MIN_MACS", 0)
    else:
        monkeypatch.setattr(experts, "INLINE_MIN_MACS", 1 << 62)
        torch.set_num_threads(int(request.param[-1]))
    yield request.param
    torch.set_num_threads(threads)


@pytest.mark.parametrize("T,D,F,E,K,activation,drop,one_expert", [
    (37, 24, 20, 7, 3, "swiglu", False, False),
    (37, 24, 20, 7, 3, "geglu", True, False),
    (130, 17, 11, 5, 2, "gelu", True, False),
    (50, 16, 12, 6, 2, "relu", False, True),   # every token's first slot on the last expert
    (1, 24, 20, 9, 3, "swiglu", False, False),  # T=1: six experts with zero tokens
    (9, 8, 6, 3, 1, "silu", True, False),       # K=1: grad_x is the slot buffer itself
])
def test_cpu_path_matches_loop_reference(schedule, T, D, F, E, K, activation, drop, one_expert):
    case = _case(T, D, F, E, K, activation, drop=drop, one_expert=one_expert)
    ref = _run("loop", *case, activation)
    for _ in range(2):  # the second step runs on pooled buffers
        got = _run("grouped_mm", *case, activation)
        for name, a, b in zip(("y", "grad_x", "grad_weights", "grad_w_in", "grad_w_out"), got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f"{schedule}: {name}")


def test_plan_parts_picks_schedule_by_expert_size(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    # OLMoE-like: 256 rows x 1024 x 1024 per expert -> one range per worker
    parts = _plan_parts([256] * 64, 1024, 1024)
    assert len(parts) == 2 and sum(b - a for p in parts for _, a, b in p) == 256 * 64
    # Mixtral-like: 512 rows x 1024 x 4096 -> one part, experts in order, each whole
    parts = _plan_parts([512, 0, 700, 300, 512, 512, 512, 1048], 1024, 4096)
    assert parts == [[(0, 0, 512), (2, 512, 1212), (3, 1212, 1512), (4, 1512, 2024), (5, 2024, 2536),
                      (6, 2536, 3048), (7, 3048, 4096)]]
    assert _plan_parts([0, 0], 8, 8) == [[]]


def test_pool_reuses_and_bounds_idle_memory():
    pool = BufferPool(max_idle_bytes=3 << 20)
    a = pool.take((512, 1024), torch.float32)  # 2 MiB
    ptr = a.data_ptr()
    pool.give(a)
    assert pool.idle_bytes == 2 << 20
    b = pool.take((500, 1024), torch.float32)  # within 25 %: same memory
    assert b.data_ptr() == ptr and b.shape == (500, 1024) and pool.idle_bytes == 0
    c = pool.take((300, 1024), torch.float32)  # b is out; and 2 MiB would be > 25 % too big anyway
    assert c.data_ptr() != ptr
    assert pool.take((512, 1024), torch.float64).dtype == torch.float64  # dtype is exact
    pool.give(b, c)
    assert pool.idle_bytes == 2 << 20  # c (1.2 MiB) would exceed the 3 MiB bound: freed instead
    with pytest.raises(RuntimeError, match="twice"):
        pool.give(b)
    small = pool.take((4, 4), torch.float32)  # below 1 MiB: never pooled
    pool.give(small)
    assert pool.idle_bytes == 2 << 20
    pool.clear()
    assert pool.idle_bytes == 0


def test_lease_gives_back_when_freed():
    pool = BufferPool()
    buf = pool.take((1024, 1024), torch.float32)
    lease = Lease(pool, buf)
    assert pool.idle_bytes == 0
    del lease
    assert pool.idle_bytes == 4 << 20


def test_retained_graph_keeps_its_buffers(monkeypatch):
    """A graph kept with retain_graph=True must not see its saved buffers reused by a later
    forward: the second backward gives the same gradients as the first."""
    monkeypatch.setattr(experts, "INLINE_MIN_MACS", 1 << 62)
    D, F, E, K, T = 64, 48, 4, 2, 2048  # [T*K, D] fp32 = 1 MiB: pooled
    x, ids, w, w_in, w_out = (t.float() for t in _case(T, D, F, E, K))
    ids = ids.long()
    leaves = [t.clone().requires_grad_(True) for t in (x, w, w_in, w_out)]
    y = BACKENDS["grouped_mm"](leaves[0], ids, *leaves[1:], "swiglu")
    y.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    other = [t.clone().requires_grad_(True) * 3 for t in (x, w, w_in, w_out)]  # overwrites any reused buffer
    BACKENDS["grouped_mm"](other[0], ids, *other[1:], "swiglu").sum().backward()
    y.sum().backward()
    for a, b in zip(first, [t.grad for t in leaves]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    idle = POOL.idle_bytes
    del y
    assert POOL.idle_bytes > idle  # the graph's buffers came back once it was freed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_starts_empty_in_a_forked_child():
    buf = POOL.take((1024, 1024), torch.float32)
    POOL.give(buf)
    assert POOL.idle_bytes > 0
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave at once
        os.write(w, str(POOL.idle_bytes).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 64) == b"0"


def test_lent_tensor_comes_back_when_its_storage_is_freed():
    pool = BufferPool()
    t = pool.lend((512, 1024), torch.bfloat16)  # any dtype: the pool holds bytes
    assert t.shape == (512, 1024) and t.dtype == torch.bfloat16 and t.is_contiguous()
    ptr = t.data_ptr()
    view = t[3:7]
    del t
    assert pool.idle_bytes == 0  # a view still shares the storage
    del view
    assert pool.idle_bytes == 1 << 20
    again = pool.lend((256, 1024), torch.float32)
    assert again.data_ptr() == ptr
    assert pool.lend((4, 4), torch.float32).shape == (4, 4)  # small: plain tensor


def _moe(backend):
    from moekit import MoEConfig, MoELayer

    torch.manual_seed(0)
    # w_in [8, 256, 256] fp32 = 2 MiB, w_out [8, 256, 128] = 1 MiB: their grads are lent
    layer = MoELayer(MoEConfig(hidden_size=256, ffn_hidden_size=128, num_experts=8, top_k=2,
                               aux_loss_coef=0.01, backend=backend))
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def test_weight_grads_reuse_memory_across_steps_and_match_loop():
    """Lent weight grads: the optimizer sees the loop backend's values; after zero_grad the
    memory serves the next backward; a grad the user kept is never overwritten."""
    layers = {b: _moe(b) for b in ("loop", "grouped_mm")}
    opts = {b: torch.optim.Adam(m.parameters(), lr=1e-3) for b, m in layers.items()}
    w_in = layers["grouped_mm"].experts.w_in
    ptrs = []
    for step in range(4):
        x = torch.randn(3, 50, 256)
        for b, layer in layers.items():
            opts[b].zero_grad()
            (layer(x) - x).square().mean().backward()
            opts[b].step()
        ptrs.append(w_in.grad.data_ptr())
        if step == 2:  # the user keeps this one
            kept, kept_copy = w_in.grad, w_in.grad.clone()
    assert len(set(ptrs[:3])) < 3  # memory came back after zero_grad and was used again
    torch.testing.assert_close(kept, kept_copy, rtol=0, atol=0)  # step 3 did not write over it
    assert ptrs[3] != ptrs[2]
    for (n, p), q in zip(layers["loop"].named_parameters(), layers["grouped_mm"].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_accumulated_weight_grads_add_up():
    layer = _moe("grouped_mm")
    x = torch.randn(2, 40, 256)
    layer(x).sum().backward()
    once = layer.experts.w_in.grad.clone()
    layer(x).sum().backward()  # .grad exists: autograd adds the new (lent) grad into it
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * once)
