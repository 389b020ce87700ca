"""Offloaded inference: experts in a slow tier, a budgeted cache of them in the fast tier.

``ExpertCache`` decides residency (bookkeeping only); policies rank experts for eviction;
``simulate`` replays routing traces through the cache.
"""
from moekit.offload.cache import AccessResult, ExpertCache, PhaseStats
from moekit.offload.policies import POLICIES

__all__ = ["ExpertCache", "AccessResult", "PhaseStats", "POLICIES"]
