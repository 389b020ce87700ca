"""Parallelism applied to a model by functions (the single-device layer stays the reference).

- :func:`expert_parallel`: experts split over a process group, tokens moved by all-to-all
  (flat, or two-level with ``ranks_per_node``); capacity and losses of the global batch;
  ``overlap="chunked" | "fine"`` pipelines the exchange with the experts (:mod:`.overlap`).
- :func:`adaptive_parallel` / :func:`set_parallel_degree`: Tutel's adaptive parallelism, one
  expert layout for every degree r (data parallel, EP + DP, EP + sharded experts), r per call.
- :func:`full_state_dict` / :func:`load_full_state_dict`: the unconverted model's state dict.
- :func:`reduce_expert_grads`: replica gradient sums (and DDP-style averaging) before a step.
- :func:`expert_param_names`: what DDP must leave to the expert-parallel layers.
- :func:`save_checkpoint` / :func:`load_checkpoint`: DCP checkpoints in the unconverted layout,
  loadable at any world size or placement and into the single-device model.
- :func:`shard_dense`: FSDP2 on the dense parameters, the experts left out (the FSDP2 recipe).
- :func:`fssdp`: Hecate's fully sharded sparse data parallelism (one owner per expert, hot
  experts materialised per step with :func:`sparse_all_gather`, grads returned with
  :func:`sparse_reduce_scatter`); see :mod:`moekit.parallel.fssdp`.
"""
from moekit.parallel.adaptive import adaptive_parallel, measure_link, set_parallel_degree
from moekit.parallel.checkpoint import load_checkpoint, save_checkpoint
from moekit.parallel.comm import ExpertParallelError
from moekit.parallel.expert_parallel import (AllToAllDispatcher, ExpertShard, expert_parallel,
                                             expert_param_names, full_state_dict, load_full_state_dict,
                                             reduce_expert_grads)
from moekit.parallel.fssdp import fssdp, sparse_all_gather, sparse_reduce_scatter
from moekit.parallel.hierarchical import HierarchicalTopology
from moekit.parallel.recipes import shard_dense

__all__ = ["fssdp", "sparse_all_gather", "sparse_reduce_scatter",
           "AllToAllDispatcher", "ExpertParallelError", "ExpertShard", "HierarchicalTopology", "adaptive_parallel",
           "expert_parallel", "expert_param_names", "full_state_dict", "load_checkpoint", "load_full_state_dict",
           "measure_link", "reduce_expert_grads", "save_checkpoint", "set_parallel_degree", "shard_dense"]
