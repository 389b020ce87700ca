"""The console script: help for every command, and the demo end to end (tiny)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moekit.cli import COMMANDS, main


def _moekit(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "moekit.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "usage: moekit " + command in out
    flags = [line.split()[0] for line in out.splitlines() if line.strip().startswith("--")]
    assert flags, out
    for line in out.splitlines():  # argparse puts help on the flag's line or the next; none is bare
        s = line.strip()
        if s.startswith("--") and len(s.split()) == 1:
            idx = out.splitlines().index(line)
            assert out.splitlines()[idx + 1].strip(), f"{s} has no help text"


def test_demo_end_to_end_tiny(tmp_path):
    out = _moekit("demo", "--steps", "6", "--layers", "2", "--experts", "4", "--d-model", "32", "--ffn", "48",
                  "--batch-size", "4", "--seq-len", "32", "--corpus-mb", "0.25", "--trace-batches", "2",
                  "--sample-bytes", "8", "--plan-gpus", "2", "--no-progress", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert "expert load over training" in out.stdout
    assert (tmp_path / "routing.trace.npz").exists() and (tmp_path / "model.pt").exists()
    from moekit.planner.traces import read_trace
    trace = read_trace(tmp_path / "routing.trace.npz")
    assert trace.num_layers == 2 and trace.num_experts == 4
    placement = json.loads((tmp_path / "placement.json").read_text())
    assert len(placement["physical_to_logical_map"]) == 2


def test_demo_rejects_bad_flags():
    out = _moekit("demo", "--steps", "0")
    assert out.returncode == 2 and "--steps must be >= 1" in out.stderr
    out = _moekit("demo", "--d-model", "30", "--heads", "4", "--steps", "1")
    assert out.returncode == 2 and "divisible" in out.stderr
