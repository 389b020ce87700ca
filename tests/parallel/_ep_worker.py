"""Runs inside each spawned rank of tests/parallel: the expert-parallel scenarios, each checked
against the single-device layer on the global batch (every rank's tokens concatenated)."""
from __future__ import annotations

import copy
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

import moekit
from _harness import expect as _expect
from _harness import run_scenarios
from moekit import MoEConfig, MoELayer
from moekit.parallel import (ExpertParallelError, expert_param_names, expert_parallel, full_state_dict,
                             load_full_state_dict, reduce_expert_grads)

E, K, D, F_ = 12, 3, 16, 12
DT = torch.float64
TOL = dict(rtol=1e-9, atol=1e-9)  # fp64: sums over ranks round differently from one global sum


class Net(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.inp = nn.Linear(d, d)
        self.moe1 = MoELayer(cfg)
        self.mid = nn.Linear(d, d)
        self.moe2 = MoELayer(cfg)

    def forward(self, x):
        return self.moe2(torch.tanh(self.mid(self.moe1(self.inp(x)))))


def make_net(seed=0, **kw):
    """Aux and z losses are off unless asked for (scenario_losses checks them)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(**{**dict(hidden_size=D, ffn_hidden_size=F_, num_experts=E, top_k=K), **kw})
    net = Net(cfg).to(DT)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MoELayer):
                m.router.weight.normal_(0, 1.0)
    return net


def tokens_per_rank(W, case):
    if case == "uneven":
        return [[5, 0, 7, 1][r % 4] + (r // 4) for r in range(W)]  # rank 1: no tokens, rank 3: one
    return [9] * W


def global_batch(W, case, seed=1):
    counts = tokens_per_rank(W, case)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), D, generator=g, dtype=DT)
    gy = torch.randn(sum(counts), D, generator=g, dtype=DT)
    bounds = [sum(counts[:r]) for r in range(W + 1)]
    return x, gy, bounds


def check_step(rank, W, ref, ep, x, gy, bounds, run=None):
    """Forward, input grads and every parameter grad of ep (this rank's slice) vs ref (global);
    ``run`` (default ep) is what the forward calls, e.g. a wrapper around ep."""
    lo, hi = bounds[rank], bounds[rank + 1]
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * gy).sum().backward()
    xe = x[lo:hi].clone().requires_grad_()
    y_ep = (run or ep)(xe)
    (y_ep * gy[lo:hi]).sum().backward()
    torch.testing.assert_close(y_ep, y_ref[lo:hi], **TOL)
    torch.testing.assert_close(xe.grad, xr.grad[lo:hi], **TOL)
    check_param_grads(ref, ep, TOL)


def check_param_grads(ref, ep, tol):
    """After both backwards: ep's expert grads (replicas summed) equal ref's rows of its slots;
    its dense and router grads summed over ranks equal ref's."""
    reduce_expert_grads(ep)
    ref_params = dict(ref.named_parameters())
    expert_names = set(expert_param_names(ep))
    for n, p in ep.named_parameters():
        if n in expert_names:
            layer = ep.get_submodule(n.rsplit(".", 2)[0])
            idx = torch.tensor(layer.experts.logical_ids)
            torch.testing.assert_close(p.grad, ref_params[n].grad[idx], **tol, msg=lambda m: f"{n}: {m}")
        else:  # dense and router grads: the sum over ranks of the local ones
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            torch.testing.assert_close(g, ref_params[n].grad, **tol, msg=lambda m: f"{n}: {m}")


def train_steps(rank, W, ref, ep, x, gy, bounds, steps=3):
    lo, hi = bounds[rank], bounds[rank + 1]
    opt_r = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt_e = torch.optim.Adam(ep.parameters(), lr=1e-2)
    names = set(expert_param_names(ep))
    for _ in range(steps):
        opt_r.zero_grad()
        (ref(x) * gy).sum().backward()
        opt_r.step()
        opt_e.zero_grad()
        (ep(x[lo:hi]) * gy[lo:hi]).sum().backward()
        reduce_expert_grads(ep)
        for n, p in ep.named_parameters():
            if n not in names:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
        opt_e.step()
    full = full_state_dict(ep)
    for n, t in ref.state_dict().items():
        # Adam divides by sqrt(v): a gradient entry near 0 turns last-bit differences of the
        # sums over ranks (the router computes in fp32) into ~1e-6 of its step; a wrong
        # gradient would be off by ~lr = 1e-2
        torch.testing.assert_close(full[n], t, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"after {steps} Adam steps: {n}: {m}")


def scenario_contiguous(rank, W):
    for case in ("uneven", "even"):
        ref = make_net()
        ep = expert_parallel(copy.deepcopy(ref))
        assert ep.moe1.experts.w_in.shape[0] == E // W
        x, gy, bounds = global_batch(W, case)
        check_step(rank, W, ref, ep, x, gy, bounds)
        ref, ep = make_net(), expert_parallel(make_net())
        train_steps(rank, W, ref, ep, x, gy, bounds)


def scenario_one_expert(rank, W):
    ref = make_net()
    with torch.no_grad():  # every token's top-K is experts 7, 0, 1 (expert 7 on one rank takes all)
        for m in (ref.moe1, ref.moe2):
            m.router.weight.zero_()
            m.router.weight[7] = 3.0
            m.router.weight[0] = 1.0
            m.router.weight[1] = 0.5
    ep = expert_parallel(copy.deepcopy(ref))
    x, gy, bounds = global_batch(W, "uneven")
    x = x.abs() + 0.1  # positive inputs: the router's ranking is fixed
    check_step(rank, W, ref, ep, x, gy, bounds)


def scenario_planned_replicas(rank, W):
    """Closed loop: record a trace on one process, plan W ranks with a spare slot each (the
    planner replicates hot experts), train with that placement: equal to the single device."""
    from moekit.planner import plan_placement

    ref = make_net()
    x, gy, bounds = global_batch(W, "uneven")
    with moekit.trace.record(ref) as rec, torch.no_grad():
        ref(x)
    plan = plan_placement(rec.trace(), num_gpus=W, slots_per_gpu=E // W + 1, solver="greedy")
    placement = plan.to_json_dict()
    assert len(placement["physical_to_logical_map"][0]) > E  # some experts are replicated
    ep = expert_parallel(copy.deepcopy(ref), placement=placement)
    assert ep.moe1.experts.w_in.shape[0] == E // W + 1
    check_step(rank, W, ref, ep, x, gy, bounds)
    ref2, ep2 = make_net(), expert_parallel(make_net(), placement=placement)
    train_steps(rank, W, ref2, ep2, x, gy, bounds)
    # load_full_state_dict round trip
    ep3 = expert_parallel(make_net(seed=5), placement=placement)
    load_full_state_dict(ep3, ref2.state_dict())
    full = full_state_dict(ep3)
    for n, t in ref2.state_dict().items():
        torch.testing.assert_close(full[n], t, rtol=0, atol=0, msg=n)


def scenario_ddp(rank, W):
    """Dense params under DDP (expert params ignored), loss = local mean: the model follows the
    single device on the mean of the ranks' losses, with reduce_expert_grads(world_average=True)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = make_net()
    ep = expert_parallel(make_net())
    DDP._set_params_and_buffers_to_ignore_for_model(ep, expert_param_names(ep))
    ddp = DDP(ep)
    ddp_sgd_steps(rank, W, ref, ep, ddp, *global_batch(W, "even"), "DDP recipe")


def ddp_sgd_steps(rank, W, ref, ep, ddp, x, gy, bounds, what, **reduce_kw):
    """3 SGD steps: ref on the global batch with the mean of the W ranks' losses, ddp on this
    rank's slice; then every parameter (experts gathered) equals ref's."""
    lo, hi = bounds[rank], bounds[rank + 1]
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(3):
        opt_r.zero_grad()
        ((ref(x) * gy).sum() / W).backward()
        opt_r.step()
        opt_e.zero_grad()
        (ddp(x[lo:hi]) * gy[lo:hi]).sum().backward()
        reduce_expert_grads(ep, world_average=True, **reduce_kw)
        opt_e.step()
    full = full_state_dict(ep)  # with expert data parallel: over the 'ep' row (every row the same)
    for n, t in ref.state_dict().items():
        torch.testing.assert_close(full[n], t, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {n}: {m}")


def scenario_errors(rank, W):
    ref = make_net()
    bad = {"physical_to_logical_map": [list(range(E))] * 2, "num_gpus": W + 1, "slots_per_gpu": E // (W + 1) + 1}
    bad["physical_to_logical_map"] = [list(range(E)) + [0] * ((W + 1) * bad["slots_per_gpu"] - E)] * 2
    _expect(ValueError, "num_gpus", lambda: expert_parallel(copy.deepcopy(ref), placement=bad))
    other_model = {"physical_to_logical_map": [list(range(E)) + [0] * W] * 3, "num_gpus": W,
                   "slots_per_gpu": E // W + 1}
    _expect(ValueError, "layers", lambda: expert_parallel(copy.deepcopy(ref), placement=other_model))
    mismatched = make_net(top_k=K if rank == 0 else K - 1)
    _expect(ValueError, "top_k", lambda: expert_parallel(mismatched))
    if E % W == 0:
        odd = make_net()
        for m in (odd.moe1, odd.moe2):
            m.config = m.config.replace(num_experts=E)  # unchanged: placement None needs W | E
    ep = expert_parallel(copy.deepcopy(ref))
    _expect(ValueError, "already", lambda: expert_parallel(ep))


def scenario_capacity(rank, W):
    """Capacity on the global batch: every cf mode and both drop policies drop exactly the
    assignments the single-device layer drops on the concatenated batch (the global capacity
    comes from the global T and counts; cf=0 from the busiest expert over the group)."""
    counts = [[13, 0, 9, 1][r % 4] for r in range(W)]  # rank 1 has no tokens, rank 3 one
    g = torch.Generator().manual_seed(2)
    x = torch.randn(sum(counts), D, generator=g, dtype=DT)
    gy = torch.randn(sum(counts), D, generator=g, dtype=DT)
    bounds = [sum(counts[:r]) for r in range(W + 1)]
    for cf, policy in ((0.5, "probs"), (0.5, "position"), (0.0, "probs"), (-0.5, "probs"), (-0.5, "position")):
        ref = make_net(capacity_factor=cf, drop_policy=policy)
        ep = expert_parallel(copy.deepcopy(ref))
        check_step(rank, W, ref, ep, x, gy, bounds)
        kept_ref = int(ref.moe1.tokens_per_expert.sum())
        kept = ep.moe1.tokens_per_expert.sum().clone()
        dist.all_reduce(kept)
        assert int(kept) == kept_ref, (cf, policy, int(kept), kept_ref)
        if cf != 0:
            assert kept_ref < x.shape[0] * K, f"cf={cf} dropped nothing: the case tests nothing"
        ref, ep = make_net(capacity_factor=cf, drop_policy=policy), expert_parallel(
            make_net(capacity_factor=cf, drop_policy=policy))
        train_steps(rank, W, ref, ep, x, gy, bounds)


def scenario_losses(rank, W):
    """Aux, sequence-aux and z losses of the global batch: each rank's share is computed with the
    global counts and T, so the shares' gradients sum to the single-device ones."""
    kw = dict(aux_loss_coef=0.3, z_loss_coef=0.05, seq_aux_loss_coef=0.2)
    ref = make_net(**kw)
    ep = expert_parallel(copy.deepcopy(ref))
    S = 3  # sequences of 3 tokens: every rank's token count is a multiple of 3
    counts = [S * [1, 0, 2, 3][r % 4] for r in range(W)]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(sum(counts), D, generator=g, dtype=DT)
    gy = torch.randn(sum(counts), D, generator=g, dtype=DT)
    bounds = [sum(counts[:r]) for r in range(W + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    xr = x.clone().view(-1, S, D).requires_grad_()
    (ref(xr) * gy.view(-1, S, D)).sum().backward()
    xe = x[lo:hi].clone().view(-1, S, D).requires_grad_()
    (ep(xe) * gy[lo:hi].view(-1, S, D)).sum().backward()
    for name in ("aux_loss", "z_loss", "seq_aux_loss"):
        share = getattr(ep.moe1, name).clone()
        dist.all_reduce(share)
        # the router computes in fp32: the shares' sum rounds differently from one global mean
        torch.testing.assert_close(share, getattr(ref.moe1, name), rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")
    # the losses' gradients pass through the fp32 router: fp32 rounding (a wrong share, e.g. a
    # local instead of the global T, is off by tens of percent)
    tol = dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(xe.grad.view(-1, D), xr.grad.view(-1, D)[lo:hi], **tol)
    check_param_grads(ref, ep, tol)


def scenario_hierarchical(rank, W):
    """The two-level (2DH) all-to-all gives the single-device results (real two-level at W=4:
    2 nodes of 2; L = W or 1 is the flat exchange), and counts its inter-node traffic."""
    L = 2 if W % 2 == 0 else W
    for case in ("uneven", "even"):
        ref = make_net()
        ep = expert_parallel(copy.deepcopy(ref), ranks_per_node=L)
        x, gy, bounds = global_batch(W, case)
        check_step(rank, W, ref, ep, x, gy, bounds)
        ref, ep = make_net(), expert_parallel(make_net(), ranks_per_node=L)
        train_steps(rank, W, ref, ep, x, gy, bounds)
    topo = ep.moe1.dispatcher.rows_group
    if 1 < L < W:
        assert topo.traffic.exchanges > 0 and topo.num_nodes == W // L


def scenario_expert_data_parallel(rank, W):
    """A 2-D mesh (dp=2, ep=W/2): experts split over each 'ep' row, each row a data-parallel
    copy; dense params under DDP over all W ranks, expert grads summed over 'dp' and averaged
    like DDP: the model follows the single device on the W ranks' global batch."""
    if W % 2:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (2, W // 2), mesh_dim_names=("dp", "ep"))
    ref = make_net()
    ep = expert_parallel(make_net(), mesh["ep"])
    assert ep.moe1.experts.w_in.shape[0] == E // (W // 2)
    DDP._set_params_and_buffers_to_ignore_for_model(ep, expert_param_names(ep))
    ddp = DDP(ep)
    ddp_sgd_steps(rank, W, ref, ep, ddp, *global_batch(W, "uneven"), "EDP recipe",
                  data_parallel_group=mesh["dp"])


def integer_net(E_, D_, F__, **kw):
    """Two MoE layers with small-integer weights, relu experts, K=1 with the weight renormalised
    to exactly 1: every sum is exact in any order."""
    torch.manual_seed(11)
    cfg = MoEConfig(hidden_size=D_, ffn_hidden_size=F__, num_experts=E_, top_k=1, norm_topk_prob=True,
                    activation="relu", **kw)
    model = nn.Sequential(MoELayer(cfg), MoELayer(cfg)).to(DT)
    with torch.no_grad():
        for prm in model.parameters():
            prm.copy_(torch.randint(-1, 2, prm.shape, dtype=DT))
        # layer 2's router at 0: every token to its expert 0 (ties go to the lower id) and no
        # gradient through that router into layer 1's output; through a live router the
        # renormalised weight's gradient (exactly 0 in exact arithmetic) leaves ~1e-16
        # residues whose sums over tokens depend on the order
        model[1].router.weight.zero_()
    return model


def scenario_integer_exact(rank, W):
    """Integer-valued data (weights and inputs small integers, relu experts, K=1 with the weight
    renormalised to exactly 1; the second layer sends every token to one expert): every sum is
    exact in any order, so the parallel paths must give
    the single device's output, input grad and expert grads bit for bit (torch.equal): flat
    all-to-all, a replicated placement, 2DH, capacity, every adaptive degree."""
    from moekit.parallel.adaptive import adaptive_parallel, set_parallel_degree
    from moekit.planner import plan_placement

    def net(E_=E, **kw):
        return integer_net(E_, D, F_, **kw)

    g = torch.Generator().manual_seed(5)
    counts = tokens_per_rank(W, "uneven")
    x = torch.randint(-2, 3, (sum(counts), D), generator=g).to(DT)
    gy = torch.randint(-2, 3, (sum(counts), D), generator=g).to(DT)
    bounds = [sum(counts[:r]) for r in range(W + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]

    def check(ref, par, what):
        xr = x.clone().requires_grad_()
        y_ref = ref(xr)
        (y_ref * gy).sum().backward()
        xe = x[lo:hi].clone().requires_grad_()
        y = par(xe)
        (y * gy[lo:hi]).sum().backward()
        assert torch.equal(y, y_ref[lo:hi]), f"{what}: output"
        assert torch.equal(xe.grad, xr.grad[lo:hi]), f"{what}: input grad"
        assert (y_ref.abs() > 0).any() and (y_ref.abs().max() == y_ref.abs().max().round()), what
        reduce_expert_grads(par)  # replicas: the parts of their tokens summed
        for i in range(2):
            r_exp, p_exp = ref[i].experts, par[i].experts
            if hasattr(p_exp, "shard_of"):
                want = p_exp.shard_of(r_exp.w_in.grad, r_exp.w_out.grad)
            else:
                idx = torch.tensor(p_exp.logical_ids)
                want = (r_exp.w_in.grad[idx], r_exp.w_out.grad[idx])
            assert torch.equal(p_exp.w_in.grad, want[0]) and torch.equal(p_exp.w_out.grad, want[1]), \
                f"{what}: expert grads of layer {i}: max diff {(p_exp.w_in.grad - want[0]).abs().max()} " \
                f"{(p_exp.w_out.grad - want[1]).abs().max()} slots {getattr(p_exp, 'logical_ids', None)} " \
                f"ratio {(p_exp.w_in.grad.flatten(1).norm(dim=1) / want[0].flatten(1).norm(dim=1)).tolist()}"

    check(net(), expert_parallel(net()), "flat all-to-all")
    if W % 2 == 0:
        check(net(), expert_parallel(net(), ranks_per_node=2), "2DH")
    check(net(capacity_factor=1.0, drop_policy="position"),
          expert_parallel(net(capacity_factor=1.0, drop_policy="position")), "capacity 1.0")
    ref = net()
    with moekit.trace.record(ref) as rec, torch.no_grad():
        ref(x)
    plan = plan_placement(rec.trace(), num_gpus=W, slots_per_gpu=E // W + 1, solver="greedy").to_json_dict()
    check(net(), expert_parallel(net(), placement=plan), "replicated placement")
    E_small = {2: 1, 3: 1, 4: 2}[W]
    for E_ in (E, E_small):
        ad = adaptive_parallel(net(E_), r=0)
        for r in ad[0].dispatcher.layout.degrees():
            set_parallel_degree(ad, r)
            ad.zero_grad()
            check(net(E_), ad, f"adaptive E={E_} r={r}")


def scenario_hf_export(rank, W):
    """An expert-parallel HF model (OLMoE patched by moekit.hf) trains a step, then exports like a
    single-device one: full_state_dict -> the unconverted patched model -> moekit.hf.save_pretrained
    -> transformers from_pretrained gives the single-device model's logits."""
    if W != 2:
        return
    import tempfile

    import transformers

    import moekit.hf as H

    cfg = transformers.OlmoeConfig(vocab_size=61, hidden_size=D, intermediate_size=F_, num_experts=E,
                                   num_experts_per_tok=K, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    base = transformers.OlmoeForCausalLM(cfg).train()
    ref = H.patch_model(copy.deepcopy(base))
    ep = expert_parallel(H.patch_model(copy.deepcopy(base)))
    ids = torch.randint(0, 61, (4, 12), generator=torch.Generator().manual_seed(1))
    mine = ids[2 * rank:2 * rank + 2]
    opt_r = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(ep.parameters(), lr=0.1)
    ref(ids, labels=ids).loss.backward()
    opt_r.step()
    (ep(mine, labels=mine).loss / W).backward()  # mean over the 2 ranks' equal-size halves
    reduce_expert_grads(ep)
    for n, prm in ep.named_parameters():
        if n not in set(expert_param_names(ep)) and prm.grad is not None:
            dist.all_reduce(prm.grad)
    opt_e.step()
    full = full_state_dict(ep)
    if rank == 0:
        single = H.patch_model(copy.deepcopy(base))
        single.load_state_dict(full)
        with tempfile.TemporaryDirectory() as d:
            H.save_pretrained(single, d)
            fresh = transformers.OlmoeForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        ref.eval()
        with torch.no_grad():
            got, want = fresh(ids).logits, ref(ids).logits
            before = base.eval()(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert (got - before).abs().max() > 1e-3, "the step changed nothing: the export test tests nothing"
    dist.barrier()


def _check_adaptive_step(rank, W, ref, ad, x, gy, bounds):
    lo, hi = bounds[rank], bounds[rank + 1]
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    (y_ref * gy).sum().backward()
    xe = x[lo:hi].clone().requires_grad_()
    y = ad(xe)
    (y * gy[lo:hi]).sum().backward()
    torch.testing.assert_close(y, y_ref[lo:hi], **TOL)
    torch.testing.assert_close(xe.grad, xr.grad[lo:hi], **TOL)
    ref_params = dict(ref.named_parameters())
    for name in ("moe1", "moe2"):
        shard = ad.get_submodule(name).experts
        w_in_g, w_out_g = shard.shard_of(ref_params[f"{name}.experts.w_in"].grad,
                                         ref_params[f"{name}.experts.w_out"].grad)
        torch.testing.assert_close(shard.w_in.grad, w_in_g, **TOL, msg=lambda m: f"{name} w_in grad: {m}")
        torch.testing.assert_close(shard.w_out.grad, w_out_g, **TOL, msg=lambda m: f"{name} w_out grad: {m}")
    for n, p in ad.named_parameters():
        if ".experts." not in n:
            g = p.grad.clone()
            dist.all_reduce(g)
            torch.testing.assert_close(g, ref_params[n].grad, **TOL, msg=n)


def scenario_adaptive(rank, W):
    """Tutel's adaptive parallelism: E >= W (E=12: r in {0, 1}) and E < W (each expert's F
    columns sharded over W/E ranks: r in {0, divisors of W/E}). Every r gives the single-device
    result (forward, input grad, every grad); switching r every step of 3 Adam steps ends
    where the single device does; 'auto' picks some valid r and logs it."""
    from moekit.parallel.adaptive import adaptive_parallel, set_parallel_degree

    E_small = {2: 1, 3: 1, 4: 2}[W]
    for kw in (dict(), dict(num_experts=E_small, top_k=1), dict(num_experts=E_small, top_k=1, activation="gelu")):
        ref = make_net(**kw)
        ad = adaptive_parallel(copy.deepcopy(ref), r=1)
        degrees = ad.moe1.dispatcher.layout.degrees()
        assert degrees == ([0, 1] if not kw else [0] + [d for d in range(1, W // E_small + 1) if (W // E_small) % d == 0])
        x, gy, bounds = global_batch(W, "uneven")
        for r in degrees:
            set_parallel_degree(ad, r)
            ref.zero_grad()
            ad.zero_grad()
            _check_adaptive_step(rank, W, ref, ad, x, gy, bounds)
            assert ad.moe1.dispatcher.last_r == r
        # switch r every step: parameters follow the single device
        ref, ad = make_net(**kw), adaptive_parallel(make_net(**kw), r=0)
        # eps 1e-6: with E=2, K=1 some router gradients are ~1e-9, below Adam's default eps,
        # where Adam turns fp32-router rounding into steps of ~1e-4 (gradients are checked above)
        opt_r = torch.optim.Adam(ref.parameters(), lr=1e-2, eps=1e-6)
        opt_a = torch.optim.Adam(ad.parameters(), lr=1e-2, eps=1e-6)
        lo, hi = bounds[rank], bounds[rank + 1]
        for step in range(3):
            set_parallel_degree(ad, degrees[(step + 1) % len(degrees)])
            opt_r.zero_grad()
            (ref(x) * gy).sum().backward()
            opt_r.step()
            opt_a.zero_grad()
            (ad(x[lo:hi]) * gy[lo:hi]).sum().backward()
            reduce_expert_grads(ad)
            for n, p in ad.named_parameters():
                if ".experts." not in n:
                    dist.all_reduce(p.grad)
            opt_a.step()
        full = full_state_dict(ad)
        for n, t in ref.state_dict().items():
            torch.testing.assert_close(full[n], t, rtol=1e-5, atol=1e-5, msg=lambda m: f"{kw} {n}: {m}")
        ad2 = adaptive_parallel(make_net(seed=7, **kw), r="auto")
        load_full_state_dict(ad2, ref.state_dict())
        full2 = full_state_dict(ad2)
        for n, t in ref.state_dict().items():
            assert torch.equal(full2[n], t), n
        with torch.no_grad():
            torch.testing.assert_close(ad2(x[lo:hi]), ref(x)[lo:hi], **TOL)
        assert ad2.moe1.dispatcher.last_r in degrees
    _expect(ValueError, "valid", lambda: adaptive_parallel(make_net(num_experts=E_small, top_k=1), r=W + 1))
    if W == 4:
        _expect(ValueError, "divide", lambda: adaptive_parallel(make_net(num_experts=3, top_k=1), r=0))


SCENARIOS = {"contiguous": scenario_contiguous, "one_expert": scenario_one_expert,
             "planned_replicas": scenario_planned_replicas, "ddp": scenario_ddp, "errors": scenario_errors,
             "capacity": scenario_capacity, "losses": scenario_losses, "hierarchical": scenario_hierarchical,
             "adaptive": scenario_adaptive, "expert_data_parallel": scenario_expert_data_parallel,
             "integer_exact": scenario_integer_exact, "hf_export": scenario_hf_export}


def run(rank, W, port, names, out_dir):
    run_scenarios(SCENARIOS, rank, W, port, names, out_dir)


def run_fault(rank, W, port, mode, out_dir):
    """Rank W-1 fails mid-step ('raise': raises and exits; 'hang': stays alive but never joins
    the collective); the others must fail with ExpertParallelError within the timeout."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=60))
    ep = expert_parallel(make_net(), timeout=timedelta(seconds=3))
    x, gy, bounds = global_batch(W, "even")
    ep(x[bounds[rank]:bounds[rank + 1]])  # one good step
    if rank == W - 1:
        if mode == "hang":
            time.sleep(12)
        os._exit(0)
    t0 = time.time()
    try:
        ep(x[bounds[rank]:bounds[rank + 1]])
        result = "no error"
    except ExpertParallelError as exc:
        result = f"ExpertParallelError after {time.time() - t0:.1f}s: {exc}"
    with open(os.path.join(out_dir, f"fault.{rank}"), "w") as f:
        f.write(result)
    os._exit(0)
