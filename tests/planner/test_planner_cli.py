"""`moekit plan` end to end on the shared traces, and its error messages."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from moekit.cli import main


def _run(capsys, *argv):
    rc = main(["plan", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_mixtral_end_to_end(shared_traces, tmp_path, capsys):
    mix = shared_traces / "mixtral"
    out = tmp_path / "placement.json"
    png = tmp_path / "p.png"
    rc, stdout, err = _run(capsys, "--trace", mix / "experts_coding_mixtral.json", "--score-on",
                           mix / "experts_math_mixtral.json", "--gpus", 4, "--time-limit", 6, "--jobs", 1,
                           "--format", "eplb", "--plot", png, "--out", out)
    assert rc == 0, err
    for name in ("contiguous", "round-robin", "greedy", "ilp-highs", "(oos)"):
        assert name in stdout
    d = json.loads(out.read_text())
    pm = np.array(d["physical_to_logical_map"])
    assert pm.shape == (32, 8) and d["num_gpus"] == 4 and d["slots_per_gpu"] == 2
    assert all(sorted(row) == list(range(8)) for row in pm.tolist())
    assert np.array_equal(np.array(d["phy2log"]), pm) and np.array(d["logcnt"]).shape == (32, 8)
    m, g = d["metrics"], d["comparison"]["greedy"]["metrics"]
    assert m["max_mean_load"] <= g["max_mean_load"] + 1e-9
    assert m["cross_gpu_frac"] < g["cross_gpu_frac"]
    assert "metrics_out_of_sample" in d and d["gap"] >= 0
    # the README's example table: these columns do not depend on the machine
    rows = {line.split("  ")[0].strip(): line.split()[-12:] for line in stdout.splitlines()[2:]}
    assert " ".join(rows["greedy"][:7]) == "1.0471 1.242 1.317 0.7376 0.0000 0.1173 41.36"
    assert " ".join(rows["ilp-highs"][:7]) == "1.0471 1.249 1.327 0.6837 0.0000 0.0901 38.72"
    assert png.stat().st_size > 1000 and f"wrote plot {png}" in err
    assert "ILP stage" not in err and "\r" not in err     # stderr is not a terminal: no progress bars
    # the runtime reads this file back
    from moekit.planner import load_placement
    assert load_placement(out).num_layers == 32


def test_plan_qwen_with_replication(shared_traces, tmp_path, capsys):
    out = tmp_path / "q.json"
    rc, stdout, err = _run(capsys, "--trace", shared_traces / "qwen.route.csv", "--gpus", 16,
                           "--gpus-per-node", 8, "--slots-per-gpu", 10, "--solver", "greedy", "--quiet",
                           "--out", out)
    assert rc == 0, err
    d = json.loads(out.read_text())
    pm = np.array(d["physical_to_logical_map"])
    assert pm.shape == (48, 160) and d["method"].startswith("greedy")
    assert all(len(set(r)) == 128 for r in pm.tolist())
    assert d["metrics"]["memory_per_gpu_bytes"] > 0 and "cross_node_frac" in d["metrics"]


def test_plan_own_format_and_previous(tmp_path, capsys):
    from moekit.planner import RoutingTrace
    rng = np.random.default_rng(0)
    tr = RoutingTrace([rng.integers(0, 8, (50, 2)).astype(np.int32) for _ in range(3)], None, 8)
    tr.topk_ids = [np.sort(a, axis=1) for a in tr.topk_ids]
    for a in tr.topk_ids:
        a[a[:, 0] == a[:, 1], 1] = -1
    tr.save(tmp_path / "t.npz")
    rc, _, err = _run(capsys, "--trace", tmp_path / "t.npz", "--gpus", 2, "--solver", "greedy", "--quiet",
                      "--out", tmp_path / "a.json")
    assert rc == 0, err
    rc, _, err = _run(capsys, "--trace", tmp_path / "t.npz", "--gpus", 2, "--time-limit", 2, "--jobs", 1,
                      "--quiet", "--previous", tmp_path / "a.json", "--out", tmp_path / "b.json")
    assert rc == 0, err
    assert "migration_experts" in json.loads((tmp_path / "b.json").read_text())["metrics"]


@pytest.mark.parametrize("args,msg", [
    (["--gpus", 3], "do not divide evenly over 3 GPUs; pass --slots-per-gpu >= 3"),
    (["--gpus", 4, "--slots-per-gpu", 1], "too few slots: 4 GPUs x 1 slots = 4 < 8 experts; need --slots-per-gpu >= 2"),
    (["--gpus", 2, "--slots-per-gpu", 9], "--slots-per-gpu=9 exceeds the number of experts"),
    (["--gpus", 4, "--gpus-per-node", 3], "--gpus-per-node=3 must divide --gpus=4"),
    (["--gpus", 4, "--inter-node-bw", 0], "--inter-node-bw must be positive (GB/s), got 0"),
    (["--gpus", 0], "--gpus must be positive"),
    ([], "--gpus is required unless the topology is read from this machine (--topology local)"),
])
def test_plan_errors(tmp_path, capsys, args, msg):
    """Hints name the flags a user types, never the library's Python fields."""
    p = tmp_path / "m.json"
    p.write_text(json.dumps({str(l): [[0, 1], [2, 3], [4, 5], [6, 7]] for l in range(2)}))
    rc, _, err = _run(capsys, "--trace", p, *args, "--quiet", "--out", tmp_path / "o.json")
    assert rc != 0 and msg in err and "Traceback" not in err
    assert not any(f in err for f in ("slots_per_gpu", "gpus_per_node", "num_gpus", "inter_node_bw")), err


