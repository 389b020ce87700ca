"""What every multi-process test here shares: a free port, spawning W ranks, recording each
scenario's outcome per rank in a file the pytest process reads, and expecting an error."""
from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable, W: int, *args, join: bool = True):
    """Start ``fn(rank, W, port, *args)`` on W spawned processes (a fresh port each time)."""
    return mp.start_processes(fn, args=(W, free_port(), *args), nprocs=W, join=join, start_method="spawn")


def record(out_dir: str, name: str, rank: int, fn: Callable[[], None]) -> None:
    """Run ``fn`` and write "ok" or its traceback to ``out_dir/name.rank``."""
    try:
        fn()
        status = "ok"
    except Exception:
        status = traceback.format_exc()
    with open(os.path.join(out_dir, f"{name}.{rank}"), "w") as f:
        f.write(status)


def run_scenarios(scenarios: dict, rank: int, W: int, port: int, names, out_dir: str,
                  timeout_s: float = 120) -> None:
    """A spawned rank: one torch thread, a gloo group on ``port``, then ``scenarios[name](rank, W)``
    for each name, recorded, with a barrier after each (the shared body of the workers' ``run``)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=timeout_s))
    try:
        for name in names:
            record(out_dir, name, rank, lambda: scenarios[name](rank, W))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def assert_ok(out_dir, name: str, ranks) -> None:
    """Every rank in ``ranks`` recorded "ok" for ``name``."""
    for rank in ranks:
        status = Path(out_dir, f"{name}.{rank}").read_text()
        assert status == "ok", f"{name}, rank {rank}:\n{status}"


def expect(exc_type, text: str, fn: Callable[[], object]) -> None:
    """``fn()`` raises ``exc_type`` whose message contains ``text``."""
    try:
        fn()
    except exc_type as exc:
        assert text in str(exc), f"{text!r} not in {exc}"
        return
    raise AssertionError(f"expected {exc_type.__name__} mentioning {text!r}")
