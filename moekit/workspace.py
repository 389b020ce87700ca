"""Reused CPU buffers for the expert path's large intermediates.

Why: a training step of the CPU expert path needs a few ``[T*K, D]`` and ``[N, 2F]`` buffers
(output slots, the saved up-projection, the input-gradient slots), 64 MiB each for an
OLMoE-like layer at T=2048, and weight gradients ``[E, 2F, D]`` + ``[E, D, F]`` (384 MiB).
Served fresh each step they come from ``mmap`` (glibc maps every block above 32 MiB) and are
paid for again in page faults, and on a VM whose balloon reports free pages, in host faults
too. Measured on the 2-core benchmark box: filling a fresh 256 MiB tensor took 68-114 ms,
filling a reused one 10 ms; in an ad-hoc profile of the OLMoE-like backward the weight-gradient
GEMMs ran at ~60 GFLOPS per thread into fresh memory, ~80 into huge-page-backed memory (few faults).
Keeping those buffers between steps, like a GPU caching allocator does, removes that cost.

A buffer is taken with :meth:`BufferPool.take` and given back with :meth:`BufferPool.give`
once nothing reads it any more; or tied to an autograd context with :class:`Lease`, which gives
its buffers back when the context is freed (after backward, or when the graph is dropped), so a
graph kept with ``retain_graph=True`` keeps its buffers; or lent with :meth:`BufferPool.lend`
as a tensor that comes back by itself when torch frees its storage (weight gradients: they
come back at ``zero_grad()``).
"""
from __future__ import annotations

import math
import os
import threading
from typing import Sequence

import numpy as np
import torch

_MIN_BYTES = 1 << 20  # smaller buffers come from the heap's free lists already


class BufferPool:
    """Idle contiguous CPU buffers, reused by exact dtype and a size within 25 % of the request.

    ``max_idle_bytes`` bounds the memory held while idle (beyond it a given-back buffer is
    simply freed). Thread-safe: workers and the autograd engine may take and give."""

    def __init__(self, max_idle_bytes: int = 2 << 30):
        self.max_idle_bytes = max_idle_bytes
        self._idle: list[torch.Tensor] = []  # flat 1-D tensors
        self._idle_bytes = 0
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype``."""
        numel = math.prod(int(s) for s in shape)
        if numel * dtype.itemsize >= _MIN_BYTES:
            with self._lock:
                best = None
                for i, buf in enumerate(self._idle):
                    if buf.dtype == dtype and numel <= buf.numel() <= numel + numel // 4:
                        if best is None or buf.numel() < self._idle[best].numel():
                            best = i
                if best is not None:
                    buf = self._idle.pop(best)
                    self._idle_bytes -= buf.numel() * buf.element_size()
                    return buf[:numel].view(tuple(shape))
        return torch.empty(tuple(shape), dtype=dtype)

    def give(self, *tensors: torch.Tensor) -> None:
        """Return buffers from :meth:`take`; the caller must not touch them afterwards."""
        with self._lock:
            for t in tensors:
                base = t._base if t._base is not None else t
                nbytes = base.numel() * base.element_size()
                if any(base.data_ptr() == b.data_ptr() for b in self._idle):
                    raise RuntimeError("BufferPool.give: buffer given back twice")
                if (nbytes < _MIN_BYTES or base.device.type != "cpu" or not base.is_contiguous()
                        or self._idle_bytes + nbytes > self.max_idle_bytes):
                    continue  # not worth keeping, or over the bound: freed as usual
                self._idle.append(base.view(-1))
                self._idle_bytes += nbytes

    def lend(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous uninitialised tensor on pooled memory that comes back to the pool by
        itself once the last tensor sharing its storage is freed (torch's own reference count
        decides, so it may be handed out: autograd makes it a parameter's ``.grad``, and
        ``zero_grad()`` returns it). For buffers that leave moekit, such as weight gradients."""
        numel = math.prod(int(s) for s in shape)
        nbytes = numel * dtype.itemsize
        if nbytes < _MIN_BYTES:
            return torch.empty(tuple(shape), dtype=dtype)
        base = self.take((nbytes,), torch.uint8)
        holder = base.numpy().view(_GivesBack)  # numpy: torch.frombuffer keeps its owner alive
        holder._pool, holder._base = self, base
        return torch.frombuffer(holder, dtype=dtype, count=numel).view(tuple(shape))

    def clear(self) -> None:
        """Free every idle buffer."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0

    def _after_fork(self) -> None:
        # a forked child (e.g. a DataLoader worker) may have been forked while another thread
        # held the lock; it starts with a fresh lock and no idle buffers
        self._lock = threading.Lock()
        self._idle, self._idle_bytes = [], 0


class _GivesBack(np.ndarray):
    """The owner of a :meth:`BufferPool.lend` tensor's memory: freed with that tensor's
    storage, it gives the pooled buffer back."""

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            self._pool = None
            try:
                pool.give(self._base)
            except Exception:  # interpreter shutdown; never raise from a finaliser
                pass


class Lease:
    """Buffers lent to one autograd context: given back to the pool when the lease is freed,
    which happens when the context holding it is (not before: a retained graph keeps them)."""

    def __init__(self, pool: BufferPool, *tensors: torch.Tensor):
        self._pool, self._tensors = pool, tensors

    def __del__(self):
        if self._tensors:
            tensors, self._tensors = self._tensors, ()
            self._pool.give(*tensors)


POOL = BufferPool()  # process-wide: an execution resource, like the expert worker threads

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=POOL._after_fork)
