"""Runs inside each spawned rank of tests/parallel/test_ep_fsdp2.py: the FSDP2 recipe (dense
parameters under fully_shard over a 1-D gloo DeviceMesh, experts expert-parallel and left out of
FSDP) against the single-device model trained on the global batch with the mean of the ranks'
losses."""
from __future__ import annotations

import os
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from _ep_worker import D, DT, E, global_batch, make_net
from _harness import expect as _expect
from _harness import record
from moekit.layer import set_aux_loss_scale
from moekit.parallel import (expert_param_names, expert_parallel, full_state_dict, reduce_expert_grads,
                             shard_dense)

REL = 1e-9  # fp64: sums over ranks round differently from one global sum
ROUTER_REL = 1e-6  # router weight gradients: fp32 sums (measured <= 1e-7 relative to the tensor)


def _close(got, want, what, rel=REL, atol=0.0):
    """max |got - want| <= rel * max |want| + atol: relative to the tensor's scale, not each
    entry's (an entry that is a sum of cancelling terms, e.g. a bias gradient, keeps the
    rounding error of its terms, which is tiny next to the tensor but not next to the entry)."""
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = rel * (want.abs().max().item() if want.numel() else 0.0) + atol
    assert err <= bound, f"{what}: max abs error {err:.3g} > {bound:.3g} (max |want| {want.abs().max().item():.3g})"
    return err


# which submodules become their own FSDP units before the root
WRAPS = {
    "root": lambda m: [],
    "moe_layers": lambda m: [m.moe1, m.moe2],  # the router weight is gathered inside the MoE layer
    "every_layer": lambda m: [m.inp, m.moe1, m.mid, m.moe2],
    "nested": lambda m: [m.moe1, m.moe1.router, m.moe2],  # outer first: shard_dense sorts them
}


def _batch(W, case):
    """(x, gy, bounds) of the global batch. "uneven": 5, 0, 7, 4 tokens on ranks 0..3 (a rank
    with none). No rank with 1 to 3 tokens: the router computes its logits in fp32 (by design),
    and torch's CPU fp32 matmul (MKL) takes another kernel below 4 rows, so such a rank's
    routing weights are ~1e-7 off the single device's batched ones, EP or not. "t1" is
    _ep_worker's 5, 0, 7, 1: there step0 checks FSDP against plain expert parallel instead."""
    if case == "t1":
        return global_batch(W, "uneven")  # 5, 0, 7, 1 tokens
    counts = [[5, 0, 7, 4][r % 4] if case == "uneven" else 9 for r in range(W)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(counts), D, generator=g, dtype=DT)
    gy = torch.randn(sum(counts), D, generator=g, dtype=DT)
    return x, gy, [sum(counts[:r]) for r in range(W + 1)]


def _mesh(W):
    return init_device_mesh("cpu", (W,))


def _fsdp_model(W, wrap, dtype=torch.float64, **net_kw):
    mesh = _mesh(W)
    model = expert_parallel(make_net(**net_kw).to(dtype), mesh)  # the README's recipe: one mesh for both
    return shard_dense(model, mesh, modules=WRAPS[wrap](model))


def _gathered(model) -> dict[str, torch.Tensor]:
    """The unconverted model's state dict: experts from their ranks, dense from FSDP's shards."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in full_state_dict(model).items()}


def _ref_loss(ref, x, gy, W):
    return (ref(x) * gy).sum() / W  # the mean of the ranks' losses (each a sum over its tokens)


def scenario_layout(rank, W):
    """What FSDP2 does with each parameter: dense ones become Shard(0) DTensors over the mesh,
    expert ones stay this rank's plain slots, untouched by FSDP."""
    model = _fsdp_model(W, "moe_layers")
    assert isinstance(model, FSDPModule) and isinstance(model.moe1, FSDPModule)
    experts = set(expert_param_names(model))
    assert experts == {f"moe{i}.experts.{p}" for i in (1, 2) for p in ("w_in", "w_out")}
    ref = make_net()
    for n, p in model.named_parameters():
        if n in experts:
            assert not isinstance(p, DTensor), n
            assert p.shape[0] == E // W, (n, p.shape)
            idx = torch.tensor(model.get_submodule(n.rsplit(".", 2)[0]).experts.logical_ids)
            torch.testing.assert_close(p, ref.get_parameter(n)[idx], rtol=0, atol=0)
        else:
            assert isinstance(p, DTensor), n
            assert p.device_mesh.ndim == 1 and p.device_mesh.size() == W, n
            assert str(p.placements) == "(Shard(dim=0),)", (n, p.placements)
            torch.testing.assert_close(p.full_tensor(), ref.get_parameter(n), rtol=0, atol=0)


