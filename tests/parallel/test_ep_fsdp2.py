"""The FSDP2 recipe on gloo at W in {2, 4}: dense parameters under fully_shard over a 1-D CPU
DeviceMesh (the root only, the MoE layers as their own units, every layer, or nested units),
expert parameters expert parallel and ignored by FSDP, expert grads finished by
reduce_expert_grads(world_average=True).
Forward output, input grads and every parameter grad at step 0, and every parameter after 3 SGD /
3 Adam steps (gathered: experts by full_state_dict, dense by DTensor.full_tensor) equal the
single-device model trained on the global batch with the mean of the ranks' losses (fp64, 1e-9
relative, Adam 1e-6 absolute; fp32 1e-5), also with aux/z losses; a control run without
world_average must differ; bad input. One spawned process group per W runs every scenario."""
from __future__ import annotations


import pytest

from _harness import assert_ok, spawn
import _fsdp2_worker

SCENARIOS = list(_fsdp2_worker.SCENARIOS)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def world(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"fsdp2_{W}")
    spawn(_fsdp2_worker.run, W, SCENARIOS, str(out))
    return W, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fsdp2_recipe_matches_single_device(world, scenario):
    W, out = world
    assert_ok(out, scenario, range(W))
