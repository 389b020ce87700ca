"""Offloaded generation (moekit.offload.runner): token for token transformers' own greedy
``generate`` on the model fully in memory, at budgets from all experts down to one token's
working set; the measured expert bytes never exceed the budget; the logits equal the in-memory
patched model (loop backend) bit for bit."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from _offload_models import PROMPT, generation_setup, hf_generate, load_reference, save_model  # noqa: E402
from moekit import hf as H  # noqa: E402
from moekit.offload.cache import ExpertCache  # noqa: E402
from moekit.offload.experts import OffloadedExperts  # noqa: E402
from moekit.offload.runner import load_offloaded  # noqa: E402
from moekit.offload.store import StoreError  # noqa: E402

NEW = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """family -> (model dir, store dir, transformers' greedy tokens, per-layer expert bytes)."""
    root = tmp_path_factory.mktemp("runner")
    out = generation_setup(root, NEW)
    for fam in out:
        assert len(set(out[fam][2])) > 2, "a degenerate reference (one token repeated) would prove little"
    return out


def _budgets(om):
    """All experts, two in between, and the minimum."""
    lo, hi = om.min_budget_bytes, om.store.index.total_bytes
    return [hi, (lo + hi) // 2, lo + (hi - lo) // 5, lo]


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("policy", ["predictive", "lru", "lfu", "static"])
def test_tokens_equal_hf_generate_at_every_budget(setup, family, policy):
    model_dir, store_dir, want = setup[family]
    probe = load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False)
    budgets = _budgets(probe)
    probe.close()
    seen_streaming = False
    for budget in budgets:
        with load_offloaded(model_dir, budget, store_dir=store_dir, policy=policy, progress=False) as om:
            # nothing of the experts is a parameter or buffer of the model
            assert not [k for k in om.model.state_dict() if ".experts." in k]
            assert all(isinstance(l.experts, OffloadedExperts) for _, l in H._patched(om.model))
            r = om.generate(PROMPT, max_new_tokens=NEW)
            assert r.generated_ids[0] == want, (family, policy, budget)
            m = r.metrics
            assert 0 < m["peak_expert_bytes"] <= budget, (budget, m["peak_expert_bytes"])
            assert m["peak_expert_bytes"] == om.weights.peak_bytes and m["budget_bytes"] == budget
            assert m["new_tokens"] == NEW and m["prompt_tokens"] == len(PROMPT) and m["tokens_per_s"] > 0
            # every byte read is a demand load the cache decided (no prefetch here)
            st = om.cache.stats
            assert m["bytes_read"] == st["prefill"].bytes_loaded + st["decode"].bytes_loaded
            assert om.weights.bytes_held == om.cache.bytes_used
            seen_streaming |= st["prefill"].streamed > 0
            if budget == budgets[0]:  # everything fits: each expert is read at most once
                assert m["bytes_read"] <= m["expert_bytes_total"]
    assert seen_streaming  # the minimum budget made the prefill stream experts through the last slot


def test_logits_bit_equal_in_memory_loop_backend(setup):
    model_dir, store_dir, _ = setup["qwen2_moe"]
    ref = H.patch_model(load_reference(model_dir), backend="loop")
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as big, torch.no_grad():
        assert torch.equal(big.model(x).logits, ref(x).logits)
    with load_offloaded(model_dir, _min(setup, "qwen2_moe"), store_dir=store_dir, progress=False) as om, \
            torch.no_grad():
        assert torch.equal(om.model(x).logits, ref(x).logits)
        assert om.weights.peak_bytes <= om.budget_bytes


def _min(setup, family):
    model_dir, store_dir, _ = setup[family]
    with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as om:
        return om.min_budget_bytes


def test_ram_tier_and_page_cache_modes(setup):
    model_dir, store_dir, want = setup["olmoe"]
    lo = _min(setup, "olmoe")
    for kw in (dict(tier="ram"), dict(page_cache="drop"), dict(page_cache="direct", verify=False),
               dict(overlap_misses=False)):
        with load_offloaded(model_dir, lo, store_dir=store_dir, progress=False, **kw) as om:
            r = om.generate(PROMPT, max_new_tokens=NEW)
            assert r.generated_ids[0] == want, kw
            assert r.metrics["peak_expert_bytes"] <= lo


def test_overlapped_misses_same_logits_same_reads(setup):
    """Misses read on the reader thread while the resident experts compute: the logits and every
    read equal plain on-demand loading; the overlap really ran (reads timed on the reader)."""
    model_dir, store_dir, _ = setup["qwen2_moe"]
    lo = _min(setup, "qwen2_moe")
    x = torch.tensor([PROMPT, PROMPT[::-1]])
    got = {}
    for overlap in (True, False):
        with load_offloaded(model_dir, lo + lo // 3, store_dir=store_dir, progress=False,
                            overlap_misses=overlap) as om, torch.no_grad():
            logits = om.model(x).logits
            st = om.runtime.stats
            got[overlap] = (logits, st.loads, st.bytes_loaded, st.miss_read_seconds)
            assert not om.runtime.pending_misses and om.weights.bytes_held == om.cache.bytes_used
            assert om.weights.peak_bytes <= om.budget_bytes
    assert torch.equal(got[True][0], got[False][0])
    assert got[True][1:3] == got[False][1:3] and got[True][1] > 0
    assert got[True][3] > 0 and got[False][3] == 0


def test_budget_below_minimum_refused_with_minimum(setup):
    model_dir, store_dir, _ = setup["olmoe"]
    lo = _min(setup, "olmoe")
    with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as om:
        assert lo == ExpertCache.min_budget(om.store.expert_bytes, 2) == 3 * 2 * om.store.expert_bytes[0]
    with pytest.raises(ValueError, match=rf"minimum is {lo} bytes"):
        load_offloaded(model_dir, lo - 1, store_dir=store_dir, progress=False)


def test_first_use_converts_store_next_to_model(tmp_path):
    d = save_model("olmoe", tmp_path / "m", seed=3)
    with load_offloaded(d, "1GiB", progress=False) as om:
        assert om.store_dir == tmp_path / "m.moekit-experts" and (om.store_dir / "index.json").exists()
        assert om.generate(PROMPT[:4], max_new_tokens=3).generated_ids[0] == \
            hf_generate(load_reference(d), PROMPT[:4], 3)


def test_corrupt_store_during_generation_names_file(setup, tmp_path):
    import shutil

    model_dir, store_dir, _ = setup["olmoe"]
    broken = tmp_path / "broken"
    shutil.copytree(store_dir, broken)
    f = broken / "layer_000.bin"
    data = bytearray(f.read_bytes())
    for i in range(0, len(data), 4096):  # every blob of layer 0
        data[i + 11] ^= 0x55
    f.write_bytes(bytes(data))
    with load_offloaded(model_dir, "1GiB", store_dir=broken, progress=False) as om:
        with pytest.raises(StoreError, match=r"layer_000\.bin: corrupt blob"):
            om.generate(PROMPT, max_new_tokens=2)
        assert not om.runtime.pending_misses  # the layer's other reads settled, none left in flight
