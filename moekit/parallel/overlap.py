"""Communication/computation overlap for the expert-parallel layer: Tutel's chunked pipelining
and Comet's fine-grained, dependency-ordered overlap, forward and backward.

Legend: W ranks, S slots per rank, D model dim, R rows this rank sends (its tokens' assignments,
sorted by destination rank then slot), B blocks per peer, d chunks.

The non-overlapped layer (:class:`~moekit.parallel.expert_parallel.AllToAllDispatcher`) runs
dispatch all-to-all -> experts -> combine all-to-all one after the other. Here the three run as
one pipelined block, :class:`OverlapDispatcher.run`, over *pieces*: piece (q, j) is block j of
the rows exchanged with peer q, where block j of a segment of n rows (one (peer, slot) pair) is
rows ``[n*j//B, n*(j+1)//B)`` and a piece takes block j of each of the peer's S segments, so
both sides derive every piece's rows and per-slot counts from the counts they already
exchanged. All messages are point-to-point, one per non-empty piece and direction. One compute
loop (:class:`_Pipeline`) runs the stages; how the messages are posted is its transport:

- "tagged" (gloo, :class:`_Tagged`): ``isend``/``irecv`` tagged by piece. Every receive is
  posted first; dispatch sends follow ring order (rank r sends to r+1, r+2, ... and receives
  from r-1, r-2, ...: at each step every rank sends to a different peer), all at once when
  chunked (chunk j of every peer is needed together), peer after peer from a sender thread
  when fine (the peer computed first gets the whole link).
- "waves" (NCCL, :class:`_Waves`): NCCL matches a pair's messages in issue order, without
  tags, and runs them on one stream per communicator, so the order above would deadlock there.
  Instead every message travels in a ``batch_isend_irecv`` group ("wave"), and every rank
  posts the same sequence of waves (:func:`wave_schedule`): the rows of stage i in wave D(i),
  their results in C(i), interleaved with a look-ahead of one (D(i+1) is posted before stage i
  computes, C(i) right after it); within a wave a pair's messages match in order.

- ``overlap="chunked"`` (Tutel's adaptive pipelining, degree d = B): stage j computes the
  rows of chunk j from *every* source at once (one grouped expert GEMM per chunk, rows
  reordered to slot order), then sends its results back while chunk j+1's rows still arrive.
- ``overlap="fine"`` (Comet): stages follow the dependencies of single pieces: this rank's own
  rows first (they need no communication), then each peer's blocks in the order they are due
  to arrive; each piece waits only for its own source and its results are sent back to that
  source at once, so the combine of early pieces overlaps the compute of later ones. The own
  rows are cut in at least two blocks, a head computed first and a tail computed last, while
  the last peer's results are still on the wire (otherwise that return is never hidden). Comet
  splits the combine GEMM by column blocks; with the experts computed as one black-box call
  per piece the same effect comes from row blocks per destination (B), which keeps the
  experts' own fused kernels and backward.

The backward has the same shape (gradients of the outputs travel like the dispatch, the
experts' backward runs per piece, input gradients travel back like the combine), so it is
pipelined the same way. Pieces hold the same rows as the non-overlapped layer and every row's
expert output depends on that row alone, so outputs and input gradients are those of the
reference; expert weight gradients are sums over pieces in a fixed order (equal to the
reference bit for bit when every sum is exact, e.g. integer-valued data, else to rounding).

``chunks="auto"`` tries each candidate degree on real calls (a forward per trial, timed on
every rank, the slowest rank counts), keeps the fastest per shape key (the largest number of
rows any rank exchanges, rounded up to a power of two, all-reduced so every rank uses the same
key) and reuses it without retuning; a new key tunes again. This is Comet's adaptive workload
assignment at the granularity Python can control: how the work is cut and ordered.

On CPUs gloo moves the bytes on its own threads while the main thread computes (the link waits,
the cores compute). gloo groups use the tagged transport and NCCL groups the waves (any other
backend is refused with an error); ``transport="waves"`` forces the waves on gloo. The NCCL
path is built but has not been run on a GPU here: the tests run the same wave code on gloo
(bit for bit equal to the non-overlapped layer) and check, at W = 2..5, that every rank posts
the same wave sequence with each pair's messages matching. Placements with replicas and capacity
drops work as in the reference; ``ranks_per_node`` (2DH) does not combine with overlap
(refused).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from moekit.dispatch import gather_rows, permute_rows, unpermute_rows, weighted_combine
from moekit.parallel import comm
from moekit.parallel.expert_parallel import AllToAllDispatcher, _source_to_slot_order
from moekit.router import Routing

log = logging.getLogger(__name__)

OVERLAP_MODES = ("none", "chunked", "fine")
CANDIDATES = {"chunked": (1, 2, 4, 8), "fine": (1, 2, 4)}
Chunks = Union[str, int]


def _block(n: int, j: int, B: int) -> tuple[int, int]:
    return n * j // B, n * (j + 1) // B


@dataclass
class ExchangePlan:
    """Rows of every piece of one call, on both sides, from the per-(peer, slot) counts.

    send_WS[q][s]: rows this rank sends to slot s of rank q (its rows are sorted by (q, s));
    recv_WS[q][s]: rows rank q sends to this rank's slot s; B blocks per peer.
    """

    rank: int
    send_WS: list[list[int]]
    recv_WS: list[list[int]]
    B: int
    device: torch.device
    B_local: Optional[int] = None  # blocks of this rank's own rows (default B)
    _send_idx: dict = field(default_factory=dict)

    @property
    def W(self) -> int:
        return len(self.send_WS)

    def blocks(self, q: int) -> int:
        return self.B_local if q == self.rank and self.B_local else self.B

    def recv_counts_S(self, q: int, j: int) -> list[int]:
        """Per-slot rows of piece (q, j) on the receiving (expert) side."""
        B = self.blocks(q)
        return [_block(n, j, B)[1] - _block(n, j, B)[0] for n in self.recv_WS[q]]

    def recv_rows(self, q: int, j: int) -> int:
        return sum(self.recv_counts_S(q, j))

    def send_rows(self, q: int, j: int) -> int:
        B = self.blocks(q)
        return sum(_block(n, j, B)[1] - _block(n, j, B)[0] for n in self.send_WS[q])

    def send_index(self, q: int, j: int) -> torch.Tensor:
        """Positions in the send buffer [R] of piece (q, j)'s rows (slot order)."""
        key = (q, j)
        if key not in self._send_idx:
            base = sum(sum(r) for r in self.send_WS[:q])
            parts = []
            for n in self.send_WS[q]:
                lo, hi = _block(n, j, self.blocks(q))
                if hi > lo:
                    parts.append(torch.arange(base + lo, base + hi))
                base += n
            idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
            self._send_idx[key] = idx.to(self.device)
        return self._send_idx[key]


