"""DCP checkpoints across world sizes: 2 Adam steps at W=4 (contiguous), save; load at W=2
(contiguous, and a placement with replicas), 2 steps, save; load into the plain single-device
model (this process, no process group), 2 steps: equal to 6 uninterrupted single-device steps.
Every save/load is exact: each rank's rows and optimizer state match the logical state, every
replica included. Errors: another model shape, a missing or corrupt directory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _harness import assert_ok, spawn
import _ckpt_worker as w
from _ep_worker import E, make_net
from moekit.parallel import load_checkpoint, save_checkpoint


PHASES = [("w4", 4), ("w2", 2), ("w2_errors", 2)]  # one spawned group of 4; W=2 runs on ranks 0, 1


def _assert_ok(d: Path, phase: str) -> None:
    assert_ok(d, phase, range(dict(PHASES)[phase]))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(d / "other_F", make_net(ffn_hidden_size=8))  # expert w_in [12, 16, 16], not [12, 24, 16]
    spawn(w.run, 4, PHASES, str(d))
    _assert_ok(d, "w4")
    _assert_ok(d, "w2")
    return d


def _logical(dumps: list[dict]) -> dict[str, dict[str, torch.Tensor]]:
    """Ranks' dumps -> each parameter's logical tensors ([E, ...] for expert ones); checks that
    replicated copies (dense params on every rank, an expert's replicas) are bit-equal."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name in dumps[0]:
        fields: dict[str, torch.Tensor] = {}
        seen: dict[str, set] = {}
        for dmp in dumps:
            ids = dmp[name]["ids"]
            for k, v in dmp[name].items():
                if k == "ids":
                    continue
                if ids is None or v.dim() == 0:
                    if k in fields:
                        assert torch.equal(fields[k], v), f"{name}.{k} differs across ranks"
                    fields[k] = v
                    continue
                full = fields.setdefault(k, v.new_zeros(E, *v.shape[1:]))
                for s, e in enumerate(ids):
                    if e in seen.setdefault(k, set()):
                        assert torch.equal(full[e], v[s]), f"{name}.{k}: replicas of expert {e} differ"
                    full[e] = v[s]
                    seen[k].add(e)
        assert all(len(v) == E for v in seen.values()), name
        out[name] = fields
    return out


def _dumps(d: Path, stem: str, W: int) -> dict:
    return _logical([torch.load(d / f"{stem}.{r}.pt") for r in range(W)])


def _plain_load(d: Path, tag: str):
    model = make_net(seed=9)
    opt = w.make_optimizer(model)
    load_checkpoint(d / tag, model, opt)
    return model, opt


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for name in a:
        assert a[name].keys() == b[name].keys(), f"{what}: {name}"
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{what}: {name}.{k}"


def test_save_and_load_are_exact_at_every_world_size_and_placement(ckpt):
    a_w4 = _dumps(ckpt, "A.saved", 4)
    assert a_w4["moe1.experts.w_in"]["exp_avg"].abs().sum() > 0  # Adam state is there to compare
    _assert_same(_dumps(ckpt, "A.loaded_B", 2), a_w4, "W=4 -> W=2 contiguous")
    _assert_same(_dumps(ckpt, "A.loaded_Brep", 2), a_w4, "W=4 -> W=2 replicated")
    _assert_same(_logical([w.state_of(*_plain_load(ckpt, "A"))]), a_w4, "W=4 -> single device")
    for tag in ("B", "Brep"):
        _assert_same(_logical([w.state_of(*_plain_load(ckpt, tag))]), _dumps(ckpt, f"{tag}.saved", 2),
                     f"W=2 {tag} -> single device")


def test_resumed_at_the_same_world_size_is_bitwise_the_uninterrupted_run(ckpt):
    _assert_same(_dumps(ckpt, "resumed_w4", 4), _dumps(ckpt, "uninterrupted_w4", 4), "W=4: 2 steps, ckpt, 4 steps")


def _close(got: dict, want: dict, what: str) -> None:
    """Cross-world-size tolerance: the ranks' partial sums round differently from one global sum
    (grads agree to ~1e-10 in fp64) and Adam divides by sqrt(v), so params drift ~1e-8 apart in
    6 steps; a checkpoint fault (a lost step, moment or replica row) moves them ~lr = 1e-2."""
    for name in want:
        for k in ("param", "exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(got[name][k], want[name][k], rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"{what}: {name}.{k}: {m}")


@pytest.mark.parametrize("tag", ["B", "Brep"])
def test_resumed_across_world_sizes_equals_the_uninterrupted_run(ckpt, tag):
    ref = make_net(seed=0)
    opt_ref = w.make_optimizer(ref)
    w.steps(ref, opt_ref, 6)
    want = _logical([w.state_of(ref, opt_ref)])
    _close(_dumps(ckpt, "uninterrupted_w4", 4), want, "control: 6 steps at W=4 vs one device")
    model, opt = _plain_load(ckpt, tag)  # 2 steps at W=4, 2 at W=2, saved twice
    assert opt.param_groups[0]["lr"] == w.LR and int(opt.state[model.inp.weight]["step"]) == 4
    w.steps(model, opt, 2)
    _close(_logical([w.state_of(model, opt)]), want, f"W=4 -> W=2 ({tag}) -> one device")


def test_each_rank_writes_its_first_replicas_rows(ckpt):
    from moekit.parallel.checkpoint import read_checkpoint_metadata

    def layout(tag, key):
        md = read_checkpoint_metadata(ckpt / tag)
        files = {idx.offset[0]: info.relative_path for idx, info in md.storage_data.items() if idx.fqn == key}
        return sorted((c.offsets[0], c.sizes[0], files[c.offsets[0]]) for c in md.state_dict_metadata[key].chunks)

    assert layout("A", "model.moe1.experts.w_out") == [(3 * r, 3, f"__{r}_0.distcp") for r in range(4)]
    assert layout("A", "optim.state.moe2.experts.w_in.exp_avg_sq") == [(3 * r, 3, f"__{r}_0.distcp")
                                                                     for r in range(4)]
    # replicated: layer 1 slots [0..5, 11 | 6..11, 0], layer 2 [3, 1, 2, 0, 4, 5, 7 | 6, 8, 9, 10, 11, 3, 7]
    assert layout("Brep", "model.moe1.experts.w_in") == [(0, 6, "__0_0.distcp"), (6, 5, "__1_0.distcp"),
                                                         (11, 1, "__0_0.distcp")]
    assert layout("Brep", "optim.state.moe2.experts.w_out.exp_avg") == [
        (0, 6, "__0_0.distcp"), (6, 1, "__1_0.distcp"), (7, 1, "__0_0.distcp"), (8, 4, "__1_0.distcp")]


def test_plain_dcp_load_reads_the_model_part(ckpt):
    import torch.distributed.checkpoint as dcp

    model = make_net(seed=9)
    sd = model.state_dict()
    with pytest.warns(UserWarning, match="single process"):
        dcp.load({"model": sd}, checkpoint_id=str(ckpt / "Brep"))
    want, _ = _plain_load(ckpt, "Brep")
    for k, t in want.state_dict().items():
        assert torch.equal(sd[k], t), k


def test_errors_at_world_size_2(ckpt):
    _assert_ok(ckpt, "w2_errors")  # another shape, a missing directory: raised on every rank


def test_errors_single_process(ckpt, tmp_path):
    model = make_net()
    opt = w.make_optimizer(model)
    with pytest.raises(ValueError, match=r"model\.moe1\.experts\.w_in has shape \(12, 16, 16\) there but "
                                         r"\(12, 24, 16\) in the model"):
        load_checkpoint(ckpt / "other_F", model)
    small = make_net(ffn_hidden_size=8)
    with pytest.raises(ValueError, match="0 optimizer param groups.*saved without an optimizer"):
        load_checkpoint(ckpt / "other_F", small, w.make_optimizer(small))
    with pytest.raises(ValueError, match="not the model's"):
        load_checkpoint(ckpt / "other_F", small, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere", model)
    with pytest.raises(FileNotFoundError, match="no .metadata"):
        load_checkpoint(tmp_path, model)
    (tmp_path / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read checkpoint metadata"):
        load_checkpoint(tmp_path, model)
    broken = tmp_path / "broken"
    save_checkpoint(broken, model, opt)
    for f in broken.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(broken, model, opt)
