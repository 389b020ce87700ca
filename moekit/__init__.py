"""moekit: Mixture-of-Experts training and serving toolkit for PyTorch.

``import moekit`` never imports triton and never initialises CUDA. The torch-backed names
(``MoELayer``, ``trace``, ...) load on first access, so ``import moekit.planner`` (numpy +
pulp) works on a machine without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from moekit.config import PRESETS, MoEConfig

__version__ = "0.1.0"

_LAZY = {
    "MoELayer": "moekit.layer", "moe_layers": "moekit.layer",
    "register_bias_update_hook": "moekit.layer", "switch_aux_loss": "moekit.layer",
    "set_aux_loss_scale": "moekit.layer",
    "Routing": "moekit.router", "TopKRouter": "moekit.router",
}
_LAZY_MODULES = ("trace", "hf", "demo", "experts", "layer", "router", "dispatch")

__all__ = ["MoEConfig", "PRESETS", *_LAZY, "trace", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from moekit import trace
    from moekit.layer import (MoELayer, moe_layers, register_bias_update_hook, set_aux_loss_scale,
                              switch_aux_loss)
    from moekit.router import Routing, TopKRouter


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _LAZY_MODULES:
        value = importlib.import_module(f"moekit.{name}")
    else:
        raise AttributeError(f"module 'moekit' has no attribute {name!r}")
    globals()[name] = value
    return value
