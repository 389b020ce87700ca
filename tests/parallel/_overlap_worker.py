"""Runs inside each spawned rank of tests/parallel/test_overlap.py: the overlapped expert-parallel
layer ("chunked", "fine") against the non-overlapped one and the single-device reference."""
from __future__ import annotations


import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from _ep_worker import DT, E, check_step, global_batch, integer_net, make_net, tokens_per_rank, train_steps
from _harness import expect, run_scenarios
from moekit.parallel import expert_parallel

Di, Fi, Ei = 12, 10, 8  # integer-valued net: small, E divisible by 2 and 4 (W=3 uses a plan)


def _run(model, x, gy):
    xe = x.clone().requires_grad_()
    y = model(xe)
    (y * gy).sum().backward()
    return y, xe.grad


def scenario_integer_exact(rank, W, transport="auto", degrees=(("chunked", (1, 2, 3, 4, 8)), ("fine", (1, 2, 3)))):
    """Every chunk count of both schemes gives the non-overlapped layer's output, input grads and
    expert grads bit for bit (torch.equal), with uneven tokens (a rank with none, one with T=1).
    ``transport``: the overlapped layer's ("auto" is the tagged one on gloo; "waves" NCCL's)."""
    E_ = Ei if Ei % W == 0 else 12
    g = torch.Generator().manual_seed(5)
    counts = tokens_per_rank(W, "uneven")
    x = torch.randint(-2, 3, (sum(counts), Di), generator=g).to(DT)
    gy = torch.randint(-2, 3, (sum(counts), Di), generator=g).to(DT)
    lo, hi = sum(counts[:rank]), sum(counts[:rank + 1])
    ref = expert_parallel(integer_net(E_, Di, Fi))
    y_ref, gx_ref = _run(ref, x[lo:hi], gy[lo:hi])
    assert (y_ref != 0).any() or hi == lo
    for overlap, ds in degrees:
        for d in ds:
            par = expert_parallel(integer_net(E_, Di, Fi), overlap=overlap, chunks=d, transport=transport)
            assert par[0].dispatcher.transport == ("tagged" if transport == "auto" else transport)
            y, gx = _run(par, x[lo:hi], gy[lo:hi])
            what = f"{overlap} chunks={d} transport={transport}"
            assert torch.equal(y, y_ref), f"{what}: output"
            assert torch.equal(gx, gx_ref), f"{what}: input grad"
            for i in range(2):
                for pn in ("w_in", "w_out"):
                    a, b = getattr(par[i].experts, pn).grad, getattr(ref[i].experts, pn).grad
                    assert torch.equal(a, b), f"{what}: layer {i} {pn} grad, max diff {(a - b).abs().max()}"
                assert torch.equal(par[i].router.weight.grad, ref[i].router.weight.grad), f"{what}: router {i}"


def scenario_integer_exact_waves(rank, W):
    """The same with NCCL's posting order (grouped waves, tag 0) forced on gloo."""
    scenario_integer_exact(rank, W, "waves", (("chunked", (1, 2, 3, 8)), ("fine", (1, 2, 3))))


def scenario_matches_single_device(rank, W):
    """fp64, K=3 over 12 experts, dense layers between two MoE layers: each scheme's forward, input
    and parameter grads equal the single-device model on the global batch, and 3 Adam steps too."""
    x, gy, bounds = global_batch(W, "uneven")
    for overlap, chunks in (("chunked", 3), ("fine", 2), ("fine", 1)):
        check_step(rank, W, make_net(), expert_parallel(make_net(), overlap=overlap, chunks=chunks), x, gy, bounds)
    train_steps(rank, W, make_net(), expert_parallel(make_net(), overlap="fine", chunks=2), x, gy, bounds)
    train_steps(rank, W, make_net(), expert_parallel(make_net(), overlap="chunked", chunks=2), x, gy, bounds)


