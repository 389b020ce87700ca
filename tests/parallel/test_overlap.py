"""Overlapped expert parallelism ("chunked": Tutel's pipelining, "fine": Comet's dependency-ordered
pieces) on gloo at W in {2, 3, 4}: bit for bit equal to the non-overlapped layer on integer-valued
data for every chunk count (output, input grads, expert and router grads), a rank with no tokens
and one with T=1; equal to the single-device model (fp64) forward, backward and after 3 Adam
steps; capacity drops; all tokens on one expert; activation checkpointing of both kinds; the
"auto" tuner (one choice per shape key, the same on every rank, no retune for a seen key); bad
arguments."""
from __future__ import annotations

import pytest

from _harness import assert_ok, spawn
import _overlap_worker

SCENARIOS = list(_overlap_worker.SCENARIOS)


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def world(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"overlap{W}")
    spawn(_overlap_worker.run, W, SCENARIOS, str(out))
    return W, out


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_overlap_matches_reference(world, scenario):
    W, out = world
    assert_ok(out, scenario, range(W))
