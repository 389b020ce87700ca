"""`moekit demo`'s expert-parallel step: the trained model, converted with expert_parallel onto
the placement the demo planned from its own trace, trains over 2 real gloo processes and
matches the single-process run step for step (the library call, moekit.demo_ep, and the CLI)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from moekit import MoEConfig
from moekit.cli import main
from moekit.demo import ByteBatches, ByteMoELM, stdlib_corpus
from moekit.demo_ep import EPStepError, ep_train_check

# fp32: sums over two ranks round differently from one global sum. The losses agree to ~1e-7;
# the parameters after a few Adam steps less closely (measured 1e-6 here, 5e-5 on the default
# demo model), since Adam divides each gradient by its own magnitude and so magnifies the
# rounding of near-zero gradients (the router runs in fp32 whatever the model's dtype)
LOSS_RTOL, PARAM_RTOL = 1e-5, 1e-4


def test_demo_runs_the_ep_step_on_its_own_plan(tmp_path, capsys):
    argv = ["demo", "--steps", "4", "--layers", "2", "--experts", "4", "--d-model", "32", "--ffn", "32",
            "--heads", "2", "--batch-size", "4", "--seq-len", "32", "--corpus-mb", "0.1", "--trace-batches", "2",
            "--sample-bytes", "0", "--plan-gpus", "0", "--ep-ranks", "2", "--ep-steps", "3", "--no-progress",
            "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    ep = json.loads(out.strip().splitlines()[-1])["ep"]
    assert ep["ranks"] == 2 and len(ep["losses_single"]) == len(ep["losses_ep"]) == 3
    for single, parallel in zip(ep["losses_single"], ep["losses_ep"]):
        assert parallel == pytest.approx(single, rel=LOSS_RTOL)
    assert ep["max_loss_rel_diff"] <= LOSS_RTOL
    assert 0 <= ep["max_param_rel_diff"] <= PARAM_RTOL, ep
    assert len(ep["bytes_sent_per_rank"]) == 2 and all(b > 0 for b in ep["bytes_sent_per_rank"])
    # the placement is the demo's own plan for 2 GPUs, with the default spare slot per rank
    plan = json.loads((tmp_path / "placement-ep.json").read_text())
    assert ep["placement"] == str(tmp_path / "placement-ep.json")
    assert ep["slots_per_rank"] == 3 and len(plan["physical_to_logical_map"]) == 2  # layers
    for layer, row in enumerate(plan["physical_to_logical_map"]):
        assert len(row) == 6 and sorted(set(row)) == [0, 1, 2, 3]
        assert ep["replicated_experts"][layer] == sorted(e for e in set(row) if row.count(e) > 1)
    assert all(ep["replicated_experts"])  # 6 slots for 4 experts: two replicas per layer
    assert "single process | expert parallel" in out and "token rows sent to other ranks" in out


def _tiny_model_and_batches(steps=2):
    torch.manual_seed(0)
    model = ByteMoELM(MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, aux_loss_coef=0.01),
                      n_layers=1, n_heads=2, max_seq_len=16)
    data = ByteBatches(stdlib_corpus(1 << 16), batch_size=3, seq_len=16)
    return model, [data.sample() for _ in range(steps)]


def test_library_call_uneven_split_planner_placement():
    """3 sequences over 2 ranks (2 + 1), a planner Placement object with replicas: still the
    single-process steps; the model passed in is left as it was."""
    from moekit import planner

    model, batches = _tiny_model_and_batches()
    plan = planner.plan_placement(np.array([[5.0, 1.0, 1.0, 3.0]]), num_gpus=2, slots_per_gpu=3, solver="greedy")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = ep_train_check(model, batches, placement=plan.placement, world_size=2, lr=1e-2)
    assert res.placement == "Placement" and res.slots_per_rank == 3 and res.replicated_experts[0], res
    assert res.max_loss_rel_diff <= LOSS_RTOL and res.max_param_rel_diff <= PARAM_RTOL, res
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_library_call_rejects_bad_input_before_starting_processes():
    model, batches = _tiny_model_and_batches(1)
    plan = {"num_gpus": 3, "physical_to_logical_map": [[0, 1, 2, 3, 0, 1]]}
    with pytest.raises(ValueError, match="num_gpus=3 but the process group has 2 ranks"):
        ep_train_check(model, batches, placement=plan, world_size=2)
    with pytest.raises(ValueError, match="fewer than world_size=4"):
        ep_train_check(model, batches, world_size=4)
    with pytest.raises(ValueError, match="batches is empty"):
        ep_train_check(model, [], world_size=2)


def test_a_run_past_its_timeout_is_stopped():
    """The ranks cannot even start Python + torch in 0.3 s: the call ends with a clear error
    soon after the timeout instead of waiting on them."""
    model, batches = _tiny_model_and_batches(1)
    start = time.perf_counter()
    with pytest.raises(EPStepError, match="did not finish within 0.3 s"):
        ep_train_check(model, batches, world_size=2, timeout=0.3)
    assert time.perf_counter() - start < 30