def scenario_step0(rank, W):
    """Step 0, every wrapping, uneven token counts (a rank with none, one with T=1 at W=4):
    forward output, input grads and every parameter grad equal the single device's."""
    for wrap in WRAPS:
        ref = make_net()
        model = _fsdp_model(W, wrap)
        x, gy, bounds = _batch(W, "uneven")
        lo, hi = bounds[rank], bounds[rank + 1]
        xr = x.clone().requires_grad_()
        y_ref = ref(xr)
        (y_ref * gy).sum().div(W).backward()
        xe = x[lo:hi].clone().requires_grad_()
        y = model(xe)
        _close(y, y_ref[lo:hi], f"{wrap}: forward")
        (y * gy[lo:hi]).sum().backward()
        _close(xe.grad, xr.grad[lo:hi] * W, f"{wrap}: input grad")
        reduce_expert_grads(model, world_average=True)
        experts = set(expert_param_names(model))
        for n, p in model.named_parameters():
            g_ref = ref.get_parameter(n).grad
            if n in experts:
                idx = torch.tensor(model.get_submodule(n.rsplit(".", 2)[0]).experts.logical_ids)
                g_ref = g_ref[idx]
                g = p.grad
            else:
                assert isinstance(p.grad, DTensor), (wrap, n)
                g = p.grad.full_tensor()
            # the router's weight gradient is an fp32 sum over tokens (its logits are fp32 by
            # design): per rank, then over ranks, vs one sum on one device -> fp32 rounding
            _close(g, g_ref, f"{wrap}: grad of {n}", rel=ROUTER_REL if ".router." in n else REL)
    # with a rank holding one token (see _batch): FSDP changes nothing, bit for bit, against
    # plain expert parallel (forward, input grads, expert grads)
    x, gy, bounds = _batch(W, "t1")
    lo, hi = bounds[rank], bounds[rank + 1]
    outs = []
    for model in (_fsdp_model(W, "moe_layers"), expert_parallel(make_net())):
        xe = x[lo:hi].clone().requires_grad_()
        y = model(xe)
        (y * gy[lo:hi]).sum().backward()
        outs.append([y, xe.grad] + [model.get_parameter(n).grad for n in expert_param_names(model)])
    for a, b in zip(*outs):
        assert torch.equal(a, b), "FSDP vs plain expert parallel with a one-token rank"


def _train(rank, W, wrap, make_opt, steps=3, case="even", dtype=torch.float64, **net_kw):
    ref = make_net(**net_kw).to(dtype)
    model = _fsdp_model(W, wrap, dtype, **net_kw)
    set_aux_loss_scale(ref, 1 / W)  # the reference backpropagates loss / W: aux losses as if inside it
    x, gy, bounds = _batch(W, case)
    x, gy = x.to(dtype), gy.to(dtype)
    lo, hi = bounds[rank], bounds[rank + 1]
    opt_r, opt_m = make_opt(ref.parameters()), make_opt(model.parameters())
    for _ in range(steps):
        opt_r.zero_grad()
        _ref_loss(ref, x, gy, W).backward()
        opt_r.step()
        opt_m.zero_grad()
        (model(x[lo:hi]) * gy[lo:hi]).sum().backward()
        reduce_expert_grads(model, world_average=True)
        opt_m.step()
    return ref.state_dict(), _gathered(model)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def scenario_train(rank, W):
    """3 SGD steps under every wrapping and 3 Adam steps under two: every parameter, gathered,
    equals the single device's. SGD is the sharp check (its step is linear in the gradient, so
    a missing or doubled / W shows at once); Adam checks the optimizer over DTensor shards and
    plain expert tensors together, to a tolerance explained below."""
    runs = [("root", "sgd", _sgd, "even"), ("moe_layers", "sgd", _sgd, "uneven"),
            ("every_layer", "sgd", _sgd, "even"), ("moe_layers", "adam", _adam, "even"),
            ("every_layer", "adam", _adam, "uneven")]
    for wrap, opt_name, make_opt, case in runs:
        ref_sd, got = _train(rank, W, wrap, make_opt, case=case)
        assert set(got) == set(ref_sd), sorted(set(got) ^ set(ref_sd))
        # Adam divides each gradient entry by sqrt(v) + eps, so it passes on relative errors of
        # small entries: the router weight gradients (~1e-9, below eps = 1e-8) are fp32 sums
        # (see step0), ~1e-7 off relative, and rounding noise of entries that are 0 in exact
        # arithmetic moves a parameter by lr * noise / eps; the next steps carry that on
        # (measured: <= 6e-8 at W=4). So Adam gets atol 1e-6 = 1e-4 of lr, the tolerance of
        # the plain expert-parallel Adam test; a wrong gradient or optimizer state moves a
        # parameter by ~lr. SGD, whose step is linear in the gradient, is held to 1e-9.
        atol = 0.0 if opt_name == "sgd" else 1e-6
        worst = max(_close(got[n], t, f"{wrap}, 3 {opt_name} steps, {case} tokens: {n}", atol=atol)
                    for n, t in ref_sd.items())
        if rank == 0:
            print(f"fsdp2 W={W} {wrap} {opt_name}: max abs parameter error {worst:.2g}", flush=True)


