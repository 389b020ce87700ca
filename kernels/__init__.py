"""moekit.kernels: Triton MoE kernels (leaf layer: torch + triton only; triton optional).

Legend: T tokens, D model dim, F expert hidden dim, H rows of w_in (2F for GLU, else F),
E experts, K top-k, N = T*K flat (token, slot) pairs.

Exported (each Triton launcher has a pure-torch ``*_ref`` twin with the same signature):

* ``moe_mlp(x_TD, topk_ids_TK, topk_weights_TK, w_in_EHD, w_out_EDF, activation) -> y_TD``
  and ``moe_mlp_ref``: the grouped expert MLP (forward + autograd backward).
* ``moe_mlp_sorted(x_ND, tokens_per_expert_E, w_in_EHD, w_out_EDF, activation) -> y_ND``: the
  same on rows already sorted by expert (the experts' side of moekit's dispatch seam).
* ``activation_ref`` / ``ACTIVATIONS``: the one activation table (``activations.py``).
* ``route_topk(logits_TE, top_k, *, score_func, bias_E, n_group, topk_group, renormalize,
  scaling_factor) -> (topk_ids_TK, topk_weights_TK, counts_E)`` and ``route_topk_ref``.
* ``moe_align(topk_ids_TK, num_experts, block_m=16) -> AlignedLayout`` and ``moe_align_ref``.
* ``HAS_TRITON``: whether triton is importable (checked without importing it).

Importing this package never imports triton nor touches CUDA: the kernel modules are
imported on first attribute access (PEP 562). Triton reads ``TRITON_INTERPRET`` when a kernel
module is imported, so set it before the first use of a kernel function.

Device policy: CUDA tensors run compiled Triton kernels; CPU tensors run the same kernels
in Triton's interpreter when ``TRITON_INTERPRET=1``; otherwise the launchers raise
``TritonUnavailableError`` (a RuntimeError) naming the pure-torch ``*_ref`` alternative.
"""
from __future__ import annotations

import importlib
import importlib.util



def _triton_importable() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None
        return False


HAS_TRITON: bool = _triton_importable()

_EXPORTS = {
    "moe_mlp": "grouped_mlp",
    "moe_mlp_ref": "grouped_mlp",
    "activation_ref": "activations",
    "pick_block_m": "grouped_mlp",
    "ACTIVATIONS": "activations",
    "moe_mlp_sorted": "grouped_mlp",
    "route_topk": "routing",
    "route_topk_ref": "topk",
    "moe_align": "align",
    "moe_align_ref": "align",
    "AlignedLayout": "align",
    "padded_size": "align",
    "TritonUnavailableError": "_triton_compat",
}

__all__ = ["HAS_TRITON", *_EXPORTS]


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'moekit.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
