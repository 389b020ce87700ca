"""FSSDP (Hecate): fully sharded sparse data parallelism for MoE training.

- :func:`fssdp`: convert a model (owners per expert, P' per step, DDP on dense parameters).
- :func:`sparse_all_gather` / :func:`sparse_reduce_scatter`: the sparse collectives, alone.
- :func:`choose_materialization` (Algorithm 1), :func:`reshard_owners` (Algorithm 2).
- :mod:`moekit.parallel.fssdp.ledger`: bytes and memory formulas (REFERENCE §2).
- :func:`full_optim_state` / :func:`load_full_optim_state`: optimizer state in the unconverted
  layout (with ``full_state_dict``: checkpoints independent of the owner map).
"""
from moekit.parallel.fssdp.materialize import LoadWindow, choose_materialization, overlap_degree
from moekit.parallel.fssdp.sharding import reshard_owners
from moekit.parallel.fssdp.state import full_optim_state, load_full_optim_state
from moekit.parallel.fssdp.sparse import (Materialization, Traffic, launch_all_gather, sparse_all_gather,
                                          sparse_reduce_scatter)
from moekit.parallel.fssdp.wrap import (FSSDPError, FSSDPExperts, SparseDispatcher, attach_optimizer, fssdp,
                                        fssdp_state)

__all__ = ["FSSDPError", "FSSDPExperts", "LoadWindow", "Materialization", "SparseDispatcher", "Traffic",
           "attach_optimizer", "choose_materialization", "fssdp", "fssdp_state", "full_optim_state",
           "launch_all_gather", "load_full_optim_state",
           "overlap_degree", "reshard_owners", "sparse_all_gather", "sparse_reduce_scatter"]
