"""The console script: help for every command, and the demo end to end (tiny)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
from moekit.cli import COMMANDS, build_parser, main


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


def _parsers():
    """The top-level parser and every subcommand's, by name."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"moekit": parser, **{f"moekit {name}": p for name, p in sub.choices.items()}}


@pytest.mark.parametrize("prog", ["moekit", *(f"moekit {c}" for c in sorted(COMMANDS))])
def test_every_flag_has_help(prog, capsys):
    parser = _parsers()[prog]
    flags = [a for a in parser._actions if a.option_strings]
    assert len(flags) > 1, prog  # more than -h
    for action in flags:
        assert action.help and action.help != argparse.SUPPRESS, f"{prog} {action.option_strings} has no help text"
        assert len(action.help.split()) >= 2, f"{prog} {action.option_strings}: help {action.help!r} explains nothing"
    with pytest.raises(SystemExit) as exc:  # and --help shows every one of them
        main([*prog.split()[1:], "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: " + prog)
    for action in flags:
        assert action.option_strings[-1] in out


def test_version_from_the_console_script():
    """The installed `moekit` script prints moekit.__version__, which is also the package metadata's."""
    script = shutil.which("moekit", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the moekit console script is not installed beside this Python (pip install -e .)")
    out = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"moekit {moekit.__version__}"
    assert importlib.metadata.version("moekit") == moekit.__version__


def test_demo_end_to_end_tiny(tmp_path):
    # no --no-progress: stderr is a pipe here, which alone must keep the bar off
    out = _moekit("demo", "--steps", "6", "--layers", "2", "--experts", "4", "--d-model", "32", "--ffn", "48",
                  "--batch-size", "4", "--seq-len", "32", "--corpus-mb", "0.25", "--trace-batches", "2",
                  "--sample-bytes", "8", "--plan-gpus", "2", "--out-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["val_loss_after"] < summary["val_loss_before"]
    assert "expert load over training" in out.stdout
    assert (tmp_path / "routing.trace.npz").exists() and (tmp_path / "model.pt").exists()
    assert "step     1  loss" in out.stdout  # the loss lines go to a pipe; the progress bar does not
    for stream in (out.stdout, out.stderr):
        assert "training:" not in stream and "\r" not in stream
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
