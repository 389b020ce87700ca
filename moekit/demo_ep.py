"""The demo's expert-parallel step: the trained byte-level LM, converted with
:func:`moekit.parallel.expert_parallel` onto a placement planned from its own routing trace,
trains a few steps over W local processes (gloo); the same steps on one process, on the
whole batch, are the reference it is compared with.

Legend: B global batch (sequences), S sequence length, W ranks, L MoE layers, E experts.

Why the two runs take the same steps: rank r takes its slice of the global batch and
backpropagates ``sum(cross-entropy over its tokens) / (tokens in the global batch)``, so the
ranks' losses add up to the global mean loss. Autograd through the all-to-all sums each
expert's gradient over the ranks whose tokens it served, the dense gradients are summed by
one all-reduce, and :func:`~moekit.parallel.reduce_expert_grads` sums the gradients of an
expert's replicas: every rank then holds the gradient of the global batch's mean loss, and
Adam takes the single-process step. The MoE aux loss is not a sum over tokens (it multiplies
batch-wide load shares by mean router probabilities); the expert-parallel layer computes each
rank's share of the global batch's aux loss (global counts and token number), so the shares'
gradients add up to the single process's, and both runs train with it. The losses printed
are the language-model loss alone.
"""
from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.demo import ByteMoELM
from moekit.layer import moe_layers

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, S], targets [B, S]) int64


class EPStepError(RuntimeError):
    """The expert-parallel step failed: a rank raised or died, or the run passed its timeout."""


@dataclass
class EPStepResult:
    world_size: int
    placement: str  # the plan the ranks used: its path, or "dict", "Placement", "contiguous"
    slots_per_rank: int
    replicated_experts: list[list[int]]  # [L] logical experts with more than one slot
    losses_single: list[float] = field(default_factory=list)  # global-batch loss per step, one process
    losses_ep: list[float] = field(default_factory=list)  # the same, summed over the W ranks
    max_loss_rel_diff: float = float("nan")
    max_param_rel_diff: float = float("nan")  # max over tensors of max|ep - single| / max|single|
    worst_param: str = ""
    bytes_sent_per_rank: list[int] = field(default_factory=list)  # token rows to other ranks, all steps
    seconds: float = 0.0  # the W-process run, start-up included

    def to_json_dict(self) -> dict:
        return {"ranks": self.world_size, "placement": self.placement, "slots_per_rank": self.slots_per_rank,
                "replicated_experts": self.replicated_experts, "losses_single": self.losses_single,
                "losses_ep": self.losses_ep, "max_loss_rel_diff": self.max_loss_rel_diff,
                "max_param_rel_diff": self.max_param_rel_diff, "worst_param": self.worst_param,
                "bytes_sent_per_rank": self.bytes_sent_per_rank, "seconds": round(self.seconds, 2)}


def model_spec(model: ByteMoELM) -> dict:
    """What rebuilds ``model``'s architecture in another process (weights go separately)."""
    return {"moe": model.blocks[0].moe.config, "n_layers": len(model.blocks),
            "n_heads": model.blocks[0].n_heads, "max_seq_len": model.max_seq_len,
            "dtype": model.embed.weight.dtype}


def split_batch(x_BS: torch.Tensor, world_size: int) -> list[torch.Tensor]:
    """Rank r's rows of the global batch: contiguous, sizes differing by at most one."""
    return list(torch.tensor_split(x_BS, world_size, dim=0))


def reference_steps(model: ByteMoELM, batches: list[Batch], lr: float) -> tuple[list[float], dict]:
    """The single-process run: a copy of ``model`` takes one Adam step per global batch.
    Returns (loss per step, final state dict); ``model`` is untouched."""
    ref = copy.deepcopy(model)
    ref.train()
    opt = torch.optim.Adam(ref.parameters(), lr=lr, foreach=False)
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _fill_missing_grads(ref)
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in ref.state_dict().items()}


