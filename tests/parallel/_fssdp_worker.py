"""Runs inside each spawned rank of tests/parallel/test_fssdp.py: the sparse collectives against a
dense reference, and fssdp() training against the single-device model on the global batch."""
from __future__ import annotations

import copy
import random

import torch
import torch.distributed as dist
from torch import nn

from _ep_worker import Net
from _harness import expect, run_scenarios
from moekit import MoEConfig
from moekit.parallel import full_state_dict, load_full_state_dict
from moekit.parallel.fssdp import (FSSDPError, Materialization, Traffic, attach_optimizer, fssdp, fssdp_state,
                                   sparse_all_gather, sparse_reduce_scatter)
from moekit.parallel.fssdp import ledger

E, K, D, F_ = 8, 2, 8, 6
DT = torch.float64


# ---- sparse collectives -------------------------------------------------------------------------

def _random_mat(rng: random.Random, W: int, E_: int) -> Materialization:
    owners = [rng.randrange(W) for _ in range(E_)]
    holders = []
    for o in owners:
        extra = {q for q in range(W) if rng.random() < 0.4}
        holders.append(tuple(sorted(extra | {o})))
    return Materialization(tuple(owners), tuple(holders), W)


def _total(v: int) -> int:
    t = torch.tensor([v], dtype=torch.long)
    dist.all_reduce(t)
    return int(t)


def scenario_sparse(rank, W):
    """Exact against dense references on 8 random placements; bytes = REFERENCE §2 formulas."""
    rng = random.Random(1234)  # the same placements on every rank
    E_ = 7
    for trial in range(8):
        mat = _random_mat(rng, W, E_)
        if trial == 0:
            mat = Materialization.owners_only([e % W for e in range(E_)], W)
        full = torch.randint(-50, 50, (E_, 3, 2), generator=torch.Generator().manual_seed(trial)).to(DT)
        owned, held = mat.owned(rank), mat.held(rank)
        x_OX = full[owned].clone().requires_grad_()
        tr = Traffic()
        y_HX = sparse_all_gather(x_OX, mat, traffic=tr)
        assert torch.equal(y_HX, full[held]), (trial, held)
        p, b = 3 * 2, full.element_size()
        assert _total(tr.bytes_sent) == ledger.spag_bytes(mat, p, b), trial
        assert tr.bytes_received == ledger.inbound_bytes(mat, rank, p, b), trial
        # spRS against a dense sum: every rank scatters its held rows into [E], all-reduce, owned rows
        gen = torch.Generator().manual_seed(100 * trial + rank)
        g_HX = torch.randint(-9, 9, (len(held), 3, 2), generator=gen).to(DT)
        dense = torch.zeros(E_, 3, 2, dtype=DT)
        dense[held] = g_HX
        dist.all_reduce(dense)
        tr2 = Traffic()
        out = sparse_reduce_scatter(g_HX, mat, traffic=tr2)
        assert torch.equal(out, dense[owned]), trial
        # autograd: the gather's backward is the reduce-scatter
        y_HX.backward(g_HX)
        assert torch.equal(x_OX.grad, dense[owned]), trial
        assert _total(tr2.bytes_sent) == ledger.sprs_bytes(mat, p, b), trial
        # the backward counted one spRS into tr as well
        assert _total(tr.bytes_sent) == ledger.spag_bytes(mat, p, b) + ledger.sprs_bytes(mat, p, b), trial
    mat = Materialization.owners_only([0] * 4, W)
    expect(ValueError, "owns", lambda: sparse_all_gather(torch.zeros(5, 2, dtype=DT), mat))
    expect(ValueError, "ranks", lambda: sparse_all_gather(torch.zeros(0, 2), Materialization.owners_only([0], W + 1)))
    expect(ValueError, "lacks the owner", lambda: Materialization((0,), ((1,),), 2))


# ---- training ------------------------------------------------------------------------------------

def make_net(seed=0, **cfg_kw):
    """Skewed routing: inputs with a positive mean, routers that favour experts 0 and 1."""
    torch.manual_seed(seed)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K, **cfg_kw)
    net = Net(cfg).to(DT)
    with torch.no_grad():
        net.inp.weight.copy_(torch.eye(D) + 0.1 * torch.randn(D, D))
        net.mid.bias.fill_(0.5)
        for m in (net.moe1, net.moe2):
            m.router.weight.normal_(0, 0.3)
            m.router.weight[0] += 0.9
            m.router.weight[1] += 0.6
    return net


