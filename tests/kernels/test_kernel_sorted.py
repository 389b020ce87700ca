"""``moe_mlp_sorted``: the Triton kernels on rows already sorted by expert (the experts' side of
moekit's dispatch seam) against the ``loop`` backend: output and every grad; zero-row experts,
all rows on one expert, no rows; bad input; double backward refused."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from _kernel_testutil import DEVICE, assert_rel_close  # noqa: E402

from moekit.experts.loop import loop_compute  # noqa: E402
from moekit.kernels import moe_mlp_sorted  # noqa: E402


def _case(counts, D=24, F=20, activation="swiglu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    E, N = len(counts), sum(counts)
    H = 2 * F if activation in ("swiglu", "geglu") else F
    x = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    w_in = (torch.randn(E, H, D, generator=g) * D ** -0.5).to(DEVICE, dtype)
    w_out = (torch.randn(E, D, F, generator=g) * F ** -0.5).to(DEVICE, dtype)
    return x, torch.tensor(counts, device=DEVICE), w_in, w_out


def _run(fn, x, counts, w_in, w_out, activation):
    leaves = [t.clone().requires_grad_(True) for t in (x, w_in, w_out)]
    y = fn(leaves[0], counts, leaves[1], leaves[2], activation)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
    return [y.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


@pytest.mark.parametrize("counts,activation", [([5, 0, 9, 3], "swiglu"), ([0, 17, 0], "geglu"),
                                               ([1, 0, 0], "gelu"), ([4, 4, 4, 4, 4], "relu")])
def test_sorted_entry_matches_loop(counts, activation):
    case = _case(counts, activation=activation)
    ref = _run(loop_compute, *case, activation)
    got = _run(moe_mlp_sorted, *case, activation)
    for name, a, b in zip(("y", "grad_x", "grad_w_in", "grad_w_out"), got, ref):
        assert_rel_close(a, b, 2e-5, name)


def test_sorted_entry_errors():
    x, counts, w_in, w_out = _case([2, 3])
    with pytest.raises(ValueError, match="sums to 5, but x_ND has 4 rows"):
        moe_mlp_sorted(x[:4], counts, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="entries for E=2"):
        moe_mlp_sorted(x, torch.tensor([5], device=DEVICE), w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="int32 or int64"):
        moe_mlp_sorted(x, counts.float(), w_in, w_out, "swiglu")


def test_double_backward_is_refused():
    x, counts, w_in, w_out = _case([3, 2])
    x.requires_grad_(True)
    y = moe_mlp_sorted(x, counts, w_in, w_out, "swiglu")
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.square().sum().backward()