def local_blocks(mode: str, B: int) -> int:
    """Blocks of a rank's own rows: B when chunked; for "fine" at least 2, a head computed while
    the peers' rows arrive and a tail computed while the last results travel back."""
    return B if mode == "chunked" else max(B, 2)


def stages(mode: str, W: int, rank: int, B: int) -> list[list[tuple[int, int]]]:
    """The compute stages, each a list of pieces (peer, block), in execution order."""
    if mode == "chunked":
        return [[(q, j) for q in range(W)] for j in range(B)]
    ring_in = [(rank - k) % W for k in range(1, W)]  # r-1 sends to r first, then r-2, ...
    L = local_blocks(mode, B)
    head = [[(rank, j)] for j in range((L + 1) // 2)]
    tail = [[(rank, j)] for j in range((L + 1) // 2, L)]
    return head + [[(q, j)] for q in ring_in for j in range(B)] + tail


def _ring_out(W: int, rank: int) -> list[int]:
    return [(rank + k) % W for k in range(1, W)]


class _Transport:
    """How a :class:`_Pipeline` moves its messages: the posting strategy, called from the shared
    compute loop at fixed points (``start``, ``before_stage(i)``, ``rows_in``, ``send_back``,
    ``after_stage(i)``, ``finish``). This base moves nothing: mode "comp" (received rows are zeros
    of the right size, results are not sent, remote rows of the output stay zero)."""

    def __init__(self, plan: ExchangePlan, stage_list, group, timeout: timedelta, what: str):
        self.plan, self.stages, self.group, self.timeout, self.what = plan, stage_list, group, timeout, what

    def start(self, rows_RD: torch.Tensor, D_out: int) -> None:
        self.rows_RD, self.D_out = rows_RD, D_out

    def before_stage(self, i: int) -> None:
        pass

    def rows_in(self, i: int, piece: tuple[int, int]) -> torch.Tensor:
        """The received rows [n, D] (n > 0) of remote piece ``piece`` of stage i."""
        return self.rows_RD.new_zeros(self.plan.recv_rows(*piece), self.rows_RD.shape[-1])

    def send_back(self, i: int, piece: tuple[int, int], y: torch.Tensor) -> None:
        """Results [n, D_out] (n > 0) of remote piece ``piece`` (computed in stage i) for its source."""

    def after_stage(self, i: int) -> None:
        pass

    def finish(self, out_RD: torch.Tensor) -> None:
        """Copy the returned results into ``out_RD`` (rows of the send buffer) and wait for every
        outstanding message."""


class _Tagged(_Transport):
    """gloo's posting order: every receive first (tags by piece: between two ranks, block j's
    dispatch message has tag 2j and its returned results 2j+1), then the dispatch sends in ring
    order, all at once when chunked, peer after peer from a :class:`_Sender` thread when fine;
    results go back one ``isend`` per piece as soon as computed. gloo matches by (peer, tag), so
    this order is free; NCCL would deadlock on it (see :class:`_Waves`)."""

    def start(self, rows_RD, D_out):
        super().start(rows_RD, D_out)
        plan, rank, W, D = self.plan, self.plan.rank, self.plan.W, rows_RD.shape[-1]
        self.inbound, self.outbound, self.returns = {}, [], {}
        for (q, j) in (p for st in self.stages for p in st):
            if q == rank:
                continue
            n_in, n_back = plan.recv_rows(q, j), plan.send_rows(q, j)
            if n_in:
                buf = rows_RD.new_empty(n_in, D)
                self.inbound[(q, j)] = (buf, dist.irecv(buf, group=self.group, group_src=q, tag=2 * j))
            if n_back:
                buf = rows_RD.new_empty(n_back, D_out)
                self.returns[(q, j)] = (buf, dist.irecv(buf, group=self.group, group_src=q, tag=2 * j + 1))
        # dispatch sends, in the order the receivers consume
        chunked = any(len(st) > 1 for st in self.stages)
        waves = []  # chunked: one wave, block-major (chunk j from every peer at once); fine: a wave per peer
        for q in _ring_out(W, rank):
            waves.append([(q, 2 * j, rows_RD.index_select(0, plan.send_index(q, j)))
                          for j in range(plan.B) if plan.send_rows(q, j)])
        self.sender = None
        if chunked:
            flat = [m for j in range(plan.B) for wave in waves for m in wave if m[1] == 2 * j]
            self.outbound += [(dist.isend(t, group=self.group, group_dst=q, tag=tag), t) for q, tag, t in flat]
        else:
            self.sender = _Sender(waves, self.group, self.timeout, f"{self.what}: send")
            self.sender.start()

    def rows_in(self, i, piece):
        buf, work = self.inbound.pop(piece)
        comm.wait(work, self.timeout, f"{self.what}: rows of piece {piece} from rank {piece[0]}")
        return buf

    def send_back(self, i, piece, y):
        y = y.contiguous()
        q, j = piece
        self.outbound.append((dist.isend(y, group=self.group, group_dst=q, tag=2 * j + 1), y))

    def finish(self, out_RD):
        for (q, j), (buf, work) in self.returns.items():
            comm.wait(work, self.timeout, f"{self.what}: results of piece {(q, j)} from rank {q}")
            out_RD.index_copy_(0, self.plan.send_index(q, j), buf)
        for work, _ in self.outbound:
            comm.wait(work, self.timeout, f"{self.what}: send")
        if self.sender is not None:
            self.sender.finish()


class WaveOp(NamedTuple):
    """One message of a wave, seen from this rank. ``send``: this rank sends to ``peer`` (else
    receives from it); ``kind`` "rows" (dispatch: rows of a piece to the expert side) or "results"
    (combine: the piece's expert outputs back to its source); the piece is (peer, ``block``) in
    this rank's plan (its rows for peer when this rank is the source, peer's rows when it
    computes them); ``rows``: the message's row count (> 0: empty messages are left out)."""

    send: bool
    peer: int
    kind: str
    block: int
    rows: int


class Wave(NamedTuple):
    """One ``batch_isend_irecv`` group: ``label`` ("D", i) dispatches the rows computed in stage
    i, ("C", i) returns their results; ``at`` ("before", i) / ("after", i): the pipeline posts it
    just before computing stage i / just after; ``ops`` in posting order (may be empty: then
    nothing is posted)."""

    label: tuple[str, int]
    at: tuple[str, int]
    ops: list[WaveOp]


def wave_schedule(overlap: str, plan: ExchangePlan) -> list[Wave]:
    """The waves this rank posts for one pipelined call, in posting order (see :class:`_Waves`).

    Stage lists of *every* rank are the same function of (overlap, W, B) with the rank as a
    parameter, so each rank derives which of its rows the others compute in their stage i:
    D(i) on rank r = receive each remote piece (q, j) of r's stage i from q, in stage order,
    and send to each peer q the rows of r's block j for each (r, j) in q's stage i, in q's
    stage order; C(i) the same with the directions reversed (results). Row counts come from
    the plan: r's receive of (q, j) has ``recv_rows(q, j)`` rows, q's matching send
    ``send_rows(r, j)`` on q, the same number (block j of the counts both exchanged)."""
    W, r, B = plan.W, plan.rank, plan.B
    st = [stages(overlap, W, q, B) for q in range(W)]
    n = len(st[r])
    if any(len(s) != n for s in st):
        raise AssertionError("wave_schedule: ranks' stage lists differ in length")

    def wave(kind: str, i: int) -> list[WaveOp]:
        # kind "rows": receive this stage's pieces, send ours that the peers compute in stage i;
        # "results": the reverse
        mine = [WaveOp(kind == "results", q, kind, j, plan.recv_rows(q, j)) for q, j in st[r][i] if q != r]
        theirs = [WaveOp(kind == "rows", q, kind, j, plan.send_rows(q, j))
                  for q in _ring_out(W, r) for p, j in st[q][i] if p == r]
        return [op for op in mine + theirs if op.rows]

    # stages with a message anywhere (the same list on every rank: a property of the structure)
    comm_stages = [i for i in range(n) if any(p != q for q in range(W) for p, _ in st[q][i])]
    out = []
    for m, c in enumerate(comm_stages):
        if m == 0:
            out.append(Wave(("D", c), ("before", 0), wave("rows", c)))
        if m + 1 < len(comm_stages):  # look-ahead of one: the next stage's rows travel during this one
            out.append(Wave(("D", comm_stages[m + 1]), ("before", c), wave("rows", comm_stages[m + 1])))
        out.append(Wave(("C", c), ("after", c), wave("results", c)))
    return out


class _Waves(_Transport):
    """NCCL's posting order (also runs on gloo): every message travels inside a
    ``dist.batch_isend_irecv`` group ("wave", tag 0), and every rank posts the same sequence of
    waves (:func:`wave_schedule`): D(i) carries the rows computed in stage i, C(i) their results
    back. Posting: D(first) before stage 0; before each stage i with messages, D(next) (the
    next stage with messages), then wait for D(i)'s receives; compute stage i; post C(i).
    Stages without messages (the fine scheme's own head and tail) post and wait nothing. At the
    end wait for every C wave's receives (results copied out), then for every send.

    The labels are D(c0), then per stage c_m with messages D(c_{m+1}) (if any) and C(c_m):
    a function of (overlap, W, B) only, the same on every rank; zero-row messages are dropped
    on both sides (both know every piece's rows from the exchanged counts), and a wave left
    without messages on rank r holds no message naming r on any other rank, so skipping it
    changes no pair's sequence. Within a wave, the messages of a pair match in order
    (:func:`wave_schedule`: rank r's k-th send to q is q's k-th receive from r, same rows):

    - chunked, stage i = chunk i of every peer: D(i) holds, per peer, one send (r's chunk i for
      q) and one receive (q's chunk i); C(i) the results of those, reversed;
    - fine, stage (k, j) (ring step k = 1..W-1, block j; after the own head) computes piece
      (r-k, j) on rank r, and rank r+k computes (r, j) in its stage (k, j): D(k, j) on r = send
      block j to r+k, receive block j from r-k; this pairing is symmetric across ranks (r's send
      to r+k is r+k's receive from (r+k)-k = r). When 2k = W (mod W) both name the same peer: one
      send and one receive with it in the group, which a group allows.

    Why no deadlock under NCCL (ops of a pair matched in issue order, no tags; one stream per
    communicator runs a rank's waves in issue order; a group completes when all its pairs
    do): every rank issues the same labels in the same order and each pair's messages match
    within a wave, so by induction over that order, once every rank's waves before w are done,
    all of w's messages have their partners issued in w and w completes; host side, a rank
    waits for D(i) only after issuing every wave up to D(next), and every other rank issues
    D(i) before it can wait for anything later in the order. On gloo the same tag-0 messages
    match per pair in issue order too (one connection per pair, FIFO per tag), which is how the
    tests run this code.

    On CPU tensors waits go through ``comm.wait(work, timeout, what)`` (a dead peer or a timeout
    fails with an :class:`~moekit.parallel.comm.ExpertParallelError`). With NCCL a wave is one
    coalesced work running on NCCL's own side stream; its ``wait()`` (no timeout) makes the
    current CUDA stream wait for that stream (an event between the streams: the compute of
    stage i is queued behind D(i), and C(i), posted after, starts after stage i's compute on
    NCCL's stream) and returns at once, so the host queues the following stages ahead; a
    timeout there would make torch's ProcessGroupNCCL block the host until the wave is done,
    so a dead peer is left to the process group's own timeout (``init_process_group``). With
    gloo (one work per message) D(i)'s receives are waited before stage i; its sends only at
    the end. Under NCCL the current device must be set (``torch.cuda.set_device``); the group's
    first collective is the counts exchange, so grouped waves between subsets of ranks are
    allowed."""

    def __init__(self, plan, stage_list, group, timeout, what, overlap: str):
        super().__init__(plan, stage_list, group, timeout, what)
        self.schedule = wave_schedule(overlap, plan)  # over the same stages(overlap, W, rank, B)

    def start(self, rows_RD, D_out):
        super().start(rows_RD, D_out)
        self.inbound, self.returns, self.results = {}, {}, {}
        self.need: dict = {}  # label -> works to finish before its received rows are used
        self.later: list = []  # works waited at the end (sends), with the tensors they read
        self.posted = 0

    def _post_until(self, at: tuple[str, int]) -> None:
        while self.posted < len(self.schedule) and self.schedule[self.posted].at == at:
            self._post(self.schedule[self.posted])
            self.posted += 1

    def _post(self, wave: Wave) -> None:
        plan, D = self.plan, self.rows_RD.shape[-1]
        p2p, recv = [], []
        for op in wave.ops:
            piece = (op.peer, op.block)
            if op.kind == "rows" and op.send:
                t = self.rows_RD.index_select(0, plan.send_index(*piece))
            elif op.kind == "rows":
                t = self.inbound[piece] = self.rows_RD.new_empty(op.rows, D)
            elif op.send:
                t = self.results.pop(piece)
            else:
                t = self.returns[piece] = self.rows_RD.new_empty(op.rows, self.D_out)
            recv.append(not op.send)
            p2p.append(dist.P2POp(dist.isend if op.send else dist.irecv, t, group=self.group,
                                  group_peer=op.peer, tag=0))
        if not p2p:
            return
        works = dist.batch_isend_irecv(p2p)
        if len(works) == len(p2p):  # one work per message (gloo): receives now, sends at the end
            self.need[wave.label] = [w for w, rv in zip(works, recv) if rv]
            self.later += [(w, op.tensor) for w, op, rv in zip(works, p2p, recv) if not rv]
        else:  # one coalesced work for the group (NCCL)
            self.need[wave.label] = list(works)
            self.later.append((None, [op.tensor for op in p2p]))  # keeps the sent tensors alive

    def _wait(self, label: tuple[str, int], what: str) -> None:
        for work in self.need.pop(label, ()):
            self._wait_work(work, what)

    def _wait_work(self, work, what: str) -> None:
        if self.rows_RD.is_cuda:
            # stream-ordered: the current stream waits for NCCL's, the host runs on and queues
            # the next stages (a timeout here would block the host until the wave is done); a
            # dead peer is caught by the process group's own timeout (init_process_group)
            work.wait()
        else:
            comm.wait(work, self.timeout, what)

    def before_stage(self, i):
        self._post_until(("before", i))
        self._wait(("D", i), f"{self.what}: rows of stage {i} (wave D{i})")

    def rows_in(self, i, piece):
        return self.inbound.pop(piece)

    def send_back(self, i, piece, y):
        self.results[piece] = y.contiguous()

    def after_stage(self, i):
        self._post_until(("after", i))

    def finish(self, out_RD):
        if self.posted != len(self.schedule) or self.results:
            raise AssertionError("_Waves: a wave was not posted")  # a schedule/pipeline mismatch
        for label in list(self.need):  # the C waves: every D wave was waited before its stage
            self._wait(label, f"{self.what}: results of stage {label[1]} (wave C{label[1]})")
        for (q, j), buf in self.returns.items():
            out_RD.index_copy_(0, self.plan.send_index(q, j), buf)
        for work, _ in self.later:
            if work is not None:
                self._wait_work(work, f"{self.what}: send")
        self.later = []


TRANSPORTS = ("auto", "tagged", "waves")


class _Pipeline:
    """Runs one direction of the pipelined block: per stage, take each piece's received rows,
    compute, send the results back to their sources; then collect what comes back. The
    messages are the transport's (:class:`_Tagged` for gloo, :class:`_Waves` for NCCL).

    ``compute(stage_index, pieces, x_rows, counts_WS) -> y_rows`` gets the stage's received rows
    concatenated in piece order (each piece in slot order) and returns rows in the same order.
    ``mode``: "both" (real), "comm" (exchange only, the compute returns its input: for
    measuring T_comm), "comp" (compute only, received rows are zeros of the right size and
    nothing is sent: for measuring T_comp).
    """

    def __init__(self, plan: ExchangePlan, stage_list, group, timeout: timedelta, what: str, mode: str = "both",
                 transport: str = "tagged", overlap: Optional[str] = None):
        self.plan, self.stages, self.mode = plan, stage_list, mode
        if mode == "comp":
            self.transport = _Transport(plan, stage_list, group, timeout, what)
        elif transport == "waves":  # resolved by the dispatcher (resolve_transport): "tagged" or "waves"
            self.transport = _Waves(plan, stage_list, group, timeout, what, overlap)
        else:
            self.transport = _Tagged(plan, stage_list, group, timeout, what)

    def run(self, rows_RD: torch.Tensor, compute: Callable, D_out: int) -> torch.Tensor:
        plan, rank, t = self.plan, self.plan.rank, self.transport
        D = rows_RD.shape[-1]
        t.start(rows_RD, D_out)
        out_RD = rows_RD.new_zeros(rows_RD.shape[0], D_out)
        for i, stage in enumerate(self.stages):
            t.before_stage(i)
            xs, counts = [], []
            for (q, j) in stage:
                c = plan.recv_counts_S(q, j)
                counts.append(c)
                if q == rank:
                    xs.append(rows_RD.index_select(0, plan.send_index(q, j)))
                elif sum(c):
                    xs.append(t.rows_in(i, (q, j)))
                else:
                    xs.append(rows_RD.new_empty(0, D))
            x = torch.cat(xs) if len(xs) > 1 else xs[0]
            y = compute(i, stage, x, counts) if self.mode != "comm" else (x if D_out == D else x.new_zeros(x.shape[0], D_out))
            off = 0
            for (q, j), c in zip(stage, counts):
                n = sum(c)
                if n == 0:
                    continue
                y_piece = y[off:off + n]
                off += n
                if q == rank:
                    out_RD.index_copy_(0, plan.send_index(q, j), y_piece)
                else:
                    t.send_back(i, (q, j), y_piece)
            t.after_stage(i)
        t.finish(out_RD)
        return out_RD


class _Sender(threading.Thread):
    """Posts the fine scheme's dispatch sends peer after peer: one peer's blocks at once, the
    next peer's when those are out. Posted all at once, the W-1 connections would share the
    rank's link and every peer's rows would arrive near the end of the dispatch; in turn, the
    peer computed first gets its rows at the full rate. (A thread, because the main thread is
    computing while the sends drain; ``wait`` releases the GIL.)"""

    def __init__(self, waves, group, timeout: timedelta, what: str):
        super().__init__(name="moekit-overlap-sender", daemon=True)
        self.waves, self.group, self.timeout, self.what = waves, group, timeout, what
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            for wave in self.waves:
                works = [dist.isend(t, group=self.group, group_dst=q, tag=tag) for q, tag, t in wave]
                for w in works:
                    comm.wait(w, self.timeout, self.what)
        except BaseException as exc:  # re-raised on the calling thread by finish()
            self.error = exc

    def finish(self) -> None:
        self.join()
        if self.error is not None:
            raise self.error


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t


class _ExpertsBlock:
    """The experts' side of one call: forward per stage (keeping each stage's graph for the
    backward), backward per stage through those graphs."""

    def __init__(self, experts, plan: ExchangePlan, stage_list, keep_graph: bool):
        self.experts, self.plan, self.stages, self.keep_graph = experts, plan, stage_list, keep_graph
        self.saved: list = [None] * len(stage_list)
        self.param_grads: dict = {}

    def _counts(self, pieces, counts) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Slot counts [S] of a stage and, with several pieces, the (piece, slot) -> slot order."""
        dev = self.plan.device
        if len(pieces) == 1:
            return torch.tensor(counts[0], dtype=torch.long, device=dev), None
        c_PS = torch.tensor(counts, dtype=torch.long, device=dev)
        return c_PS.sum(0), _source_to_slot_order(c_PS)

    def forward(self, i: int, pieces, x: torch.Tensor, counts) -> torch.Tensor:
        counts_S, perm = self._counts(pieces, counts)
        # the stage's graph is this block's own: identity hooks keep an outer non-reentrant
        # checkpoint from packing its tensors (unpacking them would re-run the region's
        # exchanges in the middle of this block's backward exchange)
        with torch.enable_grad() if self.keep_graph else torch.no_grad(), \
                torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            x_in = x.detach().requires_grad_(self.keep_graph) if self.keep_graph else x
            x_slot = x_in if perm is None else permute_rows(x_in, perm)
            y_slot = self.experts(x_slot, counts_S)
            y = y_slot if perm is None else unpermute_rows(y_slot, perm)
        if self.keep_graph:
            self.saved[i] = (x_in, y)
        return y.detach()

    def backward(self, i: int, pieces, g: torch.Tensor, counts) -> torch.Tensor:
        x_in, y = self.saved[i]
        self.saved[i] = None
        params = [p for p in (self.experts.w_in, self.experts.w_out) if p.requires_grad]
        if x_in.shape[0] == 0:
            return g.new_zeros(0, x_in.shape[-1])
        grads = torch.autograd.grad(y, [x_in] + params, g, allow_unused=True)
        for p, gp in zip(params, grads[1:]):
            if gp is not None:
                acc = self.param_grads.get(p)
                self.param_grads[p] = gp if acc is None else acc.add_(gp)  # stage order: fixed
        return grads[0]


class _OverlappedExperts(torch.autograd.Function):
    """x_sorted [R, D] (this rank's rows by destination) -> y_sorted [R, D] (their expert outputs)
    through the pipelined exchange; the weights are inputs so their gradients land in ``.grad``."""

    @staticmethod
    def forward(ctx, x_RD, w_in, w_out, disp: "OverlapDispatcher", plan: ExchangePlan, stage_list):
        block = _ExpertsBlock(disp._experts, plan, stage_list, keep_graph=True)
        pipe = disp._pipeline(plan, stage_list, f"overlapped dispatch of layer {disp.name!r}")
        y_RD = pipe.run(x_RD, block.forward, x_RD.shape[-1])
        ctx.block, ctx.disp = block, disp
        return y_RD

    @staticmethod
    @once_differentiable
    def backward(ctx, g_RD):
        block, disp = ctx.block, ctx.disp
        block.param_grads = {}
        pipe = disp._pipeline(block.plan, block.stages, f"overlapped backward of layer {disp.name!r}")
        gx_RD = pipe.run(g_RD.contiguous(), block.backward, g_RD.shape[-1])
        ex = block.experts
        g_in, g_out = block.param_grads.get(ex.w_in), block.param_grads.get(ex.w_out)
        if g_in is None and ex.w_in.requires_grad:
            g_in = torch.zeros_like(ex.w_in)
        if g_out is None and ex.w_out.requires_grad:
            g_out = torch.zeros_like(ex.w_out)
        ctx.block = None
        return gx_RD, g_in, g_out, None, None, None


class ChunkTuner:
    """``chunks="auto"``: per shape key, try each candidate degree on real forward calls
    (``trials`` each, in order), then keep the one whose slowest rank was fastest. The decision
    is one all-reduce of the measured times, so every rank picks the same degree."""

    def __init__(self, candidates, trials: int = 3):
        self.candidates, self.trials = tuple(candidates), trials
        self.chosen: dict[int, int] = {}
        self._times: dict[int, list[list[float]]] = {}
        self.tunings = 0  # keys decided so far (a seen key is never retuned)

    def degree(self, key: int) -> Optional[int]:
        """The degree for a call with ``key``; None while still trying (then :meth:`trial`)."""
        return self.chosen.get(key)

    def trial(self, key: int) -> tuple[int, int]:
        """(candidate index, degree) to try on this call."""
        times = self._times.setdefault(key, [[] for _ in self.candidates])
        i = min(range(len(self.candidates)), key=lambda c: (len(times[c]), c))
        return i, self.candidates[i]

    def record(self, key: int, index: int, seconds: float, group, timeout, what: str) -> None:
        times = self._times[key]
        times[index].append(seconds)
        if all(len(t) >= self.trials for t in times):
            best_T = torch.tensor([min(t) for t in times], dtype=torch.float64)
            comm.wait(dist.all_reduce(best_T, op=dist.ReduceOp.MAX, group=group, async_op=True), timeout, what)
            pick = int(torch.argmin(best_T))
            self.chosen[key] = self.candidates[pick]
            self.tunings += 1
            del self._times[key]
            log.info("%s: chunks=%d for shape key %d (measured %s ms)", what, self.candidates[pick], key,
                     ", ".join(f"{c}: {t * 1e3:.2f}" for c, t in zip(self.candidates, best_T.tolist())))


class OverlapDispatcher(AllToAllDispatcher):
    """An :class:`AllToAllDispatcher` whose layer runs dispatch, experts and combine as one
    pipelined block (:meth:`run`); ``overlap`` is "chunked" or "fine", ``chunks`` an int (chunks
    for "chunked", row blocks per peer for "fine") or "auto". ``transport``: "auto" (the grouped
    waves on NCCL, the tagged order on gloo), "tagged" (gloo only) or "waves" (NCCL or gloo:
    forces the NCCL posting order on gloo, for tests and benchmarks); :attr:`transport` holds
    the resolved one."""

    def __init__(self, group, placement, rank: int, name: str, timeout: timedelta, overlap: str, chunks: Chunks,
                 transport: str = "auto"):
        super().__init__(group, placement, rank, name, timeout)
        if overlap not in ("chunked", "fine"):
            raise ValueError(f"overlap={overlap!r}: expected one of {OVERLAP_MODES}")
        check_overlap(overlap, chunks, None, transport)
        self.transport = resolve_transport(transport, dist.get_backend(group), overlap)
        self.overlap, self.chunks = overlap, chunks
        self.tuner = ChunkTuner(CANDIDATES[overlap]) if chunks == "auto" else None
        self.last_chunks: Optional[int] = None
        self._experts = None

    def _exchange_counts(self, x_TD, routing: Routing):
        """Sorted rows, their order, and the per-(peer, slot) counts both ways (as the reference)."""
        W, S = self.placement.world_size, self.placement.slots_per_rank
        order_N, send_P, recv_WS = self._route_counts(routing)
        x_sorted = gather_rows(x_TD, order_N, routing.topk_ids_TK.shape[1])
        return x_sorted, order_N, send_P.view(W, S).tolist(), recv_WS.tolist()

    def plan(self, x_TD: torch.Tensor, routing: Routing, chunks: int):
        """(x_sorted [R, D], order_N, ExchangePlan) for ``chunks`` blocks: for benchmarks."""
        x_sorted, order_N, send_WS, recv_WS = self._exchange_counts(x_TD, routing)
        return x_sorted, order_N, ExchangePlan(self.rank, send_WS, recv_WS, chunks, x_TD.device,
                                               local_blocks(self.overlap, chunks))

    def run(self, x_TD: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        """x_TD [T, D] -> y_TD [T, D]: the layer's dispatch -> experts -> combine, pipelined."""
        x_sorted, order_N, send_WS, recv_WS = self._exchange_counts(x_TD, routing)
        key = index = None
        if self.tuner is None:
            B = self.chunks
        else:
            rows = torch.tensor([max(sum(map(sum, send_WS)), sum(map(sum, recv_WS)))], dtype=torch.long)
            comm.wait(dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=self.group, async_op=True), self.timeout,
                      f"overlap shape key of layer {self.name!r}")
            key = 1 << max(int(rows.item()) - 1, 0).bit_length()
            B = self.tuner.degree(key)
            if B is None:
                index, B = self.tuner.trial(key)
        self.last_chunks = B
        plan = ExchangePlan(self.rank, send_WS, recv_WS, B, x_TD.device, local_blocks(self.overlap, B))
        stage_list = stages(self.overlap, self.placement.world_size, self.rank, B)
        if index is not None and x_TD.device.type == "cuda":
            torch.cuda.synchronize(x_TD.device)  # the trial's clock starts with no earlier work queued
        t0 = time.perf_counter()
        y_sorted = self.block(x_sorted, experts, plan, stage_list)
        if index is not None:
            if x_TD.device.type == "cuda":
                torch.cuda.synchronize(x_TD.device)
            self.tuner.record(key, index, time.perf_counter() - t0, self.group, self.timeout,
                              f"overlap tuner of layer {self.name!r}")
        W, D = self.placement.world_size, x_TD.shape[-1]
        remote_out = sum(sum(send_WS[q]) for q in range(W) if q != self.rank)
        remote_in = sum(sum(recv_WS[q]) for q in range(W) if q != self.rank)
        self.rows_remote += remote_out
        self.bytes_sent += (remote_out + remote_in) * D * x_TD.element_size()
        return weighted_combine(y_sorted, order_N, routing.topk_weights_TK, routing.num_dropped)

    def block(self, x_sorted: torch.Tensor, experts, plan: ExchangePlan, stage_list, mode: str = "both") -> torch.Tensor:
        """The pipelined exchange + experts on sorted rows [R, D] -> [R, D]. ``mode`` "comm" or
        "comp" runs only the communication or only the computation (for measuring overlap)."""
        params = (experts.w_in, experts.w_out)
        grad = torch.is_grad_enabled() and (x_sorted.requires_grad or any(p.requires_grad for p in params))
        if grad and mode == "both":
            self._experts = experts
            try:
                return _OverlappedExperts.apply(x_sorted, *params, self, plan, stage_list)
            finally:
                self._experts = None
        blk = _ExpertsBlock(experts, plan, stage_list, keep_graph=False)
        pipe = self._pipeline(plan, stage_list, f"overlapped dispatch of layer {self.name!r}", mode)
        return pipe.run(x_sorted, blk.forward, x_sorted.shape[-1])

    def _pipeline(self, plan: ExchangePlan, stage_list, what: str, mode: str = "both") -> _Pipeline:
        return _Pipeline(plan, stage_list, self.group, self.timeout, what, mode, self.transport, self.overlap)

    def dispatch(self, x_TD, routing):
        raise RuntimeError(f"layer {self.name!r} runs overlapped (overlap={self.overlap!r}): the layer calls "
                           "run(x_TD, routing, experts), not dispatch/combine")


def resolve_transport(transport: str, backend: str, overlap: str) -> str:
    """"tagged" or "waves" for a group whose backend is ``backend`` (see :class:`OverlapDispatcher`)."""
    nccl = "nccl" in str(backend)  # "nccl", or a mixed "cpu:gloo,cuda:nccl" group (the waves run on both)
    if not nccl and backend != "gloo":
        raise ValueError(f"expert_parallel(overlap={overlap!r}) runs on gloo or NCCL process groups; this "
                         f"group's backend is {backend!r} (use overlap='none' there)")
    if transport == "auto":
        return "waves" if nccl else "tagged"
    if transport == "tagged" and nccl:
        # NCCL matches point-to-point ops per pair in issue order without tags and runs them on
        # one stream per communicator: the tagged order (every receive first) would deadlock
        raise ValueError(f"expert_parallel: transport='tagged' needs a gloo group (backend {backend!r}); NCCL "
                         "groups use transport='waves' (the default 'auto' picks it)")
    return transport


def check_overlap(overlap: str, chunks: Chunks, ranks_per_node, transport: str = "auto") -> None:
    if overlap not in OVERLAP_MODES:
        raise ValueError(f"expert_parallel: overlap={overlap!r}, expected one of {OVERLAP_MODES}")
    if transport not in TRANSPORTS:
        raise ValueError(f"expert_parallel: transport={transport!r}, expected one of {TRANSPORTS}")
    if overlap == "none" and transport != "auto":
        raise ValueError(f"expert_parallel: transport={transport!r} applies to overlapped layers (overlap='none')")
    if overlap != "none" and ranks_per_node is not None:
        raise ValueError("expert_parallel: overlap with ranks_per_node (2DH) is not supported: the overlapped "
                         "schemes exchange point-to-point per peer; use the flat exchange")
    if chunks != "auto" and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1):
        raise ValueError(f"expert_parallel: chunks={chunks!r}, expected 'auto' or an int >= 1")
