"""moe_mlp (Triton forward + backward) vs moe_mlp_ref (autograd of the pure-torch loop).

fp32 kernels are compared with the float64 reference (so the bound is fp32 rounding, not
the reference's own error); float64 kernels match the float64 reference to ~1e-12 and pass
``torch.autograd.gradcheck``.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels import moe_mlp, moe_mlp_ref  # noqa: E402

from _kernel_testutil import INTERPRET, assert_rel_close  # noqa: E402

GLU = ("swiglu", "geglu")


def make_inputs(T, D, F, E, K, activation, kind="rand", dtype=torch.float32, device="cpu", seed=0,
                ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if activation in GLU else F
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ids = torch.randint(0, E, (T, K), generator=g)
    if kind == "drop":
        ids[torch.rand(T, K, generator=g) < 0.25] = -1
    elif kind == "zero_expert" and E > 1:
        ids[ids == 0] = 1
    elif kind == "one_expert":
        ids[:] = E - 1
    elif kind == "all_dropped":
        ids[:] = -1
    w = torch.rand(T, K, generator=g, dtype=torch.float64)
    w_in = torch.randn(E, H, D, generator=g, dtype=torch.float64) / D ** 0.5
    w_out = torch.randn(E, D, F, generator=g, dtype=torch.float64) / F ** 0.5
    cast = dict(device=device)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return (x.to(dtype=dtype, **cast), ids.to(dtype=ids_dtype, **cast), w.to(dtype=w_dtype, **cast),
            w_in.to(dtype=dtype, **cast), w_out.to(dtype=dtype, **cast))


def run_fwd_bwd(fn, x, ids, w, w_in, w_out, activation, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w_in, w_out)]
    y = fn(leaves[0], ids, leaves[1], leaves[2], leaves[3], activation)
    if y.requires_grad:  # the reference has no graph when every slot is dropped
        y.backward(dy)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return y.detach(), grads


def check_against_ref(x, ids, w, w_in, w_out, activation, tol):
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    y, grads = run_fwd_bwd(moe_mlp, x, ids, w, w_in, w_out, activation, dy)
    d64 = lambda t: t.detach().double().cpu()  # noqa: E731
    y_r, grads_r = run_fwd_bwd(moe_mlp_ref, d64(x), ids.cpu(), d64(w), d64(w_in), d64(w_out), activation, d64(dy))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_rel_close(y, y_r, tol, "y")
    for name, a, b in zip(("dx", "dw", "dw_in", "dw_out"), grads, grads_r):
        assert a.dtype == (w.dtype if name == "dw" else x.dtype), name
        assert_rel_close(a, b, tol, name)


# A covering subset of the matrix D x F x E x K x T (every value of every dimension appears,
# each activation at least twice), plus the edge cases; the interpreter is slow, so the
# largest T goes with the cheaper shapes.
CASES = [
    # T,   D,   F,  E,  K, activation, kind
    (1, 24, 40, 1, 1, "swiglu", "rand"),
    (7, 100, 72, 5, 2, "geglu", "rand"),
    (130, 24, 40, 16, 3, "swiglu", "drop"),
    (7, 24, 72, 16, 1, "relu", "rand"),
    (130, 100, 40, 5, 2, "gelu", "drop"),
    (7, 100, 40, 1, 3, "silu", "rand"),
    (1, 100, 72, 16, 3, "geglu", "drop"),
    (130, 24, 72, 5, 1, "silu", "zero_expert"),
    (7, 24, 40, 5, 2, "swiglu", "zero_expert"),
    (130, 24, 40, 16, 2, "geglu", "one_expert"),
    (7, 100, 72, 5, 3, "relu", "drop"),
    (7, 24, 40, 5, 2, "gelu", "all_dropped"),
]


@pytest.mark.parametrize("T,D,F,E,K,activation,kind", CASES)
def test_moe_mlp_fp32_matches_ref(device, T, D, F, E, K, activation, kind):
    inputs = make_inputs(T, D, F, E, K, activation, kind, device=device, seed=T + D + F + E + K)
    check_against_ref(*inputs, activation, tol=2e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_moe_mlp_fp64_matches_ref_tightly(device, activation):
    inputs = make_inputs(7, 24, 40, 5, 2, activation, "drop", dtype=torch.float64, device=device)
    check_against_ref(*inputs, activation, tol=1e-12)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_integer_valued_data_is_exact(device, activation):
    """Gather, permute, weighting and combine are exact: with small-integer data every product
    and sum is exact in fp32, so output and all grads equal the reference bit for bit."""
    g = torch.Generator().manual_seed(5)
    T, D, F, E, K = 37, 24, 40, 5, 3
    H = 2 * F if activation in GLU else F
    x = torch.randint(0, 3, (T, D), generator=g).float()
    ids = torch.randint(-1, E, (T, K), generator=g)
    w = torch.randint(1, 3, (T, K), generator=g).float()
    w_in = torch.randint(-1, 2, (E, H, D), generator=g).float()
    w_out = torch.randint(-1, 2, (E, D, F), generator=g).float()
    if activation == "swiglu":  # silu is not integer-valued: use gate pre-activations of 0 (silu(0) = 0)
        w_in[:, :F] = 0.0       # and check the up path / data movement through dx, dw, dw_out
    dy = torch.randint(-2, 3, (T, D), generator=g).float()
    dev = lambda t: t.to(device)  # noqa: E731
    y, grads = run_fwd_bwd(moe_mlp, dev(x), dev(ids), dev(w), dev(w_in), dev(w_out), activation, dev(dy))
    y_r, grads_r = run_fwd_bwd(moe_mlp_ref, x, ids, w, w_in, w_out, activation, dy)
    assert torch.equal(y.cpu(), y_r)
    for name, a, b in zip(("dx", "dw", "dw_in", "dw_out"), grads, grads_r):
        assert torch.equal(a.cpu(), b), name


def test_gradcheck_float64(device):
    T, D, F, E, K, act = 3, 5, 4, 3, 2, "swiglu"
    x, ids, w, w_in, w_out = make_inputs(T, D, F, E, K, act, dtype=torch.float64, device=device, seed=3)
    ids[0, 1] = -1
    fn = lambda x_, w_, wi_, wo_: moe_mlp(x_, ids, w_, wi_, wo_, act)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (x, w, w_in, w_out)]
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_moe_mlp_half_precision(device, dtype):
    """Against the float64 truth, the kernels' error must stay within 2x the error of the
    pure-torch reference run in the same half dtype (it rounds at the same points)."""
    x, ids, w, w_in, w_out = make_inputs(33, 100, 72, 5, 2, "swiglu", "drop", dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    d64 = lambda t: t.detach().double().cpu()  # noqa: E731
    truth = run_fwd_bwd(moe_mlp_ref, d64(x), ids.cpu(), d64(w), d64(w_in), d64(w_out), "swiglu", dy)
    ours = run_fwd_bwd(moe_mlp, x, ids, w, w_in, w_out, "swiglu", dy.to(x))
    ref = run_fwd_bwd(moe_mlp_ref, x.cpu(), ids.cpu(), w.cpu(), w_in.cpu(), w_out.cpu(), "swiglu", dy.to(dtype))
    flat = lambda r: [r[0], *r[1]]  # noqa: E731
    for name, a, b, t in zip(("y", "dx", "dw", "dw_in", "dw_out"), flat(ours), flat(ref), flat(truth)):
        assert a.dtype == b.dtype, name
        scale = t.abs().max().item()
        err_ours = (d64(a) - t).abs().max().item() / scale
        err_ref = (d64(b) - t).abs().max().item() / scale
        assert err_ours <= 2.0 * err_ref + 1e-4, f"{name}: {err_ours:.2e} vs reference in {dtype} {err_ref:.2e}"


def test_int32_ids_and_no_grad(device):
    inputs = make_inputs(7, 24, 40, 5, 2, "swiglu", "drop", device=device, ids_dtype=torch.int32)
    check_against_ref(*inputs, "swiglu", tol=2e-5)
    x, ids, w, w_in, w_out = inputs
    with torch.no_grad():
        y = moe_mlp(x, ids, w, w_in, w_out, "swiglu")
    assert_rel_close(y, moe_mlp_ref(x, ids, w, w_in, w_out, "swiglu"), 2e-5)


def test_non_contiguous_inputs(device):
    """Strided views (sliced x, weights stored transposed) give the same result and grads."""
    x, ids, w, w_in, w_out = make_inputs(9, 24, 40, 5, 2, "swiglu", "drop", device=device)
    x_big = torch.randn(9, 48, device=device)
    x_big[:, ::2] = x
    x_nc = x_big[:, ::2]
    w_in_nc = w_in.transpose(1, 2).contiguous().transpose(1, 2)  # [E, H, D] view of a [E, D, H] buffer
    w_out_nc = w_out.transpose(1, 2).contiguous().transpose(1, 2)
    ids_nc = torch.cat([ids, ids], 1)[:, ::2]
    w_nc = torch.cat([w, w], 1)[:, ::2]
    assert not (x_nc.is_contiguous() or w_in_nc.is_contiguous() or ids_nc.is_contiguous())
    check_against_ref(x_nc, ids_nc, w_nc, w_in_nc, w_out_nc, "swiglu", tol=2e-5)


def test_deterministic(device):
    x, ids, w, w_in, w_out = make_inputs(64, 24, 40, 5, 3, "swiglu", device=device)
    x.requires_grad_()
    y1 = moe_mlp(x, ids, w, w_in, w_out, "swiglu")
    g1, = torch.autograd.grad(y1.sum(), x)
    y2 = moe_mlp(x, ids, w, w_in, w_out, "swiglu")
    g2, = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y1, y2) and torch.equal(g1, g2)


def test_gradient_only_for_some_inputs(device):
    x, ids, w, w_in, w_out = make_inputs(7, 24, 40, 5, 2, "geglu", device=device)
    w_out.requires_grad_()
    y = moe_mlp(x, ids, w, w_in, w_out, "geglu")
    (g,) = torch.autograd.grad(y.square().sum(), w_out)
    w_out_r = w_out.detach().clone().requires_grad_()
    (g_r,) = torch.autograd.grad(moe_mlp_ref(x, ids, w, w_in, w_out_r, "geglu").square().sum(), w_out_r)
    assert_rel_close(g, g_r, 2e-5)


def test_torch_compile_traces_custom_op(device):
    """aot_eager runs the fake implementations and the registered autograd (no C++ compiler needed)."""
    torch._dynamo.reset()
    x, ids, w, w_in, w_out = make_inputs(7, 24, 40, 5, 2, "swiglu", device=device)
    leaves = [t.clone().requires_grad_() for t in (x, w, w_in, w_out)]
    f = torch.compile(lambda a, b, c, d: moe_mlp(a, ids, b, c, d, "swiglu"), backend="aot_eager", fullgraph=True)
    y = f(*leaves)
    y.sum().backward()
    y_r, grads_r = run_fwd_bwd(moe_mlp, x, ids, w, w_in, w_out, "swiglu", torch.ones_like(x))
    assert_rel_close(y, y_r, 1e-6)
    for a, b in zip(leaves, grads_r):
        assert_rel_close(a.grad, b, 1e-6)


def test_torch_compile_dynamic_tokens_one_graph(device):
    """Routing + experts under torch.compile(dynamic=True): new token counts reuse one graph."""
    from torch._dynamo.utils import counters

    from moekit.kernels import route_topk
    torch._dynamo.reset()
    counters.clear()
    _, _, _, w_in, w_out = make_inputs(7, 24, 40, 5, 2, "swiglu", device=device)

    def f(x, logits):
        ids, w, _ = route_topk(logits, 2)
        return moe_mlp(x, ids, w, w_in, w_out, "swiglu")

    cf = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    for T in (7, 9, 33):
        x = torch.randn(T, 24, device=device, requires_grad=True)
        logits = torch.randn(T, 5, device=device)
        y = cf(x, logits)
        (gx,) = torch.autograd.grad(y.sum(), x)
        ids, w, _ = route_topk(logits, 2)
        x_r = x.detach().clone().requires_grad_()
        y_r = moe_mlp_ref(x_r, ids, w, w_in, w_out, "swiglu")
        (gx_r,) = torch.autograd.grad(y_r.sum(), x_r)
        assert_rel_close(y, y_r, 2e-5, f"y T={T}")
        assert_rel_close(gx, gx_r, 2e-5, f"dx T={T}")
    assert counters["stats"]["unique_graphs"] == 1


def test_opcheck_align_and_routing(device):
    ids = torch.randint(-1, 5, (9, 2), device=device)
    torch.library.opcheck(torch.ops.moekit.moe_align.default, (ids, 5, 16),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.moekit.route_topk.default,
                          (torch.randn(9, 8, device=device), torch.randn(8, device=device), 3, "sigmoid", 4, 2,
                           True, 2.5), test_utils=("test_schema", "test_faketensor"))


def test_opcheck(device):
    x, ids, w, w_in, w_out = make_inputs(7, 24, 40, 5, 2, "swiglu", device=device)
    torch.library.opcheck(torch.ops.moekit.moe_mlp_fwd.default, (x, ids, w, w_in, w_out, "swiglu", 16, False),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("case", ["x_1d", "ids_rows", "ids_float", "w_shape", "w_in_D", "glu_H", "plain_H",
                                  "w_out_F", "dtype_mix", "act", "x_int"])
def test_validation(device, case):
    x, ids, w, w_in, w_out = make_inputs(4, 8, 6, 3, 2, "swiglu", device=device)
    act = "swiglu"
    if case == "x_1d":
        x = x[0]
    elif case == "ids_rows":
        ids = ids[:3]
    elif case == "ids_float":
        ids = ids.float()
    elif case == "w_shape":
        w = w[:, :1]
    elif case == "w_in_D":
        w_in = w_in[:, :, :7]
    elif case == "glu_H":
        w_in = w_in[:, :11]
    elif case == "plain_H":
        act = "relu"
    elif case == "w_out_F":
        w_out = w_out[:, :, :5]
    elif case == "dtype_mix":
        w_in = w_in.double()
    elif case == "act":
        act = "tanh"
    elif case == "x_int":
        x = x.long()
    for fn in (moe_mlp, moe_mlp_ref):
        with pytest.raises(ValueError):
            fn(x, ids, w, w_in, w_out, act)


def test_cpu_without_interpreter_raises_clear_error():
    code = ("import torch\nfrom moekit.kernels import moe_mlp, TritonUnavailableError\n"
            "x = torch.randn(2, 4); ids = torch.zeros(2, 1, dtype=torch.long); w = torch.ones(2, 1)\n"
            "try:\n    moe_mlp(x, ids, w, torch.randn(1, 6, 4), torch.randn(1, 4, 3), 'swiglu')\n"
            "except TritonUnavailableError as e:\n    print('RAISED', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout and "moe_mlp_ref" in out.stdout


def test_import_without_triton_and_without_cuda_init():
    """`import moekit.kernels` neither needs triton nor initialises CUDA; the references work."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # what an absent package looks like to import\n"
        "import torch, moekit.kernels as k\n"
        "assert not k.HAS_TRITON and sys.modules['triton'] is None\n"
        "x = torch.randn(3, 4); ids = torch.tensor([[0], [1], [-1]]); w = torch.ones(3, 1)\n"
        "y = k.moe_mlp_ref(x, ids, w, torch.randn(2, 6, 4), torch.randn(2, 4, 3), 'swiglu')\n"
        "assert y.shape == (3, 4)\n"
        "k.moe_align_ref(ids, 2); k.route_topk_ref(torch.randn(3, 4), 2)\n"
        "try:\n    k.moe_mlp(x, ids, w, torch.randn(2, 6, 4), torch.randn(2, 4, 3), 'swiglu')\n"
        "except k.TritonUnavailableError as e:\n    print('RAISED', e)\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "RAISED" in out.stdout and "OK" in out.stdout, out.stdout + out.stderr