def ep_train_check(model: ByteMoELM, batches: list[Batch], placement=None, world_size: int = 2,
                   lr: float = 1e-3, timeout: float = 120.0) -> EPStepResult:
    """Train copies of ``model`` for ``len(batches)`` Adam steps two ways, one process on each
    whole batch and ``world_size`` local gloo processes running
    ``expert_parallel(model, placement=placement)`` on a slice each, and compare.

    ``placement``: a ``moekit plan`` JSON path, its dict, or None (contiguous); its
    ``num_gpus`` must be ``world_size``. ``timeout``: seconds the whole multi-process run may
    take; a rank that fails or hangs ends it with :class:`EPStepError` (each collective also
    gives up after ``timeout``). Raises ``ValueError`` for a placement that does not fit the
    model, before any process starts.
    """
    from moekit.parallel.placement import resolve

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not batches:
        raise ValueError("batches is empty: nothing to train on")
    for i, (x, y) in enumerate(batches):
        if x.shape != y.shape or x.dim() != 2:
            raise ValueError(f"batches[{i}]: inputs {tuple(x.shape)} and targets {tuple(y.shape)} must both be "
                             f"[B, S]")
        if x.shape[0] < world_size:
            raise ValueError(f"batches[{i}] holds {x.shape[0]} sequences, fewer than world_size={world_size} "
                             f"ranks: each rank needs at least one")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    layers = [m for _, m in moe_layers(model)]
    E = layers[0].config.num_experts
    plans = resolve(placement, E, world_size, len(layers))  # the same checks the ranks make, up front
    replicated = [[e for e, slots in enumerate(p.replicas()) if len(slots) > 1] for p in plans]
    if isinstance(placement, (str, Path)):
        name, placement = str(placement), str(placement)
    elif placement is None or isinstance(placement, dict):
        name = "contiguous" if placement is None else "dict"
    else:  # a planner Placement: its JSON travels to the ranks
        name, placement = "Placement", placement.to_json_dict()
    result = EPStepResult(world_size, name, plans[0].slots_per_rank, replicated)
    result.losses_single, ref_state = reference_steps(model, batches, lr)

    with tempfile.TemporaryDirectory(prefix="moekit-demo-ep-") as tmp:
        torch.save({"spec": model_spec(model), "state_dict": model.state_dict(), "batches": batches,
                    "placement": placement,
                    "lr": lr}, Path(tmp) / "job.pt")
        start = time.perf_counter()
        _run_ranks(world_size, tmp, timeout)
        result.seconds = time.perf_counter() - start
        out = torch.load(Path(tmp) / "result.pt", weights_only=True)

    result.losses_ep = out["losses"]
    result.bytes_sent_per_rank = out["bytes_sent"]
    result.max_loss_rel_diff = max(abs(a - b) / max(abs(b), 1e-30)
                                   for a, b in zip(result.losses_ep, result.losses_single))
    result.max_param_rel_diff, result.worst_param = max_rel_diff(out["state_dict"], ref_state)
    return result


def max_rel_diff(state: dict, ref: dict) -> tuple[float, str]:
    """Max over the floating-point tensors of ``max|a - b| / max|b|``, and the tensor's name."""
    if state.keys() != ref.keys():
        raise ValueError(f"state dicts differ in keys: {sorted(state.keys() ^ ref.keys())[:5]}")
    worst, name = 0.0, ""
    for k, b in ref.items():
        if not b.is_floating_point():
            continue
        a = state[k].to(b.dtype)
        d = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0
        if d > worst or not name:
            worst, name = d, k
    return worst, name


