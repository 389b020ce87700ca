"""Packaging of the `moekit` distribution: the build is free of setuptools warnings, the
metadata carries an SPDX license and moekit.__version__, and the console script is declared.

The wheel is built offline from a copy of the tree with the setuptools already installed
(torch itself needs setuptools >= 77), every warning turned into an error."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moekit

REPO = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_uses_current_setuptools_metadata():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # SPDX string, not the deprecated table
    assert "setuptools>=77" in meta["build-system"]["requires"]  # the first setuptools that reads it
    assert "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "moekit.__version__"}
    assert meta["project"]["scripts"]["moekit"] == "moekit.cli:main"


def _setuptools_version() -> tuple[int, ...]:
    try:
        import setuptools
    except ImportError:
        return (0,)
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())


@pytest.mark.skipif(_setuptools_version() < (77,), reason="needs setuptools >= 77 installed (as torch needs)")
def test_wheel_builds_without_warnings(tmp_path):
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("moekit", "kernels", "planner"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = subprocess.run(
        # -P: src/kernels (moekit.kernels' source) must not shadow the installed kernels
        # distribution, whose setuptools plugin the build imports
        [sys.executable, "-P", "-W", "error", "-c",
         "import sys; from setuptools import build_meta as b; print(b.build_wheel(sys.argv[1]))",
         str(tmp_path / "dist")],
        cwd=src, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})  # else distutils says so
    assert out.returncode == 0, out.stderr[-4000:]
    assert "warn" not in out.stderr.lower(), out.stderr[-4000:]
    wheel = tmp_path / "dist" / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert f"Version: {moekit.__version__}\n" in metadata
    assert "License-Expression: Apache-2.0\n" in metadata
    assert "moekit = moekit.cli:main" in entry_points
    for module in ("moekit/cli/demo.py", "moekit/kernels/__init__.py", "moekit/planner/__init__.py",
                   "moekit/experts/cpu.py", "moekit/dispatch.py"):
        assert module in names


def test_scripts_install_torch_first_from_the_chosen_index():
    """test.sh and demo.sh install the pinned torch through scripts/_venv.sh before moekit (whose
    `torch>=2.6` would otherwise pick any build), from TORCH_INDEX_URL when set."""
    text = (REPO / "scripts" / "_venv.sh").read_text()
    assert "TORCH_INDEX_URL=${TORCH_INDEX_URL-}" in text
    torch_line = next(line for line in text.splitlines() if '"torch==' in line)
    assert '--index-url "$TORCH_INDEX_URL"' in torch_line
    assert text.index(torch_line) < text.index("pip install -q -e ")
    for script in ("test.sh", "demo.sh"):
        assert "source scripts/_venv.sh" in (REPO / "scripts" / script).read_text()
