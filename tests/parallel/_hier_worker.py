"""Runs inside each spawned rank of tests/parallel/test_hierarchical.py: the 2DH all-to-all vs the
flat one on the same splits (outputs and gradients bit for bit), its traffic counters vs
``phase_rows``, bad ``ranks_per_node``, and a peer that stops taking part."""
from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from _harness import record
from moekit.parallel import comm
from moekit.parallel.comm import ExpertParallelError
from moekit.parallel.hierarchical import HierarchicalTopology, all_to_all_rows, phase_rows

D = 5
TIMEOUT = timedelta(seconds=60)


def split_cases(W):
    """Splits matrices S[p, q] = rows p sends q: random uneven with zeros, a rank sending
    nothing, a rank receiving nothing, nothing at all (T = 0 everywhere), everything to rank 0."""
    cases = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        S = torch.randint(1, 6, (W, W), generator=g)
        S[torch.rand(W, W, generator=g) < 0.35] = 0
        cases.append(S)
    S = cases[0].clone()
    S[1] = 0
    cases.append(S)
    S = cases[1].clone()
    S[:, W - 1] = 0
    cases.append(S)
    cases.append(torch.zeros(W, W, dtype=torch.long))
    S = torch.zeros(W, W, dtype=torch.long)
    S[:, 0] = 3
    cases.append(S)
    return cases


def run_both(rank, S, topo, case, row_shape=(D,)):
    """(y, x.grad) of the flat exchange and of the 2DH one on the same rows and output grads."""
    in_splits, out_splits = S[rank].tolist(), S[:, rank].tolist()
    g = torch.Generator().manual_seed(1000 * case + rank)
    x = torch.randn(sum(in_splits), *row_shape, generator=g, dtype=torch.float64)
    gy = torch.randn(sum(out_splits), *row_shape, generator=g, dtype=torch.float64)
    results = []
    for exchange in (lambda t: comm.all_to_all_rows(t, out_splits, in_splits, dist.group.WORLD, TIMEOUT, "flat"),
                     lambda t: topo.exchange(t, out_splits, in_splits, TIMEOUT, "2dh")):
        xr = x.clone().requires_grad_()
        y = exchange(xr)
        (y * gy).sum().backward()
        results.append((y.detach(), xr.grad))
    return results


def check_level(rank, W, L):
    topo = HierarchicalTopology(None, L)
    assert (topo.num_nodes, topo.node, topo.local_rank) == (W // L, rank // L, rank % L), topo
    expect = {"intra_rows": 0, "intra_messages": 0, "inter_rows": 0, "inter_messages": 0}
    cases = split_cases(W)
    for case, S in enumerate(cases):
        (y_flat, g_flat), (y_2dh, g_2dh) = run_both(rank, S, topo, case)
        assert torch.equal(y_flat, y_2dh), f"case {case}: outputs differ\n{S}"
        assert torch.equal(g_flat, g_2dh), f"case {case}: gradients differ\n{S}"
        intra_WW, inter_WW = phase_rows(S, L)
        for phase, M in (("intra", intra_WW), ("inter", inter_WW)):
            sent = [int(M[rank, q]) for q in range(W) if q != rank]
            expect[f"{phase}_rows"] += sum(sent)
            expect[f"{phase}_messages"] += sum(1 for n in sent if n)
    t = topo.traffic
    got = {k: getattr(t, k) for k in expect}
    assert got == expect, f"traffic {got} != expected {expect}"
    assert t.exchanges == len(cases)
    assert t.intra_bytes == t.intra_rows * D * 8 and t.inter_bytes == t.inter_rows * D * 8
    # rows of shape [2, 3] and the drop-in function (forward only)
    S = cases[0]
    (y_flat, g_flat), (y_2dh, g_2dh) = run_both(rank, S, topo, 99, row_shape=(2, 3))
    assert torch.equal(y_flat, y_2dh) and torch.equal(g_flat, g_2dh), "rows [2, 3] differ"
    x = torch.randn(int(S[rank].sum()), D, dtype=torch.float64)
    args = (S[:, rank].tolist(), S[rank].tolist())
    assert torch.equal(all_to_all_rows(x, *args, topo, TIMEOUT, "fn"),
                       all_to_all_rows(x, *args, dist.group.WORLD, TIMEOUT, "fn"))
    # phase_rows: every row crosses nodes at most once; rows for another local index hop once inside
    S = cases[0]
    intra_WW, inter_WW = phase_rows(S, L)
    node, local = torch.arange(W) // L, torch.arange(W) % L
    off = ~torch.eye(W, dtype=torch.bool)
    assert int(inter_WW[off].sum()) == int(S[node[:, None] != node[None, :]].sum())
    assert int(intra_WW[off].sum()) == int(S[local[:, None] != local[None, :]].sum())


def check_bad_ranks_per_node(rank, W):
    for bad, exc, words in ((W + 1 if W % (W + 1) else 3, ValueError, "divisor"), (0, ValueError, "divisor"),
                            (2.0, TypeError, "int"), ([2, 1][rank > 0], ValueError, "differs")):
        try:
            HierarchicalTopology(None, bad)
        except exc as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"ranks_per_node={bad!r} did not raise {exc.__name__}")
    try:
        phase_rows(torch.ones(W, W, dtype=torch.long), 4 if W == 6 else 3)
    except ValueError:
        pass
    else:
        raise AssertionError("phase_rows accepted a bad ranks_per_node")


def check_peer_stops(rank, W, out_dir):
    """The last rank never joins the exchange: the others fail with ExpertParallelError within
    the timeout. Ends the processes (the group is unusable afterwards)."""
    topo = HierarchicalTopology(None, 2)
    dist.barrier()
    if rank == W - 1:
        time.sleep(3)
        os._exit(0)
    S = torch.full((W, W), 2, dtype=torch.long)
    x = torch.randn(2 * W, D)
    t0 = time.time()
    try:
        topo.exchange(x, S[:, rank].tolist(), S[rank].tolist(), timedelta(seconds=2), "exchange under test")
        status = "no error"
    except ExpertParallelError as e:
        took = time.time() - t0
        status = "ok" if took < 6 and "2DH" in str(e) else f"raised after {took:.1f}s: {e}"
    with open(os.path.join(out_dir, f"peer_stops.{rank}"), "w") as f:
        f.write(status)
    os._exit(0)


def run(rank, W, port, names, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=60))
    for name in names:
        if name == "peer_stops":
            check_peer_stops(rank, W, out_dir)  # exits
        record(out_dir, name, rank, (lambda: check_bad_ranks_per_node(rank, W)) if name == "bad_L"
               else (lambda: check_level(rank, W, int(name[1:]))))
        dist.barrier()
    dist.destroy_process_group()