def batch(W, seed=1):
    counts = [[5, 0, 7, 1][r % 4] + 3 for r in range(W)]
    counts[1 % W] = 0  # a rank without tokens
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), D, generator=g, dtype=DT) + 0.8
    gy = torch.randn(sum(counts), D, generator=g, dtype=DT)
    bounds = [sum(counts[:r]) for r in range(W + 1)]
    return x, gy, bounds


def _compare(model, ref, tol, what):
    full = full_state_dict(model.module)
    for n, t in ref.state_dict().items():
        torch.testing.assert_close(full[n], t, **tol, msg=lambda m: f"{what}: {n}: {m}")


def _steps(ref, model, opt_r, opt, x, gy, lo, hi, W, n):
    """n steps of the single-device reference on the mean loss and of ``model`` on this rank's slice."""
    for _ in range(n):
        opt_r.zero_grad()
        ((ref(x) * gy).sum() / W).backward()
        opt_r.step()
        opt.zero_grad()
        (model(x[lo:hi]) * gy[lo:hi]).sum().backward()
        opt.step()


def _adam_resumed(ref, optim_state):
    """Adam over ``ref`` continuing from a full optimizer state (``full_optim_state``'s layout)."""
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    params = dict(ref.named_parameters())
    for n, st in optim_state.items():
        opt.state[params[n]] = {k: v.clone() for k, v in st.items()}
    return opt


def _optimizer(name, params):
    return torch.optim.SGD(params, lr=0.2) if name == "sgd" else torch.optim.Adam(params, lr=1e-2)


def _train(rank, W, opt_name, steps=5, check_bytes=False, need_replicas=True, **kw):
    """``steps`` steps of fssdp(model) vs the reference on the global batch (mean of the ranks'
    losses); returns (model, ref, optimizer)."""
    ref = make_net()
    model = fssdp(copy.deepcopy(ref), memory_cap=2, **kw)
    ctl = fssdp_state(model)
    opt_r, opt = _optimizer(opt_name, ref.parameters()), _optimizer(opt_name, model.parameters())
    attach_optimizer(model, opt)
    x, gy, bounds = batch(W)
    lo, hi = bounds[rank], bounds[rank + 1]
    p = model.module.moe1.experts.elements_per_expert
    replicas_seen = 0
    for step in range(steps):
        opt_r.zero_grad()
        ((ref(x) * gy).sum() / W).backward()
        opt_r.step()
        opt.zero_grad()
        before = (ctl.spag_traffic.bytes_sent, ctl.sprs_traffic.bytes_sent)
        (model(x[lo:hi]) * gy[lo:hi]).sum().backward()
        replicas_seen += sum(sum(c - 1 for c in m.copies_E) for m in ctl.mats)
        if check_bytes:
            fetches = 2 if kw.get("remat") else 1
            got_ag = _total(ctl.spag_traffic.bytes_sent - before[0])
            got_rs = _total(ctl.sprs_traffic.bytes_sent - before[1])
            assert got_ag == fetches * sum(ledger.spag_bytes(m, p, 8) for m in ctl.mats), (step, got_ag)
            assert got_rs == sum(ledger.sprs_bytes(m, p, 8) for m in ctl.mats), (step, got_rs)
        opt.step()
    assert replicas_seen > 0 or not need_replicas, "no expert was ever replicated: the test does not exercise P'"
    tol = dict(rtol=1e-9, atol=1e-9) if opt_name == "sgd" else dict(rtol=1e-5, atol=1e-5)
    _compare(model, ref, tol, f"after {steps} {opt_name} steps {kw}")
    return model, ref, opt


def scenario_train(rank, W):
    """SGD with the memory cap deciding P' (t unknown), Adam with t = 1 <= m (the hottest expert
    everywhere); then the memory ledger."""
    _train(rank, W, "sgd", check_bytes=True)
    model, ref, opt = _train(rank, W, "adam", overlap=1)
    _check_ledger(rank, W, model, opt, remat=False)


