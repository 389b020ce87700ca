"""OffloadedModel.generate_many: several prompts in batches, FIFO or scheduled by predicted routes
(moekit.offload.schedule); every request's tokens equal transformers' greedy ``generate`` (the
prompt alone, and the same batch in memory); on prompts made of two alike pairs the scheduler
pairs them and the run needs fewer distinct experts per decode step than FIFO."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from _offload_models import PROMPT, generation_setup, hf_generate, load_reference  # noqa: E402
from moekit.offload.runner import load_offloaded  # noqa: E402

NEW = 8
# 0 and 4 alike, 1 and 5 alike, 2 and 3 the rest; arrival order pairs FIFO-wise 0-1, 2-3, 4-5
PROMPTS = [PROMPT, [7, 7, 7, 7], PROMPT[:5], [90, 3, 44, 44, 2, 1, 8], PROMPT[3:] + [5], [7, 7, 8, 7, 7]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """family -> (model dir, store dir, transformers' tokens per prompt alone, in-memory model)."""
    root = tmp_path_factory.mktemp("many")
    out = {}
    for fam, (d, store, _) in generation_setup(root, NEW).items():
        ref = load_reference(d)
        out[fam] = (d, store, [hf_generate(ref, p, NEW) for p in PROMPTS], ref)
    return out


def _hf_batch(ref, prompts, batch):
    """transformers' greedy generate on one left-padded batch, in memory."""
    n = max(len(prompts[i]) for i in batch)
    ids = torch.zeros((len(batch), n), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, i in enumerate(batch):
        ids[j, n - len(prompts[i]):] = torch.tensor(prompts[i])
        mask[j, n - len(prompts[i]):] = 1
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, n:].tolist()


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_generate_many_token_identical_and_fewer_experts(setup, family):
    model_dir, store_dir, want, ref = setup[family]
    runs = {}
    for sched in ("fifo", "similar"):
        with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as probe:
            budget = probe.min_budget_bytes               # the tightest budget: one token's working set
        with load_offloaded(model_dir, budget, store_dir=store_dir, progress=False) as om:
            r = om.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=2, schedule=sched)
        assert r.generated_ids == want, (family, sched)   # per request: transformers on the prompt alone
        for b in r.batches:                               # and transformers on the same padded batch
            assert [r.generated_ids[i] for i in b] == _hf_batch(ref, PROMPTS, b)
        assert sorted(i for b in r.batches for i in b) == list(range(len(PROMPTS)))
        m = r.metrics
        assert m["num_requests"] == 6 and m["num_batches"] == 3 and m["new_tokens"] == 6 * NEW
        assert 0 < m["peak_expert_bytes"] <= budget
        assert len(r.batch_metrics) == 3 and all(bm["batch"] == 2 for bm in r.batch_metrics)
        runs[sched] = r
    assert runs["fifo"].batches == [[0, 1], [2, 3], [4, 5]]
    assert runs["fifo"].metrics["predicted_distinct_experts"] is None
    assert sorted(runs["similar"].batches) == [[0, 4], [1, 5], [2, 3]]
    fifo, sim = runs["fifo"].metrics, runs["similar"].metrics
    # measured: olmoe 3.56 -> 3.08 distinct experts per decode step and layer, qwen2_moe 3.38 -> 2.95
    assert sim["distinct_experts_per_decode_pass"] < fifo["distinct_experts_per_decode_pass"]
    assert sim["bytes_per_decode_token"] < fifo["bytes_per_decode_token"]


def test_route_signatures_and_errors(setup):
    model_dir, store_dir, _, _ = setup["olmoe"]
    with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as om:
        idx = om.store.index
        sig = om.route_signatures(PROMPTS)
        assert sig.shape == (len(PROMPTS), len(idx.layers), idx.num_experts) and sig.dtype == bool
        assert (sig.sum(axis=2) <= 2 * idx.top_k).all() and (sig.sum(axis=2) >= idx.top_k).all()
        assert om.cache.stats["prefill"].requests == 0 and om.store.bytes_read == 0   # no expert was read
        # a single prompt: one batch, the plain generate result
        one = om.generate_many([PROMPT], max_new_tokens=3, batch_size=4)
        assert one.batches == [[0]] and one.generated_ids == [om.generate(PROMPT, max_new_tokens=3).generated_ids[0]]
        with pytest.raises(ValueError, match="schedule"):
            om.generate_many(PROMPTS, schedule="random")
        with pytest.raises(ValueError, match="batch_size"):
            om.generate_many(PROMPTS, batch_size=0)
        with pytest.raises(ValueError, match="non-empty"):
            om.generate_many([PROMPT, []])
        with pytest.raises(ValueError, match="signatures"):
            om.generate_many(PROMPTS, signatures=sig[:2])


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
@pytest.mark.parametrize("predictor", ["lookahead", "wholepath"])
def test_generate_many_with_prefetch_at_the_minimum(setup, family, predictor):
    """Batches of 3 (more experts per layer than the quota: streamed) with prefetch reads in flight:
    same tokens, the weights held never over the budget, nothing left in flight."""
    model_dir, store_dir, want, _ = setup[family]
    with load_offloaded(model_dir, "100GiB", store_dir=store_dir, progress=False) as probe:
        budget = probe.min_budget_bytes
    with load_offloaded(model_dir, budget, store_dir=store_dir, prefetch=True, horizon=2, policy="predictive",
                        prefetch_predictor=predictor, progress=False) as om:
        r = om.generate_many(PROMPTS, max_new_tokens=NEW, batch_size=3)
        assert r.generated_ids == want
        assert 0 < r.metrics["peak_expert_bytes"] <= budget
        assert om.weights.bytes_held == om.cache.bytes_used and not om.runtime.pending
        assert sum(m["prefetched"] for m in r.batch_metrics) > 0
