"""moe_align (Triton) vs moe_align_ref (bit-exact) and vs the layout's defining properties."""
from __future__ import annotations

import itertools

import pytest
import torch

pytest.importorskip("triton")

from moekit.kernels import moe_align, moe_align_ref, padded_size  # noqa: E402


def _ids(T, K, E, kind, seed, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    if kind == "drop":
        ids[torch.rand(T, K, generator=g) < 0.25] = -1
    elif kind == "zero_expert" and E > 1:
        ids[ids == E // 2] = (E // 2 + 1) % E  # expert E//2 receives nothing
    elif kind == "one_expert":
        ids[:] = E - 1
    elif kind == "all_dropped":
        ids[:] = -1
    return ids.to(dtype)


def check_layout(lay, ids_TK, E, bm):
    """The documented properties, checked from first principles (not against the ref)."""
    ids = ids_TK.reshape(-1).long().cpu()
    N = ids.numel()
    lay = type(lay)(*(t.cpu().long() for t in lay))
    kept = (ids >= 0).nonzero().squeeze(1)
    counts = torch.bincount(ids[kept], minlength=E)
    assert torch.equal(lay.tokens_per_expert_E, counts)
    assert lay.expert_offsets_E1[0] == 0 and torch.equal(lay.expert_offsets_E1[1:], counts.cumsum(0))
    n_kept = kept.numel()
    s = lay.sorted_slots_N
    assert torch.equal(s[n_kept:], torch.full((N - n_kept,), N))
    for e in range(E):
        a, b = lay.expert_offsets_E1[e], lay.expert_offsets_E1[e + 1]
        seg = s[a:b]
        assert torch.equal(seg, (ids == e).nonzero().squeeze(1))  # ascending slot ids of expert e
        pa, pb = lay.padded_offsets_E1[e], lay.padded_offsets_E1[e + 1]
        assert pa % bm == 0 and (pb - pa) == -(-(b - a) // bm) * bm
        assert torch.equal(lay.padded_slots_P[pa:pa + (b - a)], seg)
        assert (lay.padded_slots_P[pa + (b - a):pb] == N).all()
        blocks = lay.block_expert_B[pa // bm:pb // bm]
        assert (blocks == e).all()
    P = padded_size(N, E, bm)
    assert lay.padded_slots_P.numel() == P and lay.block_expert_B.numel() == P // bm
    end = lay.padded_offsets_E1[E]
    assert (lay.padded_slots_P[end:] == N).all() and (lay.block_expert_B[end // bm:] == -1).all()
    # inverse maps
    dropped = (ids < 0).nonzero().squeeze(1)
    assert (lay.slot_to_sorted_N[dropped] == -1).all() and (lay.slot_to_padded_N[dropped] == -1).all()
    assert torch.equal(s[lay.slot_to_sorted_N[kept]], kept)
    assert torch.equal(lay.padded_slots_P[lay.slot_to_padded_N[kept]], kept)


CASES = list(itertools.product([1, 7, 130], [1, 2, 3], [1, 5, 16], ["rand", "drop", "zero_expert", "one_expert"]))


@pytest.mark.parametrize("T,K,E,kind", CASES)
def test_align_matches_ref_and_properties(device, T, K, E, kind):
    ids = _ids(T, K, E, kind, seed=T * 100 + K * 10 + E)
    for bm in (16, 64):
        lay = moe_align(ids.to(device), E, bm)
        ref = moe_align_ref(ids, E, bm)
        for name, a, b in zip(lay._fields, lay, ref):
            assert a.dtype == torch.int32, name
            assert torch.equal(a.cpu(), b), name
        check_layout(lay, ids, E, bm)


@pytest.mark.parametrize("T,K,E,bm", [(0, 2, 4, 16), (3, 2, 4, 1), (5, 3, 2, 4), (40, 8, 256, 16),
                                      (2000, 2, 8, 64)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_align_edge_shapes(device, T, K, E, bm, dtype):
    ids = _ids(T, K, E, "drop", seed=T + E, dtype=dtype)
    lay = moe_align(ids.to(device), E, bm)
    ref = moe_align_ref(ids, E, bm)
    for name, a, b in zip(lay._fields, lay, ref):
        assert torch.equal(a.cpu(), b), name
    check_layout(lay, ids, E, bm)


def test_all_dropped(device):
    ids = _ids(9, 2, 5, "all_dropped", 0)
    lay = moe_align(ids.to(device), 5, 16)
    assert int(lay.tokens_per_expert_E.sum()) == 0 and (lay.block_expert_B.cpu() == -1).all()
    assert (lay.sorted_slots_N.cpu() == 18).all() and (lay.slot_to_sorted_N.cpu() == -1).all()
    check_layout(lay, ids, 5, 16)


def test_validation(device):
    with pytest.raises(ValueError):
        moe_align(torch.zeros(3, device=device, dtype=torch.int64), 4)
    with pytest.raises(ValueError):
        moe_align(torch.zeros(3, 2, device=device), 4)
    with pytest.raises(ValueError):
        moe_align(torch.zeros(3, 2, device=device, dtype=torch.int64), 4, block_m=12)
    with pytest.raises(ValueError):
        moe_align(torch.zeros(3, 2, device=device, dtype=torch.int64), 0)
    with pytest.raises(ValueError):
        moe_align(torch.full((3, 2), 4, device=device, dtype=torch.int64), 4, check_ids=True)