def test_plan_bad_trace(tmp_path, capsys):
    p = tmp_path / "bad.csv"
    p.write_text("# route_trace v1\n# n_layer=1 n_expert=4 n_expert_used=1\n"
                 "turn,phase,step,layer,slot,expert,weight\n0,0,0,0,0,1,0.5\n0,0,1,0,0,oops,0.5\n")
    rc, _, err = _run(capsys, "--trace", p, "--gpus", 2, "--out", tmp_path / "o.json")
    assert rc != 0 and "line 5" in err and "non-numeric" in err and str(p) in err
    rc, _, err = _run(capsys, "--trace", tmp_path / "missing.json", "--gpus", 2, "--out", tmp_path / "o.json")
    assert rc != 0 and "not found" in err


def test_plan_topology_local_without_nvml(tmp_path, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pynvml", None)   # import pynvml -> ImportError
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"0": [[0, 1]], "1": [[1, 0]]}))
    rc, _, err = _run(capsys, "--trace", p, "--topology", "local", "--out", tmp_path / "o.json")
    assert rc != 0 and "nvidia-ml-py" in err


def test_plan_help_has_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    text = capsys.readouterr().out
    for flag in ("--trace", "--gpus", "--gpus-per-node", "--slots-per-gpu", "--solver", "--time-limit",
                 "--score-on", "--out", "--format", "--topology", "--plot"):
        assert flag in text


def _small_trace(tmp_path, L=3, T=60, seed=0):
    rng = np.random.default_rng(seed)
    p = tmp_path / f"t{seed}.json"
    p.write_text(json.dumps({str(l): [rng.choice(8, 2, replace=False).tolist() for _ in range(T)]
                             for l in range(L)}))
    return p


@pytest.mark.parametrize("flag", ["--out", "--plot"])
@pytest.mark.parametrize("where,msg", [("missing/x.json", "does not exist"), ("", "is a directory")])
def test_output_paths_checked_before_anything(tmp_path, capsys, flag, where, msg):
    """An unusable --out / --plot fails first: the trace named here does not even exist."""
    bad = str(tmp_path / where)
    paths = {"--out": str(tmp_path / "o.json"), "--plot": None, flag: bad}
    argv = ["--trace", tmp_path / "absent.json", "--gpus", 4, "--out", paths["--out"]]
    if paths["--plot"]:
        argv += ["--plot", paths["--plot"]]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and f"{flag} {bad}" in err and msg in err and "not found" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_not_writable(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc, _, err = _run(capsys, "--trace", tmp_path / "absent.json", "--gpus", 4, "--out", ro / "o.json")
    finally:
        ro.chmod(0o700)
    assert rc == 2 and "is not writable" in err


def test_progress_only_on_a_terminal():
    import argparse
    from moekit.cli.plan import show_progress

    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty
    assert show_progress(argparse.Namespace(quiet=False), Stream(True))
    assert not show_progress(argparse.Namespace(quiet=False), Stream(False))
    assert not show_progress(argparse.Namespace(quiet=True), Stream(True))


def test_migration_shows_in_table(tmp_path, capsys):
    tr = _small_trace(tmp_path)
    rc, _, err = _run(capsys, "--trace", tr, "--gpus", 4, "--solver", "greedy", "--no-compare", "--quiet",
                      "--out", tmp_path / "prev.json")
    assert rc == 0, err
    rc, out, err = _run(capsys, "--trace", _small_trace(tmp_path, seed=1), "--gpus", 4, "--time-limit", 2,
                        "--jobs", 1, "--previous", tmp_path / "prev.json", "--out", tmp_path / "new.json")
    assert rc == 0, err
    d = json.loads((tmp_path / "new.json").read_text())
    head, rows = out.splitlines()[0], out.splitlines()[2:]
    assert head.split()[-1] == "migration" and len(rows) == 4
    for row in rows:
        name = row.split()[0]
        key = "ilp" if name.startswith("ilp") else name
        moved = d["comparison"][key]["metrics"]["migration_experts"]
        assert row.endswith(f"{moved} experts")
    assert d["comparison"]["contiguous"]["metrics"]["migration_experts"] > 0


def test_table_without_previous_has_no_migration_column():
    from moekit import planner as P
    rows = P.compare_placements(np.ones((2, 8)), 4, methods=("contiguous",))
    assert "migration" not in P.format_table(rows)


def test_plot_colour_scales_start_at_zero_with_units(tmp_path):
    from moekit import planner as P
    from moekit.planner.plot import placement_figure
    tr = P.read_trace(_small_trace(tmp_path, T=200))
    res = P.plan_placement(tr, 4, solver="greedy")
    assert res.placement.gpu_loads(P.expert_loads(tr)).min() > 0     # a scale from the data would not start at 0
    fig = placement_figure(res.placement, tr)
    images = [im for ax in fig.axes for im in ax.images]
    assert len(images) == 2 and all(im.get_clim()[0] == 0 for im in images)
    labels = [ax.get_ylabel() for ax in fig.axes[2:]]          # the two colour bars
    assert labels == ["token-expert assignments per layer", "expert pairs (tokens x K x K), all layers"]
