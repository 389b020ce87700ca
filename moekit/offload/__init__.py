"""Offloaded inference: experts in a slow tier, a budgeted cache of them in the fast tier.

``ExpertCache`` decides residency (bookkeeping only); policies rank experts for eviction;
``simulate`` replays routing traces through the cache. ``store`` keeps the experts of an HF
checkpoint one blob per expert (disk or RAM tier), ``experts.OffloadedExperts`` is the experts
module the cache drives, ``runner.load_offloaded`` builds an HF model around them (torch-backed
names load on first access).
"""
import importlib as _importlib
from moekit.offload.cache import AccessResult, ExpertCache, PhaseStats
from moekit.offload.policies import POLICIES

__all__ = ["ExpertCache", "AccessResult", "PhaseStats", "POLICIES",
           "load_offloaded", "OffloadedModel", "DiskStore", "RamStore", "convert_checkpoint", "StoreError",
           "OffloadedExperts"]

_LAZY = {"load_offloaded": "runner", "OffloadedModel": "runner", "DiskStore": "store", "RamStore": "store",
         "convert_checkpoint": "store", "StoreError": "store", "OffloadedExperts": "experts"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"moekit.offload.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit.offload' has no attribute {name!r}")
