"""A rank that dies or stops taking part mid-step: the others fail with a clear
ExpertParallelError within the configured timeout (3 s here), not a hang."""
from __future__ import annotations

from pathlib import Path

import pytest

from _harness import spawn
import _ep_worker


@pytest.mark.parametrize("mode", ["raise", "hang"])
def test_peer_failure_is_an_error_not_a_hang(tmp_path, mode):
    W = 2
    ctx = spawn(_ep_worker.run_fault, W, mode, str(tmp_path), join=False)
    for p in ctx.processes:
        p.join(timeout=90)
        assert not p.is_alive(), "a rank hung"
    result = Path(tmp_path, "fault.0").read_text()
    assert result.startswith("ExpertParallelError"), result
    seconds = float(result.split("after ")[1].split("s:")[0])
    assert seconds < 30, result
    assert "peer rank" in result and "layer" in result
