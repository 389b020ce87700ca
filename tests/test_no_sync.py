"""No per-layer host sync on the device path: the ops that read a device value on the host
(``.item()``, ``bool(t)``, data-dependent output sizes) are counted on CPU with a dispatch mode
while the layer runs the device-agnostic ``grouped_mm`` path with the asynchronous NaN check.
On CUDA each of them would be a sync."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import MoEConfig, MoELayer

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.bincount.default,
           aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default,
           aten.is_nonzero.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func is aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _layer(**kw):
    cfg = MoEConfig(hidden_size=32, ffn_hidden_size=16, num_experts=6, top_k=2, backend="grouped_mm",
                    check_logits="async", aux_loss_coef=0.01, z_loss_coef=1e-3, **kw)
    torch.manual_seed(0)
    return MoELayer(cfg)


def test_dropless_forward_and_backward_have_no_host_sync():
    layer = _layer(num_shared_experts=1, shared_expert_gate=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    with SyncCounter() as c:
        layer(x).square().mean().backward()
    assert c.seen == []
    assert layer.experts.w_in.grad is not None


def test_counter_sees_a_sync():
    """Guards the test above: the synchronous NaN check reads a value on the host."""
    layer = _layer()
    layer.config.check_logits = "sync"
    with SyncCounter() as c:
        layer(torch.randn(5, 32))
    assert c.seen


def test_async_check_still_raises_on_nan():
    layer = _layer()
    x = torch.randn(5, 32)
    x[3, 0] = float("nan")
    try:
        layer(x)
    except RuntimeError as exc:  # torch._assert_async on CPU raises at once
        assert "NaN" in str(exc) or "Expected" in str(exc)
    else:
        raise AssertionError("NaN logits were not caught")
