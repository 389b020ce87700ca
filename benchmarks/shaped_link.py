#!/usr/bin/env python
"""Run a distributed command with every rank in its own network namespace, joined by a rate-shaped link.

On a small CPU box, gloo over loopback moves bytes as fast as the cores copy them, and the copies
compete with the matmuls for the same cores: wall-clock communication/computation overlap measured
that way is noise. This launcher gives every rank a link that *waits* at a fixed rate instead:

    python benchmarks/shaped_link.py --rate 1gbit --nproc 2 -- .venv/bin/python my_bench.py --flag
    python benchmarks/shaped_link.py --measure               # check the shaping (table below)
    python benchmarks/shaped_link.py --cleanup               # remove what a killed run left behind

Topology (nothing is created in the host's namespace)::

    netns <prefix><id>-r0  [slink0 10.213.0.1/24]--veth--[port0]-+
    netns <prefix><id>-r1  [slink0 10.213.0.2/24]--veth--[port1]-+- br0 in netns <prefix><id>-hub
    ...

Every rank's ``slink0`` egress (what it sends) and the hub's ``port<k>`` egress (what rank k
receives) carry a ``tbf`` qdisc at ``--rate``: each rank has a full-duplex NIC of that rate into a
non-blocking switch. Only the rate is shaped (``netem``, i.e. added delay, is not available on
these machines); the base latency is the veth's (TCP ping-pong round trip 28 us, Python to Python),
plus up to 50 ms of queueing when a port is saturated. ``tbf`` counts Ethernet
frames, so TCP payload tops out at about 1448/1514 = 95.6 % of the configured rate.

Each rank runs ``CMD`` through ``ip netns exec`` with MASTER_ADDR (rank 0's address), MASTER_PORT,
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and GLOO_SOCKET_IFNAME=slink0 set, plus
SHAPED_LINK_RATE_BPS (the configured rate in bit/s, for reports). ``init_process_group("gloo")``
with the default ``env://`` init rendezvouses over the shaped link; there is no other route
between the namespaces, so no traffic can fall back to loopback. The launcher waits for every
rank, stops the others when one fails (its exit code is returned, 128+N for signal N), and always
deletes the namespaces (which removes veths, bridge and qdiscs with them), on failure and Ctrl-C
too. ``--cleanup`` removes namespaces named with the prefix left by a run that was SIGKILLed.

A rank script must join through ``env://`` (``init_process_group("gloo")`` with RANK set), not
spawn its own ranks on 127.0.0.1. From Python (a script in ``benchmarks/`` has this folder on
``sys.path``)::

    from shaped_link import available, launch, simulated_all_to_all_time
    ok, why = available()                     # root, ip netns, veth and tbf really work
    rc = launch("1gbit", 2, [sys.executable, "bench.py", "--rank-mode"]) if ok else ...

Needs root, iproute2 (``ip``, ``tc``), and a kernel with network namespaces, veth, bridge and the
tbf qdisc.

Measured with ``--measure`` (2026-12-02, the 2-core AMD EPYC CPU box, kernel 6.18, torch 2.13.0
gloo, tbf burst = max(64 KiB, 2 ms at the rate), queue 50 ms, W=2, median of 3). Goodput =
payload bytes each way / time; TCP over Ethernet frames tops out at 0.956 x the rate:

    rate     TCP one way   gloo p2p exchange   gloo all_to_all_single
    200mbit  0.960         0.934-0.950         0.48
    500mbit  0.960         0.949               0.49
    1gbit    0.959-0.960   0.929-0.946         0.47
    2gbit    0.959         0.922               0.47
    5gbit    0.960         0.876               0.43
    W=4 at 500mbit: TCP 0.955, p2p 0.84, all_to_all_single 0.63

The sender's veth counted 1.00-1.05 x the payload in every probe: the bytes crossed the shaped
link. Unshaped, the same namespaces move TCP at ~12 Gbit/s (gloo p2p ~7.6, all_to_all_single
~4.7 Gbit/s each way); loopback TCP in one process in the host namespace ~5-6 Gbit/s. While a
transfer waits on the link, each rank's process used 0.1-0.3 s CPU per second of wall time.

gloo's ``all_to_all_single`` (alltoall / alltoallv) reaches about half the rate in each direction
on this full-duplex link, while the same exchange through ``batch_isend_irecv`` with every
receive posted before the sends runs at the full rate both ways (posting a send before its
receive also halved it at 200mbit): gloo, not the link, serialises the two directions. An
all-to-all measured on this link therefore costs ~2x bytes / rate with gloo's collective.
c10d prints "The hostname of the client socket cannot be retrieved": the namespaces have no
DNS; harmless.

Where namespaces are unavailable (no root, a container without CAP_NET_ADMIN), a benchmark can
fall back to the SIMULATED link model below, :func:`simulated_transfer_time` and
:func:`simulated_all_to_all_time` (time = latency + bytes / rate, per-port full duplex as above).
A simulated link computes a time; it moves no bytes, so it measures nothing about overlap by
itself. Results obtained with it must be labelled simulated.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PREFIX = "mslink-"              # every namespace this tool creates starts with this
IFNAME = "slink0"               # the rank-side veth, the same name in every rank namespace
SUBNET = "10.213.0"             # rank k gets SUBNET.(k+1)/24; namespaces are private, no host clash
DEFAULT_PORT = 29500
MAX_NPROC = 250

_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
          "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_rate(rate) -> int:
    """A rate in tc's spelling ("1gbit", "200mbit", "1.5gbit", "100mbps" = megabytes/s) or a number
    of bit/s -> bit/s as an int."""
    if isinstance(rate, bool):
        raise TypeError(f"rate must be a str or a number, got {rate!r}")
    if isinstance(rate, (int, float)):
        bps = float(rate)
    elif isinstance(rate, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", rate)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"rate: cannot parse {rate!r}; use e.g. '500mbit', '1gbit' or bit/s")
        bps = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise TypeError(f"rate must be a str or a number, got {type(rate).__name__}")
    if not bps >= 8000:
        raise ValueError(f"rate: {rate!r} is below 8 kbit/s")
    return int(bps)


def parse_size(size) -> int:
    """Bytes from "64kb", "1mb", "65536" (tc's kb/mb are 1024-based)."""
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(b|kb|k|mb|m|)\s*", str(size).lower())
    if not m:
        raise ValueError(f"size: cannot parse {size!r}; use e.g. '64kb' or bytes")
    return int(float(m.group(1)) * {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20}[m.group(2)])


def default_burst(rate_bps: int) -> int:
    """tbf bucket: 2 ms at the rate, at least 64 KiB (one GSO super-packet passes unsplit)."""
    return max(64 * 1024, int(rate_bps / 8 * 0.002))


# --------------------------------------------------------------------------- simulated link

def simulated_transfer_time(nbytes: float, rate, latency_s: float = 0.0) -> float:
    """SIMULATED point-to-point link: seconds to move ``nbytes`` = latency_s + 8 * nbytes / rate.

    The model of one shaped port (rate in tc's spelling or bit/s); no bytes move."""
    if nbytes < 0 or latency_s < 0:
        raise ValueError(f"nbytes and latency_s must be >= 0, got {nbytes!r}, {latency_s!r}")
    return latency_s + 8.0 * nbytes / parse_rate(rate)


def simulated_all_to_all_time(bytes_WW, rate, latency_s: float = 0.0) -> float:
    """SIMULATED all-to-all over the launcher's topology: ``bytes_WW[i][j]`` bytes go from rank i
    to rank j (the diagonal stays local). Every rank has a full-duplex port of ``rate`` into a
    non-blocking switch, so the exchange takes latency_s + the busiest port direction's bytes / rate:
    max over k of max(sum_j bytes[k][j], sum_i bytes[i][k]) for j, i != k."""
    W = len(bytes_WW)
    if any(len(row) != W for row in bytes_WW):
        raise ValueError(f"bytes_WW must be W x W, got rows of lengths {[len(r) for r in bytes_WW]}")
    busiest = 0.0
    for k in range(W):
        out = sum(bytes_WW[k][j] for j in range(W) if j != k)
        inn = sum(bytes_WW[i][k] for i in range(W) if i != k)
        busiest = max(busiest, out, inn)
    return simulated_transfer_time(busiest, rate, latency_s)


# --------------------------------------------------------------------------- namespaces

def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(cmd)!r} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _netns_list() -> list[str]:
    p = _run("ip", "netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _kill_netns_pids(ns: str) -> None:
    """SIGKILL what still runs inside ``ns`` (only our own namespaces are ever passed here)."""
    for _ in range(20):
        pids = [int(x) for x in _run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def cleanup(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace whose name starts with ``prefix`` (after killing what runs in it);
    veths, bridge and qdiscs live inside them and go with them. Returns the names removed."""
    if not prefix:
        raise ValueError("prefix must be non-empty")
    removed = []
    for ns in _netns_list():
        if ns.startswith(prefix):
            _kill_netns_pids(ns)
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


class ShapedLink:
    """Context manager: W rank namespaces + a hub with a bridge, every port rate-shaped with tbf.

    ``with ShapedLink("1gbit", 2) as link: link.popen(0, argv)``; leaving the block kills what still
    runs inside the namespaces and deletes them."""

    def __init__(self, rate, nproc: int, *, burst=None, queue_ms: float = 50.0, prefix: str = PREFIX,
                 shape: bool = True):
        if not isinstance(nproc, int) or isinstance(nproc, bool) or not 1 <= nproc <= MAX_NPROC:
            raise ValueError(f"nproc must be an int in [1, {MAX_NPROC}], got {nproc!r}")
        if queue_ms <= 0:
            raise ValueError(f"queue_ms must be > 0, got {queue_ms!r}")
        self.rate_bps = parse_rate(rate)
        self.burst = parse_size(burst) if burst is not None else default_burst(self.rate_bps)
        if self.burst < 2048:
            raise ValueError(f"burst must be >= 2kb (one full frame), got {burst!r}")
        self.queue_ms = queue_ms
        self.nproc = nproc
        self.shape = shape
        self.tag = f"{prefix}{uuid.uuid4().hex[:8]}"
        self.hub = f"{self.tag}-hub"
        self.namespaces = [f"{self.tag}-r{k}" for k in range(nproc)]
        self.addresses = [f"{SUBNET}.{k + 1}" for k in range(nproc)]
        self.ifname = IFNAME
        self._procs: list[subprocess.Popen] = []

    # -- set up / tear down
    def _tbf(self, ns: str, dev: str) -> None:
        limit = max(2 * self.burst, int(self.rate_bps / 8 * self.queue_ms / 1e3))
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", f"{self.rate_bps}bit", "burst", str(self.burst), "limit", str(limit))

    def __enter__(self) -> "ShapedLink":
        try:
            _run("ip", "netns", "add", self.hub)
            _run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.hub, "link", "set", "br0", "up")
            for k, ns in enumerate(self.namespaces):
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", IFNAME, "netns", ns, "type", "veth",
                     "peer", "name", f"port{k}", "netns", self.hub)
                _run("ip", "-n", self.hub, "link", "set", f"port{k}", "master", "br0", "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addresses[k]}/24", "dev", IFNAME)
                _run("ip", "-n", ns, "link", "set", IFNAME, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                if self.shape:
                    self._tbf(ns, IFNAME)               # what rank k sends
                    self._tbf(self.hub, f"port{k}")     # what rank k receives
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop what runs inside, delete the namespaces; a Ctrl-C arriving meanwhile waits until done."""
        mask = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        try:
            for p in self._procs:
                _stop(p)
            self._procs.clear()
            cleanup(self.tag)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    # -- using it
    def env(self, rank: int, master_port: int = DEFAULT_PORT, base=None) -> dict:
        env = dict(os.environ if base is None else base)
        env.update(MASTER_ADDR=self.addresses[0], MASTER_PORT=str(master_port), RANK=str(rank),
                   WORLD_SIZE=str(self.nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(self.nproc),
                   GLOO_SOCKET_IFNAME=IFNAME, SHAPED_LINK_RATE_BPS=str(self.rate_bps if self.shape else 0))
        return env

    def popen(self, rank: int, argv, env=None, **kw) -> subprocess.Popen:
        """Start ``argv`` inside rank's namespace (its own process group)."""
        p = subprocess.Popen(["ip", "netns", "exec", self.namespaces[rank], *argv],
                             env=env if env is not None else self.env(rank), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def counters(self, rank: int) -> tuple[int, int]:
        """(tx_bytes, rx_bytes) that rank's veth has counted so far."""
        out = _run("ip", "-n", self.namespaces[rank], "-s", "-j", "link", "show", IFNAME).stdout
        st = json.loads(out)[0]["stats64"]
        return st["tx"]["bytes"], st["rx"]["bytes"]


def _stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """(True, "") when shaped links can be built here: root, ``ip netns``, ``tc``, and a real veth
    pair between two namespaces carrying a tbf qdisc. Otherwise (False, why)."""
    if not sys.platform.startswith("linux"):
        return False, f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return False, "needs root (network namespaces, veth and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not on PATH"
    try:
        with ShapedLink("100mbit", 1):
            pass
    except (RuntimeError, OSError) as e:
        return False, f"cannot build a shaped link: {e}"
    return True, ""


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def launch(rate, nproc: int, argv, *, burst=None, master_port: int = DEFAULT_PORT, env=None,
           timeout: float | None = None, prefix: str = PREFIX, shape: bool = True) -> int:
    """Run ``argv`` once per rank, each in its own namespace on a link shaped to ``rate``; return the
    exit code (0 when every rank exited 0, else the first failing rank's; 124 on ``timeout``).
    Every namespace is deleted on the way out, whatever happens. ``shape=False`` builds the same
    topology without qdiscs (the veths' native speed), for comparison."""
    argv = [str(a) for a in argv]
    if not argv:
        raise ValueError("argv: no command given")
    ok, why = available()
    if not ok:
        raise RuntimeError(f"shaped link unavailable: {why}")
    deadline = None if timeout is None else time.monotonic() + timeout
    with ShapedLink(rate, nproc, burst=burst, prefix=prefix, shape=shape) as link:
        procs = [link.popen(k, argv, env=link.env(k, master_port, env)) for k in range(nproc)]
        rc = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                rc = _exit_code(failed[0])
                break
            if all(c == 0 for c in codes):
                break
            if deadline is not None and time.monotonic() > deadline:
                print(f"shaped_link: timeout after {timeout} s, stopping the ranks", file=sys.stderr)
                rc = 124
                break
            time.sleep(0.05)
        if rc:
            for p in procs:
                _stop(p)
    return rc


# --------------------------------------------------------------------------- measuring the shaping

def _probe(out_dir: str, nbytes: int, reps: int) -> None:
    """Rank side of --measure: a one-way TCP transfer rank 0 -> 1, then gloo all_to_all_single."""
    rank, W = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr = f"{SUBNET}.2"
    port = int(os.environ["MASTER_PORT"]) + 7
    res = {"rank": rank}

    def ctr():
        st = Path(f"/sys/class/net/{IFNAME}/statistics")
        return int((st / "tx_bytes").read_text()), int((st / "rx_bytes").read_text())

    payload = b"\0" * nbytes
    times, wire = [], []
    if rank == 1:
        srv = socket.create_server((addr, port))
    for _ in range(reps if W > 1 and rank < 2 else 0):
        if rank == 0:
            for _ in range(200):
                try:
                    s = socket.create_connection((addr, port))
                    break
                except OSError:
                    time.sleep(0.05)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c0, t0 = ctr(), time.perf_counter()
            s.sendall(payload)
            s.recv(1)
            dt, c1 = time.perf_counter() - t0, ctr()
            s.close()
            times.append(dt)
            wire.append(c1[0] - c0[0])
        else:
            conn, _ = srv.accept()
            got = 0
            while got < nbytes:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            conn.sendall(b"k")
            conn.close()
    if rank == 0 and times:
        i = times.index(statistics.median(times))
        res["tcp"] = {"bytes": nbytes, "s": times[i], "wire_bytes": wire[i]}

    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo")
    per = nbytes // 4 // max(1, W - 1)          # float32 elements to each peer: nbytes leave each rank
    x = torch.ones(per * W)
    y = torch.empty_like(x)
    dist.all_to_all_single(y[:W], x[:W])        # warm up the pairs

    def exchange():                             # every peer's receive posted before any send
        ops = [dist.P2POp(dist.irecv, y[q * per:(q + 1) * per], q) for q in range(W) if q != rank]
        ops += [dist.P2POp(dist.isend, x[q * per:(q + 1) * per], q) for q in range(W) if q != rank]
        for w in dist.batch_isend_irecv(ops):
            w.wait()

    for name, fn in (("a2a", lambda: dist.all_to_all_single(y, x)), ("p2p", exchange)):
        times, wire, cpu = [], [], []
        for _ in range(reps):
            y.zero_()
            dist.barrier()
            c0, p0, t0 = ctr(), time.process_time(), time.perf_counter()
            fn()
            dt, p1, c1 = time.perf_counter() - t0, time.process_time(), ctr()
            times.append(dt)
            wire.append(c1[0] - c0[0])
            cpu.append(p1 - p0)
            y[rank * per:(rank + 1) * per] = 1
            assert torch.equal(y, torch.ones_like(y)), name
        i = times.index(statistics.median(times))
        res[name] = {"bytes": per * 4 * (W - 1), "s": times[i], "wire_bytes": wire[i], "cpu_s": cpu[i]}
    dist.destroy_process_group()
    Path(out_dir, f"r{rank}.json").write_text(json.dumps(res))


def measure(rates=("200mbit", "1gbit"), nproc: int = 2, mib_per_gbit: int = 32, reps: int = 3) -> list[dict]:
    """Launch the probe at each rate; one row per probe: payload goodput against the rate, and the
    bytes the sender's veth counted in the timed window over the payload (about 1: the bytes went
    over the shaped veth; a little under 1 when the last ones were still queued at the end).

    Probes: ``tcp`` one TCP stream rank 0 -> 1; ``a2a`` gloo ``all_to_all_single``; ``p2p`` the same
    exchange with ``batch_isend_irecv``, every receive posted before any send."""
    rows = []
    for rate in rates:
        bps = parse_rate(rate)
        nbytes = max(1 << 20, int(mib_per_gbit * (1 << 20) * bps / 1e9))
        with tempfile.TemporaryDirectory() as d:
            rc = launch(rate, nproc, [sys.executable, __file__, "--_probe", d, str(nbytes), str(reps)],
                        timeout=120)
            if rc:
                raise RuntimeError(f"probe at {rate} exited {rc}")
            res = [json.loads(Path(d, f"r{k}.json").read_text()) for k in range(nproc)]
        for name, r in [("tcp", res[0].get("tcp"))] + [(n, max((x[n] for x in res), key=lambda a: a["s"]))
                                                       for n in ("a2a", "p2p")]:
            if r is None:
                continue
            rows.append({"rate": rate, "rate_bps": bps, "W": nproc, "probe": name, "bytes": r["bytes"],
                         "s": r["s"], "goodput_bps": 8 * r["bytes"] / r["s"],
                         "goodput_over_rate": 8 * r["bytes"] / r["s"] / bps,
                         "veth_over_payload": r["wire_bytes"] / r["bytes"],
                         "cpu_over_wall": r["cpu_s"] / r["s"] if "cpu_s" in r else None})
    return rows


# --------------------------------------------------------------------------- CLI

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_probe"]:
        _probe(argv[1], int(argv[2]), int(argv[3]))
        return 0
    cmd = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s --rate RATE --nproc W [options] -- CMD [ARGS...]")
    p.add_argument("--rate", default="1gbit", help="per-port rate in each direction, tc spelling (1gbit, 500mbit)")
    p.add_argument("--nproc", type=int, default=2, help="ranks, one namespace each")
    p.add_argument("--burst", default=None, help="tbf bucket size (default: max(64kb, 2 ms at the rate))")
    p.add_argument("--master-port", type=int, default=DEFAULT_PORT)
    p.add_argument("--timeout", type=float, default=None, help="stop the ranks after this many seconds (rc 124)")
    p.add_argument("--no-shape", action="store_true", help="same namespaces, no qdiscs (the veths' native speed)")
    p.add_argument("--cleanup", action="store_true", help=f"delete leftover namespaces named {PREFIX}* and exit")
    p.add_argument("--check", action="store_true", help="say whether shaped links work here and exit (rc 0/1)")
    p.add_argument("--measure", action="store_true", help="measure the achieved rate at --rates and exit")
    p.add_argument("--rates", default="200mbit,1gbit", help="for --measure")
    a = p.parse_args(argv)
    if a.cleanup:
        removed = cleanup()
        print(f"removed {len(removed)} namespace(s)" + (": " + " ".join(removed) if removed else ""))
        return 0
    ok, why = available()
    if a.check:
        print("shaped link: available" if ok else f"shaped link: unavailable: {why}")
        return 0 if ok else 1
    if not ok:
        print(f"shaped_link: unavailable: {why}", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        if a.measure:
            rows = measure(a.rates.split(","), a.nproc)
            for r in rows:
                print(f"{r['rate']:>9} {r['probe']:4} W={r['W']} {r['bytes'] / 2**20:6.1f} MiB each way "
                      f"{r['s'] * 1e3:7.1f} ms  goodput {r['goodput_bps'] / 1e6:7.1f} Mbit/s = "
                      f"{r['goodput_over_rate']:.3f} x rate  veth tx / payload {r['veth_over_payload']:.3f}"
                      + (f"  rank CPU / wall {r['cpu_over_wall']:.2f}" if r["cpu_over_wall"] is not None else ""))
            print(json.dumps(rows))
            return 0
        if not cmd:
            p.error("no command: put it after `--`")
        return launch(a.rate, a.nproc, cmd, burst=a.burst, master_port=a.master_port, timeout=a.timeout,
                      shape=not a.no_shape)
    except KeyboardInterrupt:
        print("shaped_link: interrupted, namespaces removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
