"""Every script in examples/ runs end to end (tiny settings): examples are smoke tests."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMOKE_ARGS = {"train_byte_lm.py": ["--steps", "3", "--trace", "trace.npz"]}


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_example_runs(script, tmp_path):
    args = SMOKE_ARGS.get(script)
    if args is None:
        pytest.fail(f"examples/{script} has no smoke-test arguments in SMOKE_ARGS")
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    if script == "train_byte_lm.py":
        assert (tmp_path / "trace.npz").exists() and "loss" in out.stdout
