"""The expert activations: one table for the Triton kernels, the CPU path and every reference.

Legend: H pre-activation width (2F for GLU forms, else F), F expert hidden dim.

A GLU form splits the pre-activation ``a [..., H=2F]`` as ``[gate (first F); up (last F)]``
(HF v5 ``gate_up_proj``) and returns ``f(gate) * up``; a plain form returns ``f(a)``. ``f`` is
the form's *base* function (silu, exact-erf gelu or relu). ``code`` is the constexpr the
kernels branch on.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Activation(NamedTuple):
    glu: bool
    base: str  # "silu" | "gelu" | "relu"
    code: int  # kernels' constexpr: 0 silu, 1 gelu, 2 relu


ACTIVATIONS: dict[str, Activation] = {
    "swiglu": Activation(True, "silu", 0),
    "geglu": Activation(True, "gelu", 1),
    "silu": Activation(False, "silu", 0),
    "gelu": Activation(False, "gelu", 1),
    "relu": Activation(False, "relu", 2),
}

_BASE = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def check_activation(name: str) -> Activation:
    """The table entry of ``name``; ``ValueError`` naming the choices otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


def activation_ref(a: torch.Tensor, activation: str) -> torch.Tensor:
    """act(a) for pre-activations ``a [..., H]``, differentiable (the reference form)."""
    spec = check_activation(activation)
    if spec.glu:
        gate, up = a.chunk(2, dim=-1)
        return _BASE[spec.base](gate) * up
    return _BASE[spec.base](a)


def base_activation(z: torch.Tensor, base: str) -> torch.Tensor:
    """The base function ``f(z)`` alone."""
    return _BASE[base](z)


def base_activation_grad_into(out: torch.Tensor, grad: torch.Tensor, z: torch.Tensor, base: str) -> None:
    """``out = grad * f'(z)`` with aten's backward kernel of ``f`` (the products autograd forms)."""
    aten = torch.ops.aten
    if base == "silu":
        aten.silu_backward.grad_input(grad, z, grad_input=out)
    elif base == "gelu":
        aten.gelu_backward.grad_input(grad, z, grad_input=out)
    else:
        aten.threshold_backward.grad_input(grad, z, 0, grad_input=out)