def scenario_remat(rank, W):
    """The same with re-materialisation, SGD with t from the overlap rule (overlap="auto"); its
    Adam run (and memory ledger) is in scenario_reshard."""
    _train(rank, W, "sgd", check_bytes=True, remat=True, overlap="auto", bandwidth=1e12)
    if W == 2:  # t from the measured link and non-MoE time: whatever P' it gives, the same result
        _train(rank, W, "sgd", steps=3, need_replicas=False, overlap="auto")


def scenario_losses(rank, W):
    """W=3: capacity decided on the global batch (tokens dropped), aux and z losses (their scale
    set to W, as DDP averages): 4 SGD steps equal the single device."""
    if W != 3:
        return
    from moekit import set_aux_loss_scale

    kw = dict(capacity_factor=1.0, aux_loss_coef=0.01, z_loss_coef=0.001)
    ref = make_net(**kw)
    model = fssdp(copy.deepcopy(ref), memory_cap=2)
    set_aux_loss_scale(model.module, float(W))
    opt_r, opt = torch.optim.SGD(ref.parameters(), lr=0.2), torch.optim.SGD(model.parameters(), lr=0.2)
    x, gy, bounds = batch(W)
    lo, hi = bounds[rank], bounds[rank + 1]
    _steps(ref, model, opt_r, opt, x, gy, lo, hi, W, 4)
    assert int(ref.moe1.tokens_per_expert.sum()) < K * x.shape[0]  # capacity dropped some
    _compare(model, ref, dict(rtol=1e-6, atol=1e-7), "capacity + aux/z losses")  # the router computes in fp32


def scenario_fsdp2(rank, W):
    """W=2: dense parameters under FSDP2 (dense="fsdp2", in place): 4 SGD and 4 Adam steps equal
    the single device; the expert parameters stay plain tensors."""
    if W != 2:
        return
    for opt_name in ("sgd", "adam"):
        ref = make_net()
        model = fssdp(copy.deepcopy(ref), memory_cap=2, dense="fsdp2")
        assert not hasattr(model.moe1.experts.w_in, "to_local") and hasattr(model.inp.weight, "to_local")
        opt_r, opt = _optimizer(opt_name, ref.parameters()), _optimizer(opt_name, model.parameters())
        x, gy, bounds = batch(W)
        lo, hi = bounds[rank], bounds[rank + 1]
        _steps(ref, model, opt_r, opt, x, gy, lo, hi, W, 4)
        full = full_state_dict(model)
        tol = dict(rtol=1e-9, atol=1e-9) if opt_name == "sgd" else dict(rtol=1e-5, atol=1e-5)
        for n, t in ref.state_dict().items():
            got = full[n].full_tensor() if hasattr(full[n], "full_tensor") else full[n]
            torch.testing.assert_close(got, t, **tol, msg=lambda m: f"fsdp2 {opt_name}: {n}: {m}")


