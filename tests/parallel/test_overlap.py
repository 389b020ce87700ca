"""Overlapped expert parallelism ("chunked": Tutel's pipelining, "fine": Comet's dependency-ordered
pieces) on gloo at W in {2, 3, 4}: bit for bit equal to the non-overlapped layer on integer-valued
data for every chunk count (output, input grads, expert and router grads), a rank with no tokens
and one with T=1; equal to the single-device model (fp64) forward, backward and after 3 Adam
steps; capacity drops; all tokens on one expert; activation checkpointing of both kinds; the
"auto" tuner (one choice per shape key, the same on every rank, no retune for a seen key); bad
arguments. The NCCL posting order (grouped waves) runs on gloo too: the bit-for-bit scenario
again with it forced, and its wave schedule checked rank-symmetric without processes (W=2..5);
which transport each backend gets."""
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


@pytest.mark.parametrize("W", [2, 3, 4, 5])
def test_wave_schedule_is_rank_symmetric(W):
    """The NCCL transport's waves, per rank, without processes: every rank posts the same wave
    labels at the same points, and for every pair (r, q) r's sends to q, in wave order, are q's
    receives from r (same wave, kind, block and rows); every non-empty piece travels once each
    way. Random per-(source, destination, slot) counts with zeros, a rank sending nothing and
    one receiving nothing."""
    import torch

    from moekit.parallel.overlap import ExchangePlan, local_blocks, stages, wave_schedule

    S = 3
    g = torch.Generator().manual_seed(W)
    for trial in range(3):
        counts = torch.randint(0, 5, (W, W, S), generator=g)  # [src, dst, slot]
        counts[counts == 1] = 0
        if trial == 1:
            counts[W - 1] = 0  # sends nothing
            counts[:, 0] = 0  # receives nothing
        for overlap, degrees in (("chunked", (1, 2, 3, 4)), ("fine", (1, 2, 3))):
            for B in degrees:
                plans = [ExchangePlan(r, counts[r].tolist(), counts[:, r].tolist(), B, torch.device("cpu"),
                                      local_blocks(overlap, B)) for r in range(W)]
                sched = [wave_schedule(overlap, plans[r]) for r in range(W)]
                what = f"{overlap} B={B} trial {trial}"
                assert len({tuple((w.label, w.at) for w in s) for s in sched}) == 1, what
                labels = [w.label for w in sched[0]]
                assert len(set(labels)) == len(labels), what
                n_stages = len(stages(overlap, W, 0, B))
                assert all(0 <= i < n_stages for _, i in labels), what
                for r in range(W):
                    for q in range(W):
                        if q == r:
                            continue
                        sends = [(w.label, op.kind, op.block, op.rows) for w in sched[r] for op in w.ops
                                 if op.send and op.peer == q]
                        recvs = [(w.label, op.kind, op.block, op.rows) for w in sched[q] for op in w.ops
                                 if not op.send and op.peer == r]
                        assert sends == recvs, f"{what}: {r} -> {q}"
                        for kind, rows in (("rows", counts[r, q].sum()), ("results", counts[q, r].sum())):
                            assert sum(m[3] for m in sends if m[1] == kind) == rows, f"{what}: {r} -> {q} {kind}"
                        assert all(m[3] > 0 for m in sends), what
                        # results of q's block j go back to q in a later wave than its rows came in
                        came = {op.block: w.label for w in sched[r] for op in w.ops
                                if not op.send and op.peer == q and op.kind == "rows"}
                        for label, kind, j, _ in sends:
                            if kind == "results":
                                assert labels.index(came[j]) < labels.index(label), what


def test_transport_per_backend():
    from moekit.parallel.overlap import resolve_transport

    assert resolve_transport("auto", "gloo", "fine") == "tagged"
    assert resolve_transport("auto", "nccl", "fine") == "waves"
    assert resolve_transport("auto", "cpu:gloo,cuda:nccl", "chunked") == "waves"
    assert resolve_transport("waves", "gloo", "fine") == "waves"
    with pytest.raises(ValueError, match="transport='tagged' needs a gloo group"):
        resolve_transport("tagged", "nccl", "fine")
    with pytest.raises(ValueError, match="gloo or NCCL"):
        resolve_transport("auto", "mpi", "chunked")
