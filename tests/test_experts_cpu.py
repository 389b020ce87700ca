"""The CPU expert path (``grouped_mm`` backend on CPU): both schedules against the loop
reference, and the buffer pool it draws its large intermediates from."""
from __future__ import annotations

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