def test_import_with_triton_does_not_init_cuda():
    code = ("import sys, torch\nimport moekit.kernels as k\nassert 'triton' not in sys.modules\n"
            "k.moe_mlp, k.route_topk, k.moe_align  # imports the kernel modules (and triton)\n"
            "assert 'triton' in sys.modules and k.HAS_TRITON\nassert not torch.cuda.is_initialized()\nprint('OK')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="real sizes need the compiled kernels (TRITON_INTERPRET is set)")
@pytest.mark.parametrize("T,D,F,E,K", [(4096, 2048, 1408, 60, 4),   # Qwen2-MoE
                                       (512, 4096, 3584, 8, 2),     # Mixtral-like (F / 4 to keep it quick)
                                       (256, 7168, 2048, 32, 8)])   # DeepSeek-V3-like (E / 8 to fit memory)
def test_moe_mlp_gpu_real_sizes(T, D, F, E, K):
    inputs = make_inputs(T, D, F, E, K, "swiglu", "drop", dtype=torch.bfloat16, device="cuda")
    x, ids, w, w_in, w_out = inputs
    dy = torch.randn_like(x)
    y, grads = run_fwd_bwd(moe_mlp, x, ids, w, w_in, w_out, "swiglu", dy)
    f32 = lambda t: t.float()  # noqa: E731
    y_r, grads_r = run_fwd_bwd(moe_mlp_ref, f32(x), ids, w, f32(w_in), f32(w_out), "swiglu", f32(dy))
    assert_rel_close(y, y_r, 3e-2, "y")
    for name, a, b in zip(("dx", "dw", "dw_in", "dw_out"), grads, grads_r):
        assert_rel_close(a, b, 3e-2, name)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernels (TRITON_INTERPRET is set)")
def test_moe_mlp_gpu_fp32_exact_path():
    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make_inputs(1000, 512, 384, 16, 2, "geglu", "drop", device="cuda")
    check_against_ref(*inputs, "geglu", tol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(INTERPRET, reason="needs the compiled kernels (TRITON_INTERPRET is set)")
def test_gpu_new_token_counts_do_not_recompile():
    """Autotune keys exclude token counts and those args are do_not_specialize: after the
    first call, other T (including multiples of 16 and T = 1) add no compiled variant."""
    import moekit.kernels.grouped_mlp as gm

    kernels = [gm._moe_gemm_in_kernel, gm._moe_gemm_out_kernel, gm._moe_gemm_dh_kernel, gm._moe_wgrad_kernel]

    def n_compiled():
        total = 0
        for k in kernels:
            caches = getattr(k.fn, "device_caches", None)
            if caches is None:
                pytest.skip("this triton's JITFunction has no device_caches")
            total += sum(len(c[0]) for c in caches.values())
        return total

    def step(T):
        x, ids, w, w_in, w_out = make_inputs(T, 256, 128, 8, 2, "swiglu", "drop", dtype=torch.bfloat16,
                                             device="cuda", seed=T)
        x.requires_grad_()
        w_in.requires_grad_()
        w_out.requires_grad_()
        w.requires_grad_()
        moe_mlp(x, ids, w, w_in, w_out, "swiglu").sum().backward()
        torch.cuda.synchronize()

    step(100)  # pick_block_m(200, 8) = 32
    before = n_compiled()
    for T in (96, 128, 113, 250):  # same block_m bucket (avg rows per expert 24..62)
        step(T)
    assert n_compiled() == before
