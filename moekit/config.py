"""MoEConfig: every knob of an MoE layer, validated once, with named presets.

Legend used across moekit: T tokens, D model dim, F expert hidden dim, E experts,
K top-k, S shared-expert hidden dim.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

# torch-free here (``import moekit.planner`` and ``moekit --help`` must not import torch): the
# activation table (moekit.kernels.activations) is imported when a config is validated.
# The expert backends by name (one module each in moekit/experts/, registered there under
# exactly these names) and "auto", which picks one of them per device.
BACKENDS = ("loop", "cpu", "grouped_mm", "triton")
BACKEND_CHOICES = ("auto", *BACKENDS)
LOGIT_CHECKS = ("auto", "sync", "async", "off")


@dataclass
class MoEConfig:
    """Configuration of one MoE layer (router + routed experts + optional shared experts).

    Routing:
        router: ``"softmax"`` (Mixtral/Qwen/OLMoE) or ``"sigmoid"`` (DeepSeek-V3).
        topk_before_softmax: softmax over the K selected logits only (Megatron's default
            "post-softmax"); for ``router="softmax"`` with renormalisation this equals
            softmax -> top-k -> renormalise.
        norm_topk_prob: renormalise the K selected weights to sum to 1.
        routed_scaling_factor: multiplies the final routing weights (DeepSeek-V3: 2.5).
        n_group / topk_group: group-limited routing (DeepSeek-V3): experts are split into
            ``n_group`` groups, a group scores the sum of its top-2 biased scores, only the
            best ``topk_group`` groups are eligible.
        score_correction_bias: keep a per-expert selection bias buffer (aux-loss-free
            balancing); it changes which experts are chosen, never the weights.
        router_bias: the gate linear has a bias (GPT-OSS).
        router_jitter: training-only multiplicative input jitter U(1-eps, 1+eps) (Mixtral);
            it is applied to the expert input as well, as in HF.
        router_logit_noise: training-only Gaussian noise std added to router logits.

    Capacity (Tutel semantics, ``C`` per expert):
        capacity_factor None: dropless (default).
        cf > 0: C = K * int(cf * ceil(T / E)); overflow dropped by ``drop_policy``.
        cf == 0: C = tokens of the busiest expert (dropless, padded layout semantics).
        cf < 0: C = min(K * int(-cf * ceil(T / E)), tokens of the busiest expert).
        drop_policy: ``"probs"`` keeps the highest routing weights, ``"position"`` the first tokens.

    Losses (attached to the autograd graph; ``forward`` returns a plain tensor):
        aux_loss_coef: Switch/GShard load-balancing loss ``coef * E * sum_e f_e * P_e``.
        aux_loss_norm: ``"hf"``: f_e = assignments_e / T (sums to K, HF's
            ``load_balancing_loss_func``); ``"megatron"``: f_e = assignments_e / (T * K)
            (sums to 1), so the HF value is K times the Megatron value.
        seq_aux_loss_coef: the same loss computed per sequence and averaged (DeepSeek-V3's
            sequence-wise balance loss); needs input shaped ``[B, S, D]``.
        z_loss_coef: ``coef * mean_t logsumexp(logits_t)^2`` (ST-MoE).
        bias_update_rate: aux-loss-free update ``b += rate * sign(mean(count) - count)``
            applied by :meth:`MoELayer.update_bias` (needs ``score_correction_bias``).

    Compute:
        backend: expert compute (``moekit.experts``): ``"auto"``, ``"loop"``, ``"cpu"``,
            ``"grouped_mm"``, ``"triton"``.
        check_logits: NaN/inf check of the router logits. ``"sync"``: raise
            ``FloatingPointError`` naming the first bad token (reads the result on the host);
            ``"async"``: ``torch._assert_async`` (no host sync; on CUDA a failure is a
            device-side assert that ends the process); ``"off"``; ``"auto"``: ``sync`` on CPU,
            where it costs no device round trip, ``async`` on accelerators and under
            ``torch.compile``.
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int
    activation: str = "swiglu"
    # routing
    router: str = "softmax"
    topk_before_softmax: bool = False
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score_correction_bias: bool = False
    router_bias: bool = False
    router_jitter: float = 0.0
    router_logit_noise: float = 0.0
    # shared experts
    num_shared_experts: int = 0
    shared_expert_hidden_size: Optional[int] = None  # total S; default ffn_hidden_size * num_shared_experts
    shared_expert_gate: bool = False
    # capacity
    capacity_factor: Optional[float] = None
    drop_policy: str = "probs"
    # losses and balancing
    aux_loss_coef: float = 0.0
    aux_loss_norm: str = "hf"
    seq_aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0
    # compute
    backend: str = "auto"
    check_logits: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        from moekit.kernels.activations import check_activation

        check_activation(self.activation)
        _choice("router", self.router, ("softmax", "sigmoid"))
        _choice("drop_policy", self.drop_policy, ("probs", "position"))
        _choice("aux_loss_norm", self.aux_loss_norm, ("hf", "megatron"))
        _choice("backend", self.backend, BACKEND_CHOICES)
        _choice("check_logits", self.check_logits, LOGIT_CHECKS)
        _positive_int("n_group", self.n_group)
        _positive_int("topk_group", self.topk_group)
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if per_group < 2:
                raise ValueError(f"group-limited routing needs >= 2 experts per group, got {per_group}")
            if self.topk_group * per_group < self.top_k:
                raise ValueError(
                    f"topk_group={self.topk_group} groups of {per_group} experts cannot hold top_k={self.top_k}")
        if self.router == "sigmoid" and self.topk_before_softmax:
            raise ValueError("topk_before_softmax=True only applies to router='softmax'")
        if self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.shared_expert_hidden_size is not None:
            _positive_int("shared_expert_hidden_size", self.shared_expert_hidden_size)
            if self.num_shared_experts == 0:
                raise ValueError("shared_expert_hidden_size is set but num_shared_experts=0")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1")
        for name in ("routed_scaling_factor",):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("router_jitter", "router_logit_noise", "aux_loss_coef", "seq_aux_loss_coef",
                     "z_loss_coef", "bias_update_rate", "init_std"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        if self.router_jitter >= 1:
            raise ValueError(f"router_jitter must be < 1, got {self.router_jitter}")
        if self.bias_update_rate > 0 and not self.score_correction_bias:
            raise ValueError("bias_update_rate > 0 needs score_correction_bias=True")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if not isinstance(cf, (int, float)) or cf != cf or cf in (float("inf"), float("-inf")):
                raise ValueError(f"capacity_factor must be a finite number or None, got {cf!r}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def is_glu(self) -> bool:
        """Gated activations keep a stacked [gate; up] projection of 2F rows."""
        from moekit.kernels.activations import ACTIVATIONS

        return ACTIVATIONS[self.activation].glu

    @property
    def shared_hidden(self) -> int:
        """Total hidden size S of the shared expert(s), 0 when there are none."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden_size or self.ffn_hidden_size * self.num_shared_experts

    def replace(self, **changes: Any) -> "MoEConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "MoEConfig":
        """A named preset (``debug``, ``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``,
        ``deepseek_v3``, ``gpt_oss``) with optional field overrides.

        Sizes are those of the released models' MoE blocks; pass ``hidden_size=...`` etc.
        to shrink them.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "debug": dict(hidden_size=32, ffn_hidden_size=24, num_experts=6, top_k=2),
    # Mixtral-8x7B: softmax top-2, renormalised, SwiGLU experts, training jitter available.
    "mixtral": dict(hidden_size=4096, ffn_hidden_size=14336, num_experts=8, top_k=2, norm_topk_prob=True),
    # Qwen1.5/2-MoE-A2.7B: 60 experts top-4 no renorm, gated shared expert of 5632.
    "qwen2_moe": dict(hidden_size=2048, ffn_hidden_size=1408, num_experts=60, top_k=4, norm_topk_prob=False,
                      num_shared_experts=1, shared_expert_hidden_size=5632, shared_expert_gate=True),
    # Qwen3-30B-A3B: 128 experts top-8, renormalised, no shared expert.
    "qwen3_moe": dict(hidden_size=2048, ffn_hidden_size=768, num_experts=128, top_k=8, norm_topk_prob=True),
    # OLMoE-1B-7B: 64 experts top-8, no renorm.
    "olmoe": dict(hidden_size=2048, ffn_hidden_size=1024, num_experts=64, top_k=8, norm_topk_prob=False),
    # DeepSeek-V3: sigmoid, correction bias, 8 groups keep 4, top-8, scale 2.5, 1 shared expert.
    "deepseek_v3": dict(hidden_size=7168, ffn_hidden_size=2048, num_experts=256, top_k=8, router="sigmoid",
                        norm_topk_prob=True, routed_scaling_factor=2.5, n_group=8, topk_group=4,
                        score_correction_bias=True, num_shared_experts=1),
    # GPT-OSS-20B: 32 experts top-4, router bias, softmax over the top-k logits.
    "gpt_oss": dict(hidden_size=2880, ffn_hidden_size=2880, num_experts=32, top_k=4, router_bias=True,
                    topk_before_softmax=True),
}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {choices}")
