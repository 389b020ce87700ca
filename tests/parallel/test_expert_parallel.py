"""Expert parallelism on gloo at W in {2, 3, 4}: forward, input grads, every parameter grad and
parameters after 3 Adam steps equal the single-device layer on the global batch (fp64; Adam steps
within 1e-5, the fp32 router's rounding); bit for bit on integer-valued data (flat, 2DH, capacity,
replicas, every adaptive degree). Uneven token counts with a rank holding none and one holding
T=1; all tokens on one expert; a placement planned by moekit.planner from a recorded trace
(replicas); capacity on the global batch; aux/z losses; the 2DH all-to-all; adaptive parallelism
(every r, switching r between steps); DDP and expert-data-parallel recipes; HF export of an
expert-parallel OLMoE; bad input. One spawned process group per W runs every scenario."""
from __future__ import annotations


import pytest

from _harness import assert_ok, spawn
import _ep_worker

SCENARIOS = list(_ep_worker.SCENARIOS)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def world(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"ep{W}")
    spawn(_ep_worker.run, W, SCENARIOS, str(out))
    return W, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_expert_parallel_matches_single_device(world, scenario):
    W, out = world
    assert_ok(out, scenario, range(W))
