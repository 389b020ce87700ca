"""Runs inside each spawned rank of tests/parallel/test_ep_checkpoint.py: Adam steps on one fixed
global batch (each rank its slice), DCP checkpoints saved and loaded at W = 4 and 2, contiguous
and replicated placements; dumps of each rank's state for exact comparisons in the test."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from _harness import record
from _ep_worker import DT, D, E, make_net
from moekit.parallel import expert_param_names, expert_parallel, reduce_expert_grads
from moekit.parallel.checkpoint import load_checkpoint, save_checkpoint

T, LR, EPS = 24, 1e-2, 1e-6  # T divides over W = 4, 2, 1


def batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(T, D, generator=g, dtype=DT), torch.randn(T, D, generator=g, dtype=DT)


def replicated_placement(W: int = 2) -> dict:
    """E // W + 1 slots per rank; each layer replicates two experts, one first held by each rank,
    so rank 0 writes non-contiguous rows (a replica on rank 1 is read, not written)."""
    S = E // W + 1
    layer1 = list(range(0, 6)) + [11] + list(range(6, 12)) + [0]
    layer2 = [3, 1, 2, 0, 4, 5, 7] + [6, 8, 9, 10, 11, 3, 7]
    assert W == 2 and len(layer1) == len(layer2) == W * S
    return {"physical_to_logical_map": [layer1, layer2], "num_gpus": W, "slots_per_gpu": S}


def make_optimizer(model):
    return torch.optim.Adam(model.parameters(), lr=LR, eps=EPS)


def steps(model, opt, n: int, rank: int = 0, W: int = 1, group=None) -> None:
    """n Adam steps on the global loss sum(model(x) * gy): each rank its slice of the batch;
    dense grads summed over ``group``, replica grads summed (W = 1: a plain model)."""
    x, gy = batch()
    lo, hi = rank * T // W, (rank + 1) * T // W
    experts = set(expert_param_names(model))
    for _ in range(n):
        opt.zero_grad()
        (model(x[lo:hi]) * gy[lo:hi]).sum().backward()
        if W > 1:
            reduce_expert_grads(model)
            for name, p in model.named_parameters():
                if name not in experts:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=group)
        opt.step()


def dump(model, opt, path: str) -> None:
    torch.save(state_of(model, opt), path)


def state_of(model, opt) -> dict:
    """Each parameter, its optimizer state, and its slots' logical experts (None: not sharded)."""
    out = {}
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 2)[0] if name.endswith(("w_in", "w_out")) else None
        ids = getattr(model.get_submodule(layer).experts, "logical_ids", None) if layer else None
        out[name] = {"ids": ids, "param": p.detach().clone(),
                     **{k: v.clone() for k, v in opt.state.get(p, {}).items()}}
    return out


def ep_model(group=None, placement=None):
    model = expert_parallel(make_net(seed=5), group, placement=placement)  # seed 5: the load overwrites it
    return model, make_optimizer(model)


def phase_w4(rank, W, d, group):
    """Uninterrupted: 6 steps, checkpoint A after 2. Resumed at the same W: load A, 4 steps."""
    model = expert_parallel(make_net(seed=0), group)
    opt = make_optimizer(model)
    steps(model, opt, 2, rank, W, group)
    save_checkpoint(os.path.join(d, "A"), model, opt)
    dump(model, opt, os.path.join(d, f"A.saved.{rank}.pt"))
    steps(model, opt, 4, rank, W, group)
    dump(model, opt, os.path.join(d, f"uninterrupted_w4.{rank}.pt"))
    model, opt = ep_model(group)
    load_checkpoint(os.path.join(d, "A"), model, opt)
    steps(model, opt, 4, rank, W, group)
    dump(model, opt, os.path.join(d, f"resumed_w4.{rank}.pt"))


def phase_w2(rank, W, d, group):
    for tag, placement in (("B", None), ("Brep", replicated_placement(W))):
        model, opt = ep_model(group, placement)
        load_checkpoint(os.path.join(d, "A"), model, opt)
        dump(model, opt, os.path.join(d, f"A.loaded_{tag}.{rank}.pt"))
        steps(model, opt, 2, rank, W, group)
        save_checkpoint(os.path.join(d, tag), model, opt)
        dump(model, opt, os.path.join(d, f"{tag}.saved.{rank}.pt"))


def phase_w2_errors(rank, W, d, group):
    model, opt = ep_model(group)
    try:
        load_checkpoint(os.path.join(d, "other_F"), model, opt)
    except ValueError as exc:
        msg = str(exc)
        assert "model.moe1.experts.w_in" in msg and "(12, 16, 16)" in msg and "(12, 24, 16)" in msg, msg
    else:
        raise AssertionError("a checkpoint of another shape loaded")
    try:
        load_checkpoint(os.path.join(d, "nowhere"), model, opt)
    except FileNotFoundError as exc:
        assert "nowhere" in str(exc), exc
    else:
        raise AssertionError("a missing checkpoint loaded")
    dist.barrier(group)  # every rank still takes part in collectives: the errors came before any


PHASES = {"w4": phase_w4, "w2": phase_w2, "w2_errors": phase_w2_errors}


def run(rank, W, port, phases, out_dir):
    """``phases``: (name, world size) in order; a phase at w < W runs on ranks [0, w) as a subgroup."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=120))
    try:
        groups = {w: dist.new_group(list(range(w))) for w in sorted({w for _, w in phases})}  # every rank, in order
        for name, w in phases:
            if rank < w:
                record(out_dir, name, rank, lambda: PHASES[name](rank, w, out_dir, groups[w]))
            dist.barrier()
    finally:
        dist.destroy_process_group()
