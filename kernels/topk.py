"""Top-k routing math in pure torch: the one implementation that ``MoELayer``'s router and the
``route_topk`` kernel's reference share (no triton import here).

Legend: T tokens, E experts, K top-k, G expert groups (``n_group``).

Semantics (the Triton kernel in ``routing.py`` computes the same):

* ``score_func="softmax"``: ``s = softmax(fp32 logits)``; ``"sigmoid"``: ``s = sigmoid(fp32
  logits)``; ``"softmax_topk"``: ``s = fp32 logits`` and the weights are the softmax over the
  K selected logits.
* selection score ``c = s (+ bias_E)``; with ``n_group > 1`` a group scores the sum of its two
  largest ``c`` and only the best ``topk_group`` groups stay eligible.
* ``topk_ids = top-k of c`` (descending, ties to the lower index), ``topk_weights =
  s[topk_ids]`` (the unbiased score), renormalised when ``renormalize`` (softmax: ``w / sum
  w``; sigmoid: ``w / (sum w + 1e-20)``), times ``scaling_factor``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

SCORE_FUNCS = ("softmax", "sigmoid", "softmax_topk")


def _validate(logits_TE, top_k, score_func, bias_E, n_group, topk_group, scaling_factor):
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must be a 2-D tensor [T, E], got "
                         f"{getattr(logits_TE, 'shape', type(logits_TE))}")
    if not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be floating point, got {logits_TE.dtype}")
    T, E = logits_TE.shape
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if bias_E is not None and (bias_E.dim() != 1 or bias_E.shape[0] != E):
        raise ValueError(f"bias_E must have shape [E={E}], got {tuple(bias_E.shape)}")
    if not isinstance(n_group, int) or n_group < 1 or E % n_group:
        raise ValueError(f"n_group={n_group!r} must be a positive int dividing E={E}")
    if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
        raise ValueError(f"topk_group={topk_group!r} must be an int in [1, n_group={n_group}]")
    if n_group > 1:
        if E // n_group < 2:
            raise ValueError(f"group-limited routing needs >= 2 experts per group, got E/n_group={E // n_group}")
        if topk_group * (E // n_group) < top_k:
            raise ValueError(f"topk_group={topk_group} groups of {E // n_group} experts cannot hold top_k={top_k}")
    if not scaling_factor > 0:
        raise ValueError(f"scaling_factor must be > 0, got {scaling_factor!r}")
    return T, E



def select_topk(logits_TE: torch.Tensor, top_k: int, *, score_func: str = "softmax",
                bias_E: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
                renormalize: bool = True, scaling_factor: float = 1.0,
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores_TE, topk_ids_TK int64, topk_weights_TK fp32)`` without validation (callers
    validate once). ``scores_TE`` is ``s`` above, differentiable, as is ``topk_weights_TK``."""
    T, E = logits_TE.shape
    logits = logits_TE.float()
    if score_func == "softmax":
        s = torch.softmax(logits, dim=-1)
    elif score_func == "sigmoid":
        s = torch.sigmoid(logits)
    else:
        s = logits
    c = s.detach()
    if bias_E is not None:
        c = c + bias_E.detach().float()
    if n_group > 1:
        gs = c.view(T, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # [T, G]
        gidx = _stable_topk_idx(gs, topk_group)
        gmask = torch.zeros(T, n_group, dtype=torch.bool, device=c.device).scatter_(1, gidx, True)
        c = c.masked_fill(~gmask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    idx = _stable_topk_idx(c, top_k)
    w = s.gather(1, idx)
    if score_func == "softmax_topk":
        w = torch.softmax(w, dim=-1)
    elif renormalize:
        w = w / (w.sum(-1, keepdim=True) + (1e-20 if score_func == "sigmoid" else 0.0))
    if scaling_factor != 1.0:
        w = w * scaling_factor
    return s, idx, w


def _stable_topk_idx(v: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties toward the lower index."""
    return torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :k]


def route_topk_ref(logits_TE: torch.Tensor, top_k: int, *, score_func: str = "softmax",
                   bias_E: Optional[torch.Tensor] = None, n_group: int = 1, topk_group: int = 1,
                   renormalize: bool = True, scaling_factor: float = 1.0,
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`route_topk` (same outputs, same tie-breaking).
    Differentiable w.r.t. ``logits_TE`` through ``topk_weights_TK``."""
    T, E = _validate(logits_TE, top_k, score_func, bias_E, n_group, topk_group, scaling_factor)
    _, idx, w = select_topk(logits_TE, top_k, score_func=score_func, bias_E=bias_E, n_group=n_group,
                            topk_group=topk_group, renormalize=renormalize, scaling_factor=scaling_factor)
    counts = torch.bincount(idx.flatten(), minlength=E).to(torch.int32)
    return idx.to(torch.int32), w, counts
