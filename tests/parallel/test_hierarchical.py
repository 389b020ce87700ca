"""The 2DH (intra-node, then inter-node) all-to-all on gloo equals the flat one bit for bit,
outputs and gradients, on uneven splits with zeros, a rank sending or receiving nothing and
T = 0: W=4 (L=2, and the degenerate L=1, L=4) and W=6 (L=2, L=3, L=1, L=6). Also: its traffic
counters, bad ranks_per_node, and a peer that stops taking part (an error, not a hang).
One spawned process group per W runs every scenario."""
from __future__ import annotations


import pytest

from _harness import assert_ok, spawn
import _hier_worker

WORLDS = {4: ["L2", "L1", "L4", "bad_L", "peer_stops"], 6: ["L2", "L3", "L1", "L6", "bad_L"]}


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    done = {}

    def results(W):
        if W not in done:
            out = tmp_path_factory.mktemp(f"hier{W}")
            ctx = spawn(_hier_worker.run, W, WORLDS[W], str(out), join=False)
            for p in ctx.processes:
                p.join(timeout=120)
            hung = [p for p in ctx.processes if p.is_alive()]
            for p in hung:
                p.kill()
            assert not hung, f"{len(hung)} rank(s) of W={W} hung"
            done[W] = out
        return done[W]

    return results


@pytest.mark.parametrize("W,scenario", [(W, s) for W, names in WORLDS.items() for s in names],
                         ids=lambda v: f"W{v}" if isinstance(v, int) else v)
def test_hierarchical_all_to_all(world_results, W, scenario):
    out = world_results(W)
    ranks = range(W - 1) if scenario == "peer_stops" else range(W)  # the last rank is the one that stops
    assert_ok(out, scenario, ranks)
