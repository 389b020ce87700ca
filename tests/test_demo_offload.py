"""The demo's offloaded-generation step: the trained byte LM's experts in a disk store under a
budget below their total generate the same bytes as the model in memory."""
from __future__ import annotations

import json

import pytest
import torch

from moekit import MoEConfig
from moekit.cli import main
from moekit.demo import ByteMoELM
from moekit.demo_offload import expert_bytes_of_model, greedy_generate, offload_generate_check
from moekit.offload.store import DiskStore, StoreMismatchError

# tests/test_cli_demo.py's smallest demo, with the offload step on
TINY = ["--steps", "2", "--layers", "1", "--experts", "4", "--d-model", "16", "--ffn", "16", "--heads", "2",
        "--batch-size", "2", "--seq-len", "16", "--corpus-mb", "0.05", "--trace-batches", "1",
        "--sample-bytes", "0", "--plan-gpus", "0", "--ep-ranks", "0", "--offload-budget", "auto"]


def _model(seed=0):
    torch.manual_seed(seed)
    return ByteMoELM(MoEConfig(hidden_size=32, ffn_hidden_size=32, num_experts=8, top_k=2), n_layers=2, n_heads=2,
                     max_seq_len=64).eval()


@pytest.mark.parametrize("slots", [2, 3, 5, 7])       # per layer: one token's working set .. all but one
def test_offloaded_generation_is_token_identical_within_budget(tmp_path, slots):
    model = _model()
    one, total = expert_bytes_of_model(2, 8, 32, 32)
    budget = 2 * slots * one
    res = offload_generate_check(model, tmp_path / "experts", budget, n_bytes=10)
    assert res.identical and res.generated == greedy_generate(model, b"def ", 10)
    assert res.experts_bytes == total and res.min_budget_bytes == 2 * 2 * one
    assert res.peak_bytes <= budget                        # measured, not the cache's bookkeeping
    assert 0 < res.hit_rate < 1 and res.bytes_per_token > 0 and res.tokens_per_s > 0
    print(f"{slots} slots/layer: hit rate {res.hit_rate:.3f}, {res.bytes_per_token:.0f} B/token")


def test_store_of_another_demo_model_is_refused(tmp_path):
    res = offload_generate_check(_model(), tmp_path / "experts", 2 * 4 * expert_bytes_of_model(2, 8, 32, 32)[0],
                                 n_bytes=2)
    with pytest.raises(StoreMismatchError):
        DiskStore(res.store, expect_config_hash="0" * 64)


def test_demo_offload_step_on_the_trained_model(tmp_path, capsys):
    assert main(["demo", *TINY, "--offload-tokens", "6", "--no-progress", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    off = summary["offload"]
    assert off["identical"] is True and off["tokens"] == 6
    assert off["min_budget_bytes"] <= off["budget_bytes"] < off["experts_bytes"]
    assert off["peak_bytes"] <= off["budget_bytes"]
    assert 0 <= off["hit_rate"] <= 1 and off["bytes_per_token"] > 0 and off["tokens_per_s"] > 0
    assert "token-identical to in-memory generation: yes" in out
    assert (tmp_path / "experts" / "index.json").exists()


def test_offload_flags_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    assert "--offload-budget" in text and "0: skip the step" in text and "--offload-tokens" in text
