"""`moekit demo` checks its flags before any work and speaks in flags; its progress bar is
for terminals only. The checks run through `moekit.cli.main` with real arguments: each must
fail with exit code 2 and an error naming the flag before anything is trained (nothing on
stdout, where the demo's first line, the model summary, would be)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moekit import MoEConfig
from moekit.cli import main
from moekit.cli.demo import OUT_FILES, flag_hint

# the smallest demo: about a second of training
TINY = ["--steps", "2", "--layers", "1", "--experts", "4", "--d-model", "16", "--ffn", "16", "--heads", "2",
        "--batch-size", "2", "--seq-len", "16", "--corpus-mb", "0.05", "--trace-batches", "1",
        "--sample-bytes", "0", "--plan-gpus", "0", "--ep-ranks", "0", "--offload-budget", "0"]


def _refused(capsys, *argv: str) -> str:
    """Run `moekit demo ARGV`; assert it stopped before training with exit code 2; its error."""
    start = time.perf_counter()
    rc = main(["demo", *argv])
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert out == "", f"work started before the check failed: {out[:500]}"
    assert err.startswith("moekit demo: error: "), err
    assert time.perf_counter() - start < 30
    return err


# ---- --out-dir -----------------------------------------------------------------------------------

def test_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("not a folder")
    err = _refused(capsys, *TINY, "--out-dir", str(f))
    assert f"--out-dir {f} exists and is not a directory" in err
    assert f.read_text() == "not a folder"


def test_out_dir_below_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("")
    err = _refused(capsys, *TINY, "--out-dir", str(f / "sub"))
    assert "--out-dir" in err and "is a file, not a directory" in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_dir_not_writable(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = _refused(capsys, *TINY, "--out-dir", str(ro))
        assert f"--out-dir {ro} is not writable" in err
        err = _refused(capsys, *TINY, "--out-dir", str(ro / "sub"))
        assert f"--out-dir {ro / 'sub'} cannot be created" in err
    finally:
        ro.chmod(0o700)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs (read-only, even for root)")
def test_out_dir_in_a_read_only_place(capsys):
    err = _refused(capsys, *TINY, "--out-dir", "/sys/moekit-demo-out")
    assert "--out-dir /sys/moekit-demo-out cannot be created" in err
    err = _refused(capsys, *TINY, "--out-dir", "/sys/kernel")
    assert "--out-dir /sys/kernel is not writable" in err


def test_out_dir_where_an_output_name_is_a_folder(tmp_path, capsys):
    (tmp_path / OUT_FILES[0]).mkdir()
    err = _refused(capsys, *TINY, "--out-dir", str(tmp_path))
    assert f"{OUT_FILES[0]} there is a directory" in err


def test_bad_flags_do_not_create_the_out_dir(tmp_path, capsys):
    out_dir = tmp_path / "new"
    _refused(capsys, *TINY, "--top-k", "9", "--out-dir", str(out_dir))
    assert not out_dir.exists()


def test_good_out_dir_is_made_and_written(tmp_path, capsys):
    out_dir = tmp_path / "a" / "b"
    assert main(["demo", *TINY, "--no-progress", "--out-dir", str(out_dir)]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out_dir.iterdir()) == ["model.pt", "routing.trace.npz"]  # --plan-gpus 0


# ---- errors in the flags' terms ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--top-k", "9"], "--top-k 9 exceeds --experts 4"),
    (["--d-model", "30", "--heads", "4"], "--d-model 30 must be divisible by --heads 4"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--trace-batches", "0"], "--trace-batches must be >= 1, got 0"),
    (["--plan-gpus", "-1"], "--plan-gpus must be >= 0, got -1"),
    (["--plan-gpus", "3"], "--plan-gpus 3 does not divide --experts 4"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--aux-loss-coef", "-0.1"], "--aux-loss-coef must be a finite number >= 0, got -0.1"),
    (["--corpus-mb", "0.0001", "--seq-len", "64"], "--corpus-mb 0.0001 (104 bytes) is too small for --seq-len 64"),
    (["--ep-ranks", "-1"], "--ep-ranks must be >= 0, got -1"),
    (["--ep-ranks", "1"], "--ep-ranks 1: the expert-parallel step needs at least 2 ranks"),
    (["--ep-ranks", "3"], "--ep-ranks 3 exceeds --batch-size 2"),
    (["--ep-ranks", "2", "--ep-steps", "0"], "--ep-steps must be >= 1, got 0"),
    (["--ep-ranks", "2", "--ep-slots-per-rank", "-1"], "--ep-slots-per-rank must be >= 0, got -1"),
    (["--ep-ranks", "2", "--ep-slots-per-rank", "5"], "--ep-slots-per-rank 5 exceeds --experts 4"),
    (["--ep-ranks", "2", "--ep-slots-per-rank", "1"],
     "--ep-slots-per-rank 1 x --ep-ranks 2 = 2 slots is fewer than --experts 4"),
    (["--offload-budget", "lots"], "--offload-budget: cannot read a byte size from 'lots'"),
    (["--offload-budget", "1KiB"], "--offload-budget 1KiB (1024 bytes) is below one token's working set: 6144 bytes"),
    (["--offload-budget", "1MiB"], "holds every expert (12288 bytes: --layers 1 x --experts 4 x 3072 bytes)"),
    (["--offload-budget", "auto", "--offload-tokens", "0"], "--offload-tokens must be >= 1, got 0"),
])
def test_flag_errors_name_flags(argv, message, tmp_path, capsys):
    err = _refused(capsys, *TINY, *argv, "--out-dir", str(tmp_path / "out"))
    assert message in err
    assert not re.search(r"\b(top_k|num_experts|hidden_size|ffn_hidden_size|n_heads|seq_len)\b", err), err


def test_triton_backend_without_the_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the environment, not a mock: the demo runs on CPU
    err = _refused(capsys, *TINY, "--backend", "triton", "--out-dir", str(tmp_path))
    assert "--backend triton" in err and ("TRITON_INTERPRET=1" in err or "needs triton" in err)


def test_library_errors_are_translated_to_flags():
    """The safety net for rules the CLI does not check itself: MoEConfig's own message, rewritten."""
    with pytest.raises(ValueError) as exc:
        MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=8, top_k=9)
    assert str(exc.value) == "top_k=9 exceeds num_experts=8"
    assert flag_hint(str(exc.value)) == "--top-k 9 exceeds --experts 8"
    assert flag_hint("use MoEConfig(backend='loop')") == "use MoEConfig(--backend loop)"
    assert flag_hint("the expert backend is slow") == "the expert backend is slow"  # plain words stay


# ---- progress bar only on a terminal -----------------------------------------------------------------

def _demo_on_a_terminal(*argv: str) -> tuple[int, str, str]:
    """Run the demo with stderr on a pseudo-terminal: (exit code, what the terminal got, stdout)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moekit.cli", "demo", *argv], stdout=subprocess.PIPE,
                                stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read().decode()
        rc = proc.wait(timeout=300)
    finally:
        os.close(master)
    return rc, b"".join(chunks).decode("utf-8", "replace"), out


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal_only(tmp_path):
    """On a terminal the bar is drawn (to stderr); --no-progress turns it off there too. The piped
    case (no bar, no flag) is test_moekit_cli.py::test_demo_end_to_end_tiny."""
    rc, tty, out = _demo_on_a_terminal(*TINY, "--out-dir", str(tmp_path / "tty"))
    assert rc == 0, tty[-3000:]
    assert "training:" in tty and "2/2" in tty, tty[-2000:]
    assert "step     1  loss" in out and "training:" not in out

    rc, tty, out = _demo_on_a_terminal(*TINY, "--no-progress", "--out-dir", str(tmp_path / "off"))
    assert rc == 0, tty[-3000:]
    assert "training:" not in tty and "step     1  loss" in out
