"""benchmarks/shaped_link.py: the simulated link model and rate parsing everywhere; the real
namespace launcher only where it can run (root, iproute2, veth + tbf work), else skipped."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import shaped_link as sl  # noqa: E402

PREFIX = "mslinktest-"   # this test's own namespaces, so the leftover check sees nobody else's runs


def test_parse_rate_and_size():
    assert sl.parse_rate("1gbit") == 10**9
    assert sl.parse_rate("500mbit") == 5 * 10**8
    assert sl.parse_rate("1.5gbit") == 15 * 10**8
    assert sl.parse_rate("100mbps") == 8 * 10**8
    assert sl.parse_rate(2e8) == 2 * 10**8
    for bad in ("fast", "1 gbyte", "10bit"):
        with pytest.raises(ValueError, match="rate"):
            sl.parse_rate(bad)
    with pytest.raises(TypeError):
        sl.parse_rate(True)
    assert sl.parse_size("64kb") == 65536 and sl.parse_size("1mb") == 1 << 20 and sl.parse_size(1500) == 1500


def test_simulated_link_model():
    assert sl.simulated_transfer_time(125_000_000, "1gbit") == pytest.approx(1.0)
    assert sl.simulated_transfer_time(0, "1gbit", latency_s=1e-4) == pytest.approx(1e-4)
    # W=3: rank 0 sends 2 MB in all, rank 2 receives 3 MB in all: the busiest port direction wins
    b = [[9e9, 1e6, 1e6], [0, 9e9, 2e6], [0, 0, 9e9]]
    assert sl.simulated_all_to_all_time(b, 8e6, latency_s=0.5) == pytest.approx(0.5 + 3.0)
    with pytest.raises(ValueError, match="W x W"):
        sl.simulated_all_to_all_time([[0, 1]], "1gbit")
    with pytest.raises(ValueError):
        sl.simulated_transfer_time(-1, "1gbit")


def _leftovers() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@pytest.fixture
def shaped():
    ok, why = sl.available()
    if not ok:
        pytest.skip(f"shaped link unavailable here: {why}")
    yield
    left = _leftovers()
    sl.cleanup(PREFIX)
    assert not left, f"namespaces left behind: {left}"


def _loopback_bps(nbytes: int) -> float:
    """One TCP stream over 127.0.0.1 in the host namespace, unshaped."""
    srv = socket.create_server(("127.0.0.1", 0))

    def rx():
        c, _ = srv.accept()
        got = 0
        while got < nbytes:
            got += len(c.recv(1 << 20))
        c.sendall(b"k")
        c.close()

    th = threading.Thread(target=rx)
    th.start()
    s = socket.create_connection(srv.getsockname())
    t0 = time.perf_counter()
    s.sendall(b"\0" * nbytes)
    s.recv(1)
    dt = time.perf_counter() - t0
    th.join()
    s.close()
    srv.close()
    return 8 * nbytes / dt


def test_two_ranks_over_a_shaped_link(shaped, tmp_path):
    rate, nbytes = 500e6, 8 << 20                   # 8 MiB each way: ~140 ms at 500 Mbit/s
    t0 = time.perf_counter()
    rc = sl.launch("500mbit", 2, [sys.executable, str(REPO / "tests" / "_shaped_link_worker.py"),
                                  str(tmp_path), str(nbytes)], prefix=PREFIX, timeout=60)
    wall = time.perf_counter() - t0
    assert rc == 0
    assert not _leftovers()
    res = [json.loads((tmp_path / f"r{k}.json").read_text()) for k in range(2)]
    loop = _loopback_bps(nbytes)
    for r in res:
        assert r["allreduce_ok"] and r["alltoall_ok"] and r["exchange_ok"], r
        assert r["world"] == 2 and r["rate_env"] == int(rate) and r["master"] == f"{sl.SUBNET}.1"
        assert r["veth_tx_bytes"] >= r["bytes"], r   # the payload went over the shaped veth, not lo
        bps = 8 * r["bytes"] / r["s"]
        assert bps < loop, (bps, loop)
        assert 0.5 * rate < bps < 1.1 * rate, f"achieved {bps / 1e6:.0f} Mbit/s at 500 Mbit/s"
    assert wall < 60


def test_failure_propagates_and_cleans_up(shaped):
    rc = sl.launch("200mbit", 2, ["sh", "-c", 'test "$RANK" = 1 && exit 3; sleep 30'], prefix=PREFIX, timeout=20)
    assert rc == 3                                   # rank 1's code; rank 0 was stopped, not waited for
    assert not _leftovers()


def test_cli_cleanup_removes_a_crashed_run(shaped):
    link = sl.ShapedLink("100mbit", 2, prefix=PREFIX).__enter__()   # as if its launcher were SIGKILLed
    assert len(_leftovers()) == 3
    removed = sl.cleanup(PREFIX)
    assert sorted(removed) == sorted(link.namespaces + [link.hub])
    assert not _leftovers()
