"""Rank side of tests/test_shaped_link.py: runs under benchmarks/shaped_link.py, one rank per namespace.

gloo all_reduce and all_to_all_single (uneven splits) with known answers, then a timed exchange of
NBYTES each way (every receive posted before any send), and the bytes this rank's veth sent.
Writes r<rank>.json into OUT_DIR."""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

out_dir, nbytes = sys.argv[1], int(sys.argv[2])
dist.init_process_group("gloo")  # env:// : MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE from the launcher
rank, W = dist.get_rank(), dist.get_world_size()

t = torch.full((5,), float(rank + 1))
dist.all_reduce(t)
allreduce_ok = torch.equal(t, torch.full((5,), W * (W + 1) / 2))

send = [q + 1 + rank for q in range(W)]          # rows rank sends to q
recv = [rank + 1 + q for q in range(W)]          # rows rank receives from q
x = torch.cat([torch.full((n, 3), float(100 * rank + q)) for q, n in enumerate(send)])
y = torch.empty(sum(recv), 3)
dist.all_to_all_single(y, x, recv, send)
want = torch.cat([torch.full((n, 3), float(100 * q + rank)) for q, n in enumerate(recv)])
alltoall_ok = torch.equal(y, want)

per = nbytes // 4
a, b = torch.ones(per), torch.zeros(per)
peer = 1 - rank if W == 2 else None
tx = Path(f"/sys/class/net/{os.environ['GLOO_SOCKET_IFNAME']}/statistics/tx_bytes")
dist.barrier()
tx0, t0 = int(tx.read_text()), time.perf_counter()
for w in dist.batch_isend_irecv([dist.P2POp(dist.irecv, b, peer), dist.P2POp(dist.isend, a, peer)]):
    w.wait()
dt = time.perf_counter() - t0
dist.barrier()  # the last bytes have left the queue once the peer has them
tx1 = int(tx.read_text())
res = {"rank": rank, "world": W, "allreduce_ok": allreduce_ok, "alltoall_ok": alltoall_ok,
       "exchange_ok": bool(torch.equal(b, a)), "bytes": per * 4, "s": dt, "veth_tx_bytes": tx1 - tx0,
       "rate_env": int(os.environ["SHAPED_LINK_RATE_BPS"]), "master": os.environ["MASTER_ADDR"]}
dist.destroy_process_group()
Path(out_dir, f"r{rank}.json").write_text(json.dumps(res))