def scenario_capacity_and_one_expert(rank, W):
    """Capacity drops on the global batch, and every token routed to one expert."""
    x, gy, bounds = global_batch(W, "even")
    kw = dict(capacity_factor=1.0, drop_policy="position")
    check_step(rank, W, make_net(**kw), expert_parallel(make_net(**kw), overlap="fine", chunks=2), x, gy, bounds)

    def one_expert():
        net = make_net()
        with torch.no_grad():
            for m in (net.moe1, net.moe2):
                m.router.weight.zero_()
                m.router.weight[E - 1] = 5.0  # any input with positive sum prefers expert E-1
        return net
    xp = x.abs()
    check_step(rank, W, one_expert(), expert_parallel(one_expert(), overlap="chunked", chunks=4), xp, gy, bounds)


class Checkpointed(nn.Module):
    def __init__(self, net, reentrant: bool):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        if self.reentrant:
            return checkpoint(self.net, x, use_reentrant=True)
        return checkpoint(self.net, x, use_reentrant=False)


def scenario_checkpointing(rank, W):
    """Activation checkpointing, both kinds, around the overlapped layers (the forward, with its
    exchanges, runs again in the backward on every rank)."""
    x, gy, bounds = global_batch(W, "uneven")
    for reentrant in (True, False):
        par = expert_parallel(make_net(), overlap="fine", chunks=2)
        check_step(rank, W, make_net(), par, x, gy, bounds, run=Checkpointed(par, reentrant))


def scenario_auto_tuner(rank, W):
    """chunks="auto": candidates tried on the first calls of a shape, then one choice kept (the
    same on every rank) without retuning; a new shape key tunes again."""
    net = expert_parallel(make_net(), overlap="chunked", chunks="auto")
    disp = net.moe1.dispatcher
    tuner = disp.tuner
    n_trials = len(tuner.candidates) * tuner.trials
    x = torch.randn(20, 16, dtype=DT)
    with torch.no_grad():
        for _ in range(n_trials):
            net(x)
        assert tuner.tunings == 1, tuner.tunings
        net(x)
        chosen = disp.last_chunks
        assert chosen in tuner.candidates
        choices = [None] * W
        dist.all_gather_object(choices, chosen)
        assert len(set(choices)) == 1, choices
        for _ in range(3):
            net(x)
            assert tuner.tunings == 1 and disp.last_chunks == chosen
        x_big = torch.randn(90, 16, dtype=DT)  # another power-of-two bucket of rows: tuned anew
        for _ in range(n_trials):
            net(x_big)
        assert tuner.tunings == 2, tuner.tunings
        net(x)
        assert tuner.tunings == 2 and disp.last_chunks == chosen
    # calls while tuning and after it compute the reference's function, grads included
    xg, gy, bounds = global_batch(W, "even")
    for _ in range(2):
        net.zero_grad()
        check_step(rank, W, make_net(), net, xg, gy, bounds)


def scenario_errors(rank, W):
    expect(ValueError, "overlap='pipelined'", lambda: expert_parallel(make_net(), overlap="pipelined"))
    expect(ValueError, "chunks=0", lambda: expert_parallel(make_net(), overlap="fine", chunks=0))
    expect(ValueError, "transport='nccl'", lambda: expert_parallel(make_net(), overlap="fine", transport="nccl"))
    expect(ValueError, "applies to overlapped", lambda: expert_parallel(make_net(), transport="waves"))
    if W % 2 == 0:
        expect(ValueError, "2DH", lambda: expert_parallel(make_net(), overlap="fine", ranks_per_node=2))
    net = expert_parallel(make_net(), overlap="fine")
    expect(RuntimeError, "runs overlapped", lambda: net.moe1.dispatcher.dispatch(torch.zeros(1, 16), None))


SCENARIOS = {"integer_exact": scenario_integer_exact, "integer_exact_waves": scenario_integer_exact_waves,
             "matches_single_device": scenario_matches_single_device,
             "capacity_and_one_expert": scenario_capacity_and_one_expert, "checkpointing": scenario_checkpointing,
             "auto_tuner": scenario_auto_tuner, "errors": scenario_errors}


def run(rank, W, port, names, out_dir):
    run_scenarios(SCENARIOS, rank, W, port, names, out_dir)