def scenario_reshard(rank, W):
    """Re-sharding after steps 2 and 4 moves parameters and Adam state: training continues
    identically (SGD; Adam with re-materialisation, then its memory ledger); every rank owns the
    same total; the owners changed."""
    for opt_name, remat in (("sgd", False), ("adam", True)):
        model, ref, opt = _train(rank, W, opt_name, reshard_every=2, remat=remat)
        ctl = fssdp_state(model)
        start = [[e * W // E for e in range(E)]] * 2
        assert ctl.owners != start, "re-sharding moved nothing"
        totals = [sum(o.count(r) for o in ctl.owners) for r in range(W)]
        assert max(totals) - min(totals) <= 1, totals
        owned_here = sum(len(m.experts.owned_ids) for m in (model.module.moe1, model.module.moe2))
        assert owned_here == totals[rank]
        assert _total(ctl.move_traffic.bytes_sent) > 0
        if remat:
            _check_ledger(rank, W, model, opt, remat=True)


def _check_ledger(rank, W, model, opt, remat):
    """Memory on each rank equals REFERENCE §2: owned weights + grads + Adam state (fp64: 8+8+16
    bytes per element); replicas alive after forward = sum_l m_{l,d} p b_w (0 with remat)."""
    ctl = fssdp_state(model)
    layers = (model.module.moe1, model.module.moe2)
    p = layers[0].experts.elements_per_expert
    measured = 0
    for m in layers:
        for t in (m.experts.w_in, m.experts.w_out):
            measured += t.numel() * t.element_size() + t.grad.numel() * t.grad.element_size()
            measured += sum(v.numel() * v.element_size() for v in opt.state[t].values() if v.dim() > 0)
    want = ledger.fssdp_memory(ctl.mats, rank, p, 8, 8, 16, remat)
    assert measured == want.owned, (measured, want)
    x, gy, bounds = batch(W)
    y = model(x[bounds[rank]:bounds[rank + 1]])
    live = sum(m.experts.live_materialized_bytes() for m in layers)
    replica_weights = sum(len(m.replicas(rank)) for m in ctl.mats) * p * 8
    assert live == (0 if remat else replica_weights), (remat, live, replica_weights)
    assert want.materialized == (max if remat else sum)(len(m.replicas(rank)) for m in ctl.mats) * p * 16
    y.sum().backward()


def scenario_state_dict(rank, W):
    """Checkpoints independent of the owner map: after 2 Adam steps with re-sharding, the full
    state dict and full optimizer state loaded into a model converted afresh (other owners,
    another memory cap) resume training: 2 more steps equal the single device's 4; the full
    state dict also loads into the single-device model."""
    from moekit.parallel.fssdp import full_optim_state, load_full_optim_state

    model, ref, opt = _train(rank, W, "adam", steps=2, reshard_every=1)
    sd, osd = full_state_dict(model.module), full_optim_state(model, opt)
    other = fssdp(make_net(seed=7), memory_cap=1)
    assert fssdp_state(other).owners != fssdp_state(model).owners
    load_full_state_dict(other.module, sd)
    sd2 = full_state_dict(other.module)
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    opt2 = torch.optim.Adam(other.parameters(), lr=1e-2)
    load_full_optim_state(other, opt2, osd)
    osd2 = full_optim_state(other, opt2)
    for n in osd:
        for k in osd[n]:
            assert torch.equal(osd[n][k], osd2[n][k]), (n, k)
    x, gy, bounds = batch(W)
    lo, hi = bounds[rank], bounds[rank + 1]
    single = make_net(seed=9)
    single.load_state_dict(sd)
    with torch.no_grad():
        torch.testing.assert_close(other(x[lo:hi]), single(x)[lo:hi], rtol=1e-12, atol=1e-12)
    # the reference continues from the same state: its Adam state rebuilt from the full one
    _steps(ref, other, _adam_resumed(ref, osd), opt2, x, gy, lo, hi, W, 2)
    _compare(other, ref, dict(rtol=1e-5, atol=1e-5), "resumed from a full checkpoint")


def scenario_disagree(rank, W):
    """A rank whose loads (hence P') diverge: every rank raises FSSDPError at the next step."""
    model = fssdp(make_net(), memory_cap=2)
    ctl = fssdp_state(model)
    x, gy, bounds = batch(W)
    for _ in range(2):
        model(x[bounds[rank]:bounds[rank + 1]]).sum().backward()
    if rank == W - 1:
        ctl.window.steps[-1][0, E - 1] += 1000
    expect(FSSDPError, "different placements", lambda: model(x[bounds[rank]:bounds[rank + 1]]))


def scenario_dispatch(rank, W):
    """Token dispatch: a local holder takes all its rank's rows; otherwise the holders on the
    same node (W=4: two nodes of two ranks); otherwise all holders, split evenly."""
    rpn = 2 if W == 4 else None
    model = fssdp(make_net(), ranks_per_node=rpn)
    d = model.module.moe1.dispatcher
    last = W - 1
    rest = [e % W for e in range(3, E)]
    mat = Materialization((0, 1 % W, 0, *rest), ((0, last), (1 % W,), tuple(range(W)), *((o,) for o in rest)), W)
    d.set_materialization(mat)
    ids = torch.tensor([0] * 8 + [1] * 4 + [2] * 8)
    dest = (d._physical(ids) // d.placement.slots_per_rank).tolist()
    if rank in (0, last):
        assert dest[:8] == [rank] * 8, dest
    elif rpn:
        assert dest[:8] == [0 if rank < 2 else last] * 8, dest
    else:
        assert sorted(dest[:8]) == [0] * 4 + [last] * 4, dest  # split evenly
    assert dest[8:12] == [1 % W] * 4 and dest[12:] == [rank] * 8, dest
    # every held slot: the slot's expert is the one asked for
    phy = d._physical(ids).tolist()
    assert [d.placement.phy2log[s] for s in phy] == ids.tolist()
    expect(ValueError, "experts", lambda: d.set_materialization(Materialization.owners_only([0], W)))


def scenario_errors(rank, W):
    expect(ValueError, "no MoELayer", lambda: fssdp(nn.Linear(2, 2)))
    expect(ValueError, "overlap", lambda: fssdp(make_net(), overlap=-1))
    expect(ValueError, "bandwidth", lambda: fssdp(make_net(), overlap="auto", bandwidth=-1.0))
    from moekit.parallel import save_checkpoint  # DCP covers expert-parallel layouts: a clear refusal
    expect(NotImplementedError, "full_state_dict", lambda: save_checkpoint("/nonexistent/ckpt", fssdp(make_net())))


# ---- a checkpoint written at one world size, resumed at another ------------------------------------

_HANDOFF = {}  # "path": the checkpoint file shared by the two spawns of test_checkpoint_across_world_sizes


def scenario_ckpt_save(rank, W):
    """2 Adam steps with re-sharding at this W, then (full_state_dict, full_optim_state, the
    reference's parameters) saved by rank 0 for a run at another world size to resume."""
    from moekit.parallel.fssdp import full_optim_state

    model, ref, opt = _train(rank, W, "adam", steps=2, reshard_every=1)
    sd, osd = full_state_dict(model.module), full_optim_state(model, opt)
    if rank == 0:
        torch.save({"world_size": W, "model": sd, "optim": osd}, _HANDOFF["path"])


def scenario_ckpt_load(rank, W):
    """The checkpoint of another world size loaded into fssdp(make_net(seed=7)) at this W (other
    owners, memory cap and rank count): the full state reads back bit for bit, then 3 Adam steps
    with re-sharding on this W's batch equal the single device resumed from the same file."""
    from moekit.parallel.fssdp import full_optim_state, load_full_optim_state

    ck = torch.load(_HANDOFF["path"], weights_only=True)
    assert ck["world_size"] != W, "the test must resume at another world size"
    model = fssdp(make_net(seed=7), memory_cap=1, reshard_every=1)
    load_full_state_dict(model.module, ck["model"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    attach_optimizer(model, opt)
    load_full_optim_state(model, opt, ck["optim"])
    sd2, osd2 = full_state_dict(model.module), full_optim_state(model, opt)
    assert sd2.keys() == ck["model"].keys() and osd2.keys() == ck["optim"].keys()
    for k, v in ck["model"].items():
        assert torch.equal(sd2[k], v), k
    for n, st in ck["optim"].items():
        for k, v in st.items():
            assert torch.equal(osd2[n][k], v), (n, k)
    ref = make_net(seed=9)
    ref.load_state_dict(ck["model"])
    x, gy, bounds = batch(W, seed=3)
    _steps(ref, model, _adam_resumed(ref, ck["optim"]), opt, x, gy, bounds[rank], bounds[rank + 1], W, 3)
    _compare(model, ref, dict(rtol=1e-5, atol=1e-5), f"resumed at W={W} from W={ck['world_size']}")


HANDOFF = {"ckpt_save": scenario_ckpt_save, "ckpt_load": scenario_ckpt_load}


def run_handoff(rank, W, port, names, out_dir, path):
    _HANDOFF["path"] = path
    run_scenarios(HANDOFF, rank, W, port, names, out_dir)


SCENARIOS = {"sparse": scenario_sparse, "train": scenario_train, "remat": scenario_remat,
             "reshard": scenario_reshard, "losses": scenario_losses, "fsdp2": scenario_fsdp2,
             "state_dict": scenario_state_dict,
             "disagree": scenario_disagree, "dispatch": scenario_dispatch, "errors": scenario_errors}


def run(rank, W, port, names, out_dir):
    run_scenarios(SCENARIOS, rank, W, port, names, out_dir)