def ep_table(result: EPStepResult) -> str:
    """Text table: the loss per step both ways, then the parameter difference and the bytes."""
    lines = ["step | single process | expert parallel | rel. diff",
             "-----+----------------+-----------------+----------"]
    for i, (a, b) in enumerate(zip(result.losses_single, result.losses_ep)):
        lines.append(f"{i + 1:4d} | {a:14.6f} | {b:15.6f} | {abs(b - a) / max(abs(a), 1e-30):8.1e}")
    lines.append(f"final parameters (expert parallel gathered with full_state_dict vs single process): max "
                 f"relative difference {result.max_param_rel_diff:.1e} ({result.worst_param})")
    sent = ", ".join(f"rank {r} {_human(b)}" for r, b in enumerate(result.bytes_sent_per_rank))
    lines.append(f"token rows sent to other ranks over {len(result.losses_ep)} steps (forward dispatch + "
                 f"combine; backward sends as much again): {sent}")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _run_ranks(world_size: int, workdir: str, timeout: float) -> None:
    """Start ``python -m moekit.demo_ep RANK ...`` W times (fresh interpreters: nothing of the
    caller's main module runs again in them), wait at most ``timeout``; a rank that fails
    stops the others, and its log's tail goes into the error."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs, logs = [], []
    try:
        for r in range(world_size):
            logs.append(open(Path(workdir) / f"rank{r}.log", "wb"))
            procs.append(subprocess.Popen([sys.executable, "-m", "moekit.demo_ep", str(r), str(world_size),
                                           str(port), workdir, str(timeout)],
                                          stdin=subprocess.DEVNULL, stdout=logs[-1], stderr=subprocess.STDOUT,
                                          env=env))
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                r = failed[0]
                tail = (Path(workdir) / f"rank{r}.log").read_text(errors="replace")[-3000:]
                raise EPStepError(f"the expert-parallel step failed: rank {r} of {world_size} exited with code "
                                  f"{codes[r]}; its output ends with:\n{tail}")
            if all(c == 0 for c in codes):
                return
            if time.monotonic() >= deadline:
                raise EPStepError(f"the expert-parallel step did not finish within {timeout:g} s on "
                                  f"{world_size} processes; they were stopped")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_missing_grads(model: torch.nn.Module) -> None:
    """A parameter that received no gradient (e.g. a rank's expert slots that got no token)
    gets zeros, so Adam advances its moments as it does on the single-process model."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


# ---- one rank ----------------------------------------------------------------------------------

def _rank_main(rank: int, world_size: int, port: int, workdir: str, timeout: float) -> None:
    """Runs in each spawned process: load the model, convert it, take the steps on this rank's
    slice of every batch; rank 0 writes the losses, the bytes and the gathered state dict."""
    import torch.distributed as dist

    from moekit.parallel import (expert_param_names, expert_parallel, full_state_dict,
                                 reduce_expert_grads)
    from moekit.parallel.comm import wait

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    job = torch.load(Path(workdir) / "job.pt", weights_only=False)  # our own file, written just now
    limit = timedelta(seconds=timeout)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=limit)
    try:
        spec = job["spec"]
        model = ByteMoELM(spec["moe"], n_layers=spec["n_layers"], n_heads=spec["n_heads"],
                          max_seq_len=spec["max_seq_len"]).to(spec["dtype"])
        model.load_state_dict(job["state_dict"])
        expert_parallel(model, placement=job["placement"], timeout=limit)
        model.train()
        experts = set(expert_param_names(model))
        dense = [p for n, p in model.named_parameters() if n not in experts]
        opt = torch.optim.Adam(model.parameters(), lr=job["lr"], foreach=False)
        losses = []
        for x_BS, y_BS in job["batches"]:
            x, y = split_batch(x_BS, world_size)[rank], split_batch(y_BS, world_size)[rank]
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum") / y_BS.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            _fill_missing_grads(model)
            reduce_expert_grads(model)  # replicas: sum of the parts of their tokens
            flat = torch.cat([p.grad.reshape(-1) for p in dense] + [loss.detach().reshape(1)])
            wait(dist.all_reduce(flat, async_op=True), limit, "the dense-gradient all-reduce")
            offset = 0
            for p in dense:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            opt.step()
            losses.append(flat[-1].item())
        sent = sum(m.dispatcher.bytes_sent for _, m in moe_layers(model))
        bytes_sent = [None] * world_size
        dist.all_gather_object(bytes_sent, sent)
        state = full_state_dict(model)  # a collective: every rank
        if rank == 0:
            torch.save({"losses": losses, "bytes_sent": bytes_sent, "state_dict": state},
                       Path(workdir) / "result.pt")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":  # one rank, started by _run_ranks
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
