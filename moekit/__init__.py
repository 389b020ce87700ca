"""moekit: Mixture-of-Experts training and serving toolkit for PyTorch.

``import moekit`` never imports triton and never initialises CUDA.
"""
from moekit.config import MoEConfig, PRESETS

__version__ = "0.1.0"

__all__ = ["MoEConfig", "PRESETS", "__version__"]
