"""moekit: Mixture-of-Experts training and serving toolkit for PyTorch.

``import moekit`` never imports triton and never initialises CUDA.
"""
from moekit.config import PRESETS, MoEConfig
from moekit.layer import MoELayer, moe_layers, register_bias_update_hook, switch_aux_loss
from moekit.router import Routing, TopKRouter
from moekit import trace  # noqa: E402  (moekit.trace.record)

__version__ = "0.1.0"

__all__ = ["MoEConfig", "PRESETS", "MoELayer", "Routing", "TopKRouter", "moe_layers",
           "register_bias_update_hook", "switch_aux_loss", "trace", "__version__"]
