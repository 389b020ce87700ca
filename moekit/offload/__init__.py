"""Offloaded inference: experts in a slow tier, a budgeted cache of them in the fast tier.

``ExpertCache`` decides residency (bookkeeping only); policies rank experts for eviction;
``simulate`` replays routing traces through the cache. ``store`` keeps the experts of an HF
checkpoint one blob per expert (disk or RAM tier), ``experts.OffloadedExperts`` is the experts
module the cache drives, ``runner.load_offloaded`` builds an HF model around them (torch-backed
names load on first access). ``prefetch.Prefetcher`` predicts the next layers' experts with
their routers and reads them on a background thread (``load_offloaded(prefetch=True)``);
``throughput`` predicts decode tokens/s and the bound from calibrated rates and decides, per
miss on a GPU over a RAM tier, between copying and computing where the expert lives.
"""
import importlib as _importlib
from moekit.offload.cache import AccessResult, ExpertCache, PhaseStats
from moekit.offload.policies import POLICIES

__all__ = ["ExpertCache", "AccessResult", "PhaseStats", "POLICIES",
           "load_offloaded", "OffloadedModel", "DiskStore", "RamStore", "convert_checkpoint", "StoreError",
           "OffloadedExperts", "Prefetcher", "predict_decode", "calibrate", "Rates", "ModelShape", "MissCostModel"]

_LAZY = {"load_offloaded": "runner", "OffloadedModel": "runner", "DiskStore": "store", "RamStore": "store",
         "convert_checkpoint": "store", "StoreError": "store", "OffloadedExperts": "experts",
         "Prefetcher": "prefetch", "predict_decode": "throughput", "calibrate": "throughput", "Rates": "throughput",
         "ModelShape": "throughput", "MissCostModel": "throughput"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(f"moekit.offload.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moekit.offload' has no attribute {name!r}")