def scenario_aux_losses(rank, W):
    """Aux and z losses (each rank's share of the global-batch loss, scale 1 on every rank):
    FSDP's mean divides them by W with the rest, as on one device with (loss + aux) / W."""
    ref_sd, got = _train(rank, W, "moe_layers", _sgd, case="uneven", aux_loss_coef=0.3, z_loss_coef=0.05)
    worst = max(_close(got[n], t, f"aux/z losses, 3 SGD steps: {n}") for n, t in ref_sd.items())
    if rank == 0:
        print(f"fsdp2 W={W} aux/z losses sgd: max abs parameter error {worst:.2g}", flush=True)


def scenario_control(rank, W):
    """The check can fail: without world_average the expert gradients are W times too large
    (FSDP averaged only the dense ones) and SGD's parameters leave the single device's."""
    ref = make_net()
    model = _fsdp_model(W, "moe_layers")
    x, gy, bounds = _batch(W, "even")
    lo, hi = bounds[rank], bounds[rank + 1]
    opt_r, opt_m = _sgd(ref.parameters()), _sgd(model.parameters())
    _ref_loss(ref, x, gy, W).backward()
    opt_r.step()
    (model(x[lo:hi]) * gy[lo:hi]).sum().backward()
    reduce_expert_grads(model)  # world_average=False: the mistake
    opt_m.step()
    got, want = _gathered(model), ref.state_dict()
    experts = set(expert_param_names(model))
    for n in want:
        same = bool((got[n] - want[n]).abs().max() <= REL * want[n].abs().max())
        assert same == (n not in experts), f"{n}: equal={same}"


def scenario_fp32(rank, W):
    """fp32 takes FSDP2's other reduction path (ReduceOp.AVG in the reduce-scatter, which gloo
    runs, instead of a sum then / W for fp64): still the mean, so equal to fp32 tolerance."""
    ref_sd, got = _train(rank, W, "moe_layers", _sgd, dtype=torch.float32)
    for n, t in ref_sd.items():
        assert got[n].dtype == torch.float32, n
        _close(got[n], t, f"fp32, 3 SGD steps: {n}", rel=1e-5)


def scenario_errors(rank, W):
    mesh = _mesh(W)
    _expect(ValueError, "expert_parallel(model, group) first", lambda: shard_dense(make_net(), mesh))
    model = expert_parallel(make_net())
    other = make_net()
    _expect(ValueError, "not a proper submodule", lambda: shard_dense(model, mesh, modules=[other.moe1]))
    mesh_2d = init_device_mesh("cpu", (1, W), mesh_dim_names=("a", "b"))
    _expect(ValueError, "1-D", lambda: shard_dense(model, mesh_2d))
    # experts split over a group of one rank while FSDP spans all: refused, the averaging would be wrong
    groups = [dist.new_group([r]) for r in range(W)]  # every rank creates every group
    solo = groups[rank]
    ep_solo = expert_parallel(make_net(), solo)
    _expect(ValueError, "same ranks", lambda: shard_dense(ep_solo, mesh))
    shard_dense(model, mesh)
    _expect(ValueError, "already sharded", lambda: shard_dense(model, mesh))


SCENARIOS = {"layout": scenario_layout, "step0": scenario_step0, "train": scenario_train,
             "aux_losses": scenario_aux_losses, "control": scenario_control, "fp32": scenario_fp32, "errors": scenario_errors}


def run(rank, W, port, names, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # MoELayer returns a view of its output (a reshape); FSDP2 warns that an in-place op on it
    # would skip its pre-backward hook. Nothing here (nor a residual `h = h + moe(h)`) does that.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=120))
    try:
        for name in names:
            t0 = time.perf_counter()
            record(out_dir, name, rank, lambda: SCENARIOS[name](rank, W))
            if rank == 0:
                print(f"fsdp2 W={W} {name}: {time.perf_counter() - t0:.2f} s", flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()
