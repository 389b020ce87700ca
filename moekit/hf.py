"""Hugging Face MoE blocks <-> :class:`~moekit.layer.MoELayer`.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, S shared-expert
hidden dim.

API::

    from_hf(block, *, share_weights=False, backend="auto", config_overrides=None) -> MoELayer
    to_hf(layer, block) -> block                  # write MoELayer weights back into an HF block
    patch_model(model, *, share_weights=False, backend="auto", config_overrides=None) -> model  # in place
    unpatch_model(model) -> model                 # in place: fresh HF blocks holding the current weights
    export_state_dict(model) -> dict              # HF-format state dict of a patched model
    save_pretrained(model, path, **kw)            # model.save_pretrained with the exported state dict
    hf_tensors(layer) -> dict                     # one layer's tensors under its HF block's keys
    hf_family(module) -> str | None               # which supported family a module is

Supported HF families (transformers 5.x class names; subclasses are recognised too):

=============  ==========================  ===============================================
family         block class                 routing
=============  ==========================  ===============================================
mixtral        ``MixtralSparseMoeBlock``   softmax -> top-k -> renormalise; training jitter
qwen2_moe      ``Qwen2MoeSparseMoeBlock``  softmax -> top-k (renorm iff ``norm_topk_prob``)
                                           + shared expert gated by ``sigmoid(x @ g)``
qwen3_moe      ``Qwen3MoeSparseMoeBlock``  as qwen2_moe, no shared expert
olmoe          ``OlmoeSparseMoeBlock``     as qwen3_moe
deepseek_v3    ``DeepseekV3MoE``           sigmoid, correction bias, group-limited top-k,
                                           renorm (eps 1e-20), scaling; ungated shared experts
=============  ==========================  ===============================================

``GptOssMLP`` raises :class:`NotImplementedError` (expert biases and the clamped
``(up + 1) * gate * sigmoid(alpha * gate)`` activation are not expressible by
:class:`~moekit.config.MoEConfig`); any other block raises :class:`TypeError`.

Weight layouts accepted (HF v5 is the one transformers 5.x builds for all five families):

- fused (v5): router ``gate.weight [E, D]``; ``experts.gate_up_proj [E, 2F, D]`` (gate rows
  first) and ``experts.down_proj [E, D, F]``; these are exactly MoELayer's
  ``router.weight``, ``experts.w_in`` and ``experts.w_out``.
- per-expert ``nn.ModuleList`` (transformers 4.x blocks, Hub checkpoint keys): each expert
  holds ``w1`` (gate), ``w3`` (up), ``w2`` (down) or ``gate_proj``, ``up_proj``,
  ``down_proj`` bias-free ``nn.Linear`` layers; the router may be an ``nn.Linear``.
- shared expert (``shared_expert`` / ``shared_experts``): ``gate_proj``, ``up_proj``,
  ``down_proj`` Linear layers -> ``shared_expert.w_in [2S, D]`` (gate rows first),
  ``shared_expert.w_out [D, S]``; ``shared_expert_gate.weight [1, D]`` as is.
- ``gate.e_score_correction_bias [E]`` -> ``router.e_score_correction_bias`` (kept fp32).

``share_weights``:

- ``False`` (default): MoELayer gets fresh copies; the HF block is left untouched.
- ``True``: every MoELayer tensor whose HF counterpart has the same layout *is* the HF
  tensor (the same ``nn.Parameter`` object, hence the same storage and the same ``.grad``):
  router weight, fused ``gate_up_proj`` / ``down_proj``, shared ``down_proj`` and
  ``shared_expert_gate`` weights, and the correction-bias buffer (when it is fp32, as HF
  keeps it; otherwise it is copied to fp32). Tensors HF keeps split
  (the shared expert's ``gate_proj`` + ``up_proj``, per-expert Linear layers) cannot be one
  Parameter: MoELayer gets a new stacked Parameter and the HF block's split weights are
  re-bound as views into its storage, so in-place updates (optimizer steps, ``copy_``) on
  either side are seen by the other, but Parameter identity and ``.grad`` are not shared
  for those. No memory is duplicated in either case.

Numerics: MoELayer computes router logits, softmax/sigmoid and the top-k weights in fp32
from an fp32 copy of the input and router weight, and casts the combine weights to the
hidden dtype before the weighted sum. That is bit-for-bit HF's recipe in fp32. In bf16/fp16
it differs slightly: HF Mixtral/Qwen/OLMoE compute the router matmul in the hidden dtype,
and HF Mixtral/DeepSeek-V3 multiply expert outputs by fp32 weights before casting back.

Router logits: in transformers 5.x, ``output_router_logits`` is served by forward hooks on
the HF router classes (``_can_record_outputs`` / ``OutputRecorder``), which no longer exist
after patching. :func:`from_hf` registers a routing observer on every MoELayer it makes that
appends the fp32 logits ``[T, E]`` (in the graph, so HF's ``load_balancing_loss_func``
trains the router) to HF's active output collector, exactly where the hook would have.
If an HF block returns a tuple ``(hidden, router_logits)`` (transformers 4.x style; probed
on one token at patch time), the MoELayer is wrapped in :class:`HFMoEAdapter`, which
returns that tuple; otherwise the MoELayer itself replaces the block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.router import Routing

__all__ = ["HFMoEAdapter", "HFSpec", "SUPPORTED_BLOCKS", "from_hf", "to_hf", "patch_model", "unpatch_model",
           "export_state_dict", "save_pretrained", "hf_family", "hf_tensors"]

# class name -> family; the MRO is walked, so subclasses of these classes are recognised
SUPPORTED_BLOCKS: dict[str, str] = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
}
_NOT_IMPLEMENTED_BLOCKS: dict[str, str] = {
    "GptOssMLP": ("GPT-OSS experts have biases (gate_up_proj_bias, down_proj_bias), an interleaved gate/up "
                  "layout and a clamped activation (up.clamp(+-limit) + 1) * g * sigmoid(alpha * g) with "
                  "g = gate.clamp(max=limit); MoEConfig has no expert bias and no such activation"),
}
_SHARED_ATTRS = ("shared_expert", "shared_experts")
_MISSING = object()


@dataclass(frozen=True)
class HFSpec:
    """How a MoELayer maps back onto the HF block it came from (kept as ``layer.hf_spec``).

    family: one of :data:`SUPPORTED_BLOCKS`' values.
    block_class: the HF block's class (used by :func:`unpatch_model`).
    experts_layout: ``"fused"`` (v5 ``gate_up_proj``/``down_proj``), ``"w123"`` or
        ``"gate_up_down"`` (per-expert ``nn.ModuleList``).
    shared_attr: ``"shared_expert"`` / ``"shared_experts"`` / None.
    shared_gate: the block has a ``shared_expert_gate`` Linear.
    returns_tuple: the HF block returned ``(hidden, router_logits)``.
    """

    family: str
    block_class: type
    experts_layout: str
    shared_attr: Optional[str]
    shared_gate: bool
    returns_tuple: bool = False


class HFMoEAdapter(nn.Module):
    """Wraps a MoELayer where the HF caller expects ``(hidden, router_logits)`` from the block.

    ``router_logits`` is the fp32 ``[T, E]`` logits of this forward cast to the hidden dtype.
    Its submodule ``moe`` is the MoELayer (parameters ``moe.router.weight`` ...).
    """

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self._last_logits: Optional[torch.Tensor] = None
        moe.add_routing_observer(_AdapterLogitsObserver(self))

    def forward(self, hidden_states: torch.Tensor):
        self._last_logits = None
        y = self.moe(hidden_states)
        logits = self._last_logits
        self._last_logits = None
        return y, (logits.to(hidden_states.dtype) if logits is not None else None)


class _AdapterLogitsObserver:
    """Routing observer (a picklable callable, not a closure) that hands logits to an adapter."""

    def __init__(self, adapter: HFMoEAdapter):
        self.adapter_ref = [adapter]  # list: not registered as a submodule, survives deepcopy

    def __call__(self, layer: MoELayer, routing: Routing) -> None:
        self.adapter_ref[0]._last_logits = routing.logits_TE


def _record_hf_router_logits(layer: MoELayer, routing: Routing) -> None:
    """Routing observer: append the logits to HF's active output collector (transformers 5.x
    ``capture_outputs``), where the ``OutputRecorder`` hook on the HF router would have."""
    collector = _hf_active_collector()
    if collector is None:
        return
    collected = collector.get()
    if collected is None or "router_logits" not in collected:
        return
    collected["router_logits"].append(routing.logits_TE)


def _hf_active_collector():
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # transformers 4.x: logits travel through the block's return value
        return None
    return _active_collector


# ---- family detection ----------------------------------------------------------------------------

def hf_family(block: nn.Module) -> Optional[str]:
    """The moekit family name of an HF MoE block, or None for any other module.

    Raises NotImplementedError for a known MoE block moekit cannot reproduce (GPT-OSS)."""
    for cls in type(block).__mro__:
        if cls.__name__ in SUPPORTED_BLOCKS:
            return SUPPORTED_BLOCKS[cls.__name__]
        if cls.__name__ in _NOT_IMPLEMENTED_BLOCKS:
            raise NotImplementedError(
                f"{type(block).__name__} is not supported by moekit.hf: {_NOT_IMPLEMENTED_BLOCKS[cls.__name__]}")
    return None


def _looks_like_moe_block(module: nn.Module) -> bool:
    """Heuristic for 'an MoE block of some family': it holds experts and a router/gate."""
    has_experts = isinstance(getattr(module, "experts", None), nn.Module)
    has_router = any(isinstance(getattr(module, a, None), nn.Module) for a in ("gate", "router"))
    return has_experts and has_router and not isinstance(module, (MoELayer, HFMoEAdapter))


def _require_family(block: nn.Module) -> str:
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module (an HF MoE block), got {type(block).__name__}")
    family = hf_family(block)
    if family is None:
        raise TypeError(
            f"{type(block).__name__} is not a supported Hugging Face MoE block; supported classes: "
            f"{sorted(SUPPORTED_BLOCKS)} (and subclasses)")
    return family


# ---- reading an HF block -------------------------------------------------------------------------

def _get(objs, names, default=_MISSING, what=""):
    for obj in objs:
        if obj is None:
            continue
        for name in names:
            v = getattr(obj, name, _MISSING)
            if v is not _MISSING and v is not None and not isinstance(v, nn.Module):
                return v
    if default is _MISSING:
        raise ValueError(f"cannot find {what or names[0]} on {[type(o).__name__ for o in objs if o is not None]}")
    return default


def _activation(act_fn: Any, where: str) -> str:
    """moekit GLU activation name of an HF ``act_fn`` module/function."""
    import torch.nn.functional as F

    name = type(act_fn).__name__
    if act_fn is F.silu or name in ("SiLU", "SiLUActivation"):
        return "swiglu"
    if name == "GELUActivation" and getattr(act_fn, "act", F.gelu) is F.gelu:
        return "geglu"
    if act_fn is F.gelu or (name == "GELU" and getattr(act_fn, "approximate", "none") == "none"):
        return "geglu"
    raise NotImplementedError(
        f"{where}: activation {name} has no moekit equivalent (moekit GLU experts use silu or exact gelu)")


def _linear_weight(mod: nn.Module, where: str) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise ValueError(f"{where} has no weight")
    if getattr(mod, "bias", None) is not None:
        raise NotImplementedError(f"{where} has a bias; moekit experts are bias-free")
    return w


def _experts_layout(experts: nn.Module, where: str) -> str:
    if isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and \
            isinstance(getattr(experts, "down_proj", None), torch.Tensor):
        for b in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(experts, b, None) is not None:
                raise NotImplementedError(f"{where}.experts has {b}; moekit experts are bias-free")
        return "fused"
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        first = experts[0]
        if all(isinstance(getattr(first, n, None), nn.Linear) for n in ("w1", "w2", "w3")):
            return "w123"
        if all(isinstance(getattr(first, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return "gate_up_down"
    raise TypeError(f"{where}.experts ({type(experts).__name__}) has neither fused gate_up_proj/down_proj "
                    f"nor a ModuleList of {{w1,w2,w3}} / {{gate,up,down}}_proj Linear experts")


_PER_EXPERT_NAMES = {"w123": ("w1", "w3", "w2"), "gate_up_down": ("gate_proj", "up_proj", "down_proj")}


def _read_block(block: nn.Module, family: str, backend: str) -> tuple[MoEConfig, HFSpec]:
    where = type(block).__name__
    router = getattr(block, "gate", None)
    if not isinstance(router, nn.Module):
        raise TypeError(f"{where} has no 'gate' router module")
    router_w = _linear_weight(router, f"{where}.gate") if isinstance(router, nn.Linear) else router.weight
    if getattr(router, "bias", None) is not None:
        raise NotImplementedError(f"{where}.gate has a bias, which no supported family has")
    E, D = router_w.shape
    hf_cfg = getattr(block, "config", None)
    srcs = (router, block, hf_cfg)
    K = int(_get(srcs, ("top_k", "num_experts_per_tok"), what="top_k"))
    experts = getattr(block, "experts", None)
    if not isinstance(experts, nn.Module):
        raise TypeError(f"{where} has no 'experts' module")
    layout = _experts_layout(experts, where)
    if layout == "fused":
        gate_up, down = experts.gate_up_proj, experts.down_proj
        if gate_up.dim() != 3 or gate_up.shape[0] != E or gate_up.shape[2] != D or gate_up.shape[1] % 2:
            raise ValueError(f"{where}.experts.gate_up_proj has shape {tuple(gate_up.shape)}; "
                             f"expected [E={E}, 2F, D={D}]")
        Fh = gate_up.shape[1] // 2
        if tuple(down.shape) != (E, D, Fh):
            raise ValueError(f"{where}.experts.down_proj has shape {tuple(down.shape)}; expected [{E}, {D}, {Fh}]")
        act_fn = getattr(experts, "act_fn", None)
    else:
        if len(experts) != E:
            raise ValueError(f"{where}.experts has {len(experts)} experts but the router has {E}")
        g, u, d = _PER_EXPERT_NAMES[layout]
        Fh = _linear_weight(getattr(experts[0], g), f"{where}.experts.0.{g}").shape[0]
        for e, ex in enumerate(experts):
            for n, shape in ((g, (Fh, D)), (u, (Fh, D)), (d, (D, Fh))):
                w = _linear_weight(getattr(ex, n), f"{where}.experts.{e}.{n}")
                if tuple(w.shape) != shape:
                    raise ValueError(f"{where}.experts.{e}.{n}.weight has shape {tuple(w.shape)}, expected {shape}")
        act_fn = getattr(experts[0], "act_fn", None)
    if act_fn is None:
        raise ValueError(f"{where}: cannot find the experts' act_fn")
    activation = _activation(act_fn, f"{where}.experts")

    fields: dict[str, Any] = dict(hidden_size=D, ffn_hidden_size=Fh, num_experts=E, top_k=K,
                                  activation=activation, backend=backend)
    if family == "mixtral":
        fields.update(router="softmax", norm_topk_prob=True,
                      router_jitter=float(_get((block, hf_cfg), ("jitter_noise", "router_jitter_noise"), 0.0)))
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        fields.update(router="softmax", norm_topk_prob=bool(_get(srcs, ("norm_topk_prob",), False)))
    elif family == "deepseek_v3":
        fields.update(router="sigmoid",
                      norm_topk_prob=bool(_get(srcs, ("norm_topk_prob",), True)),
                      routed_scaling_factor=float(_get(srcs, ("routed_scaling_factor",), 1.0)),
                      n_group=int(_get(srcs, ("num_group", "n_group"), 1)),
                      topk_group=int(_get(srcs, ("topk_group",), 1)),
                      score_correction_bias=isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor))
    else:  # pragma: no cover - SUPPORTED_BLOCKS and this function go together
        raise AssertionError(family)

    shared_attr = next((a for a in _SHARED_ATTRS if isinstance(getattr(block, a, None), nn.Module)), None)
    shared_gate = isinstance(getattr(block, "shared_expert_gate", None), nn.Module)
    if shared_attr is not None:
        shared = getattr(block, shared_attr)
        ws = [_linear_weight(getattr(shared, n, None) or nn.Identity(), f"{where}.{shared_attr}.{n}")
              for n in ("gate_proj", "up_proj", "down_proj")]
        S = ws[0].shape[0]
        if tuple(ws[1].shape) != (S, D) or tuple(ws[2].shape) != (D, S) or tuple(ws[0].shape) != (S, D):
            raise ValueError(f"{where}.{shared_attr} has inconsistent shapes {[tuple(w.shape) for w in ws]}")
        shared_act = _activation(getattr(shared, "act_fn", None), f"{where}.{shared_attr}")
        if shared_act != activation:
            raise NotImplementedError(f"{where}: shared expert activation {shared_act} differs from the experts' "
                                      f"{activation}; MoEConfig has one activation for both")
        n_shared = int(_get((hf_cfg,), ("n_shared_experts",), 1))
        if n_shared < 1 or S % n_shared or S // n_shared != Fh:
            n_shared = 1
        fields.update(num_shared_experts=n_shared, shared_expert_hidden_size=S)
        if shared_gate:
            gw = _linear_weight(block.shared_expert_gate, f"{where}.shared_expert_gate")
            if tuple(gw.shape) != (1, D):
                raise ValueError(f"{where}.shared_expert_gate.weight has shape {tuple(gw.shape)}, expected (1, {D})")
            fields["shared_expert_gate"] = True
    elif shared_gate:
        raise ValueError(f"{where} has a shared_expert_gate but no shared expert")
    elif family == "qwen2_moe":
        raise ValueError(f"{where}: Qwen2-MoE block without a shared expert")
    try:
        config = MoEConfig(**fields)
    except ValueError as err:
        raise ValueError(f"{where}: the HF block maps to an invalid MoEConfig: {err}") from err
    spec = HFSpec(family=family, block_class=type(block), experts_layout=layout, shared_attr=shared_attr,
                  shared_gate=shared_gate)
    return config, spec


# ---- HF block <-> MoELayer tensors -------------------------------------------------------------

def _hf_expert_tensors(block: nn.Module, spec: HFSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in [E, 2F, D], w_out [E, D, F]) of an HF block, stacked (a copy) for ModuleList layouts."""
    experts = block.experts
    if spec.experts_layout == "fused":
        return experts.gate_up_proj, experts.down_proj
    g, u, d = _PER_EXPERT_NAMES[spec.experts_layout]
    w_in = torch.stack([torch.cat([getattr(ex, g).weight, getattr(ex, u).weight], 0) for ex in experts])
    w_out = torch.stack([getattr(ex, d).weight for ex in experts])
    return w_in, w_out


def _new_param(t: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(t.detach().clone(), requires_grad=requires_grad)


def _rebind(module: nn.Module, name: str, view: torch.Tensor) -> None:
    """Make ``module.<name>`` a Parameter whose storage is ``view`` (a view into a MoELayer tensor)."""
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(view, requires_grad=old.requires_grad))


def from_hf(block: nn.Module, *, share_weights: bool = False, backend: str = "auto",
            config_overrides: Optional[dict[str, Any]] = None) -> MoELayer:
    """Convert one HF MoE block into a :class:`MoELayer` with identical forward/backward.

    The layer lives on the block's device and dtype (the correction bias stays fp32) and
    has the block's ``training`` mode. ``share_weights=True`` makes it use the block's own
    tensors (see the module docstring for exactly which are shared and how); ``backend`` is
    :attr:`MoEConfig.backend`. ``config_overrides`` changes MoEConfig fields that do not
    define the weights or the HF routing (e.g. ``bias_update_rate``, ``aux_loss_coef``,
    ``z_loss_coef``, ``capacity_factor``, ``router_jitter``); a field read from the block
    that would change its semantics (sizes, router kind, top_k, normalisation, scaling,
    groups, shared expert, activation) raises ValueError. Anything overridden is a departure
    from HF parity by request. The returned layer carries ``layer.hf_spec`` (:class:`HFSpec`)
    for :func:`to_hf` / :func:`export_state_dict` / :func:`unpatch_model`.

    Raises TypeError for a module that is not a supported HF MoE block, NotImplementedError
    for a known family moekit cannot reproduce (GPT-OSS).
    """
    family = _require_family(block)
    config, spec = _read_block(block, family, backend)
    if config_overrides:
        config = _apply_overrides(config, config_overrides, type(block).__name__)
    w_in_src, w_out_src = _hf_expert_tensors(block, spec)
    router_w = block.gate.weight
    with torch.device("meta"):
        layer = MoELayer(config)
    device = w_in_src.device
    layer.to_empty(device=device)
    layer.tokens_per_expert.zero_()
    layer.expert_load.zero_()
    with torch.no_grad():
        if share_weights:
            layer.router.weight = router_w if isinstance(router_w, nn.Parameter) else nn.Parameter(router_w)
            if spec.experts_layout == "fused":
                layer.experts.w_in = block.experts.gate_up_proj
                layer.experts.w_out = block.experts.down_proj
            else:
                rg = w_in_src.requires_grad or any(p.requires_grad for p in block.experts.parameters())
                layer.experts.w_in = nn.Parameter(w_in_src.detach(), requires_grad=rg)
                layer.experts.w_out = nn.Parameter(w_out_src.detach(), requires_grad=rg)
                g, u, d = _PER_EXPERT_NAMES[spec.experts_layout]
                Fh = config.ffn_hidden_size
                for e, ex in enumerate(block.experts):
                    _rebind(getattr(ex, g), "weight", layer.experts.w_in.detach()[e, :Fh])
                    _rebind(getattr(ex, u), "weight", layer.experts.w_in.detach()[e, Fh:])
                    _rebind(getattr(ex, d), "weight", layer.experts.w_out.detach()[e])
        else:
            layer.router.weight = _new_param(router_w, router_w.requires_grad)
            layer.experts.w_in = _new_param(w_in_src, w_in_src.requires_grad)
            layer.experts.w_out = _new_param(w_out_src, w_out_src.requires_grad)
        if config.score_correction_bias:
            bias = block.gate.e_score_correction_bias
            if share_weights and bias.dtype == torch.float32:
                layer.router.e_score_correction_bias = bias
            else:
                layer.router.e_score_correction_bias = bias.detach().to(torch.float32).clone()
        if spec.shared_attr is not None:
            shared = getattr(block, spec.shared_attr)
            gw, uw, dw = shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight
            w_in = nn.Parameter(torch.cat([gw.detach(), uw.detach()], 0), requires_grad=gw.requires_grad)
            layer.shared_expert.w_in = w_in
            if share_weights:
                S = gw.shape[0]
                _rebind(shared.gate_proj, "weight", w_in.detach()[:S])
                _rebind(shared.up_proj, "weight", w_in.detach()[S:])
                layer.shared_expert.w_out = dw
            else:
                layer.shared_expert.w_out = _new_param(dw, dw.requires_grad)
            if spec.shared_gate:
                sg = block.shared_expert_gate.weight
                layer.shared_expert_gate.weight = sg if share_weights else _new_param(sg, sg.requires_grad)
    layer.hf_spec = spec
    layer.add_routing_observer(_record_hf_router_logits)  # a no-op outside HF's capture_outputs
    layer.train(block.training)
    return layer


# fields that define the weights' shapes or the HF routing formula: never overridden
_STRUCTURAL = ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "router",
               "topk_before_softmax", "norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group",
               "score_correction_bias", "router_bias", "num_shared_experts", "shared_expert_hidden_size",
               "shared_expert_gate")


def _apply_overrides(config: MoEConfig, overrides: dict[str, Any], where: str) -> MoEConfig:
    if not isinstance(overrides, dict):
        raise TypeError(f"config_overrides must be a dict, got {type(overrides).__name__}")
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    for k in overrides:
        if k not in known:
            raise ValueError(f"config_overrides: {k!r} is not a MoEConfig field")
        if k in _STRUCTURAL:
            raise ValueError(f"config_overrides: {k!r} is read from {where} and defines its weights or "
                             f"routing; it cannot be overridden")
    return config.replace(**overrides)


def _layer_of(module: nn.Module) -> MoELayer:
    if isinstance(module, HFMoEAdapter):
        return module.moe
    if isinstance(module, MoELayer):
        return module
    raise TypeError(f"expected a MoELayer (or HFMoEAdapter), got {type(module).__name__}")


def hf_tensors(layer: MoELayer, spec: Optional[HFSpec] = None) -> dict[str, torch.Tensor]:
    """The HF block state (relative key -> tensor, detached; views where the layout allows)
    that ``layer`` corresponds to, in the layout recorded in ``spec`` (default ``layer.hf_spec``)."""
    layer = _layer_of(layer)
    spec = spec or getattr(layer, "hf_spec", None)
    if spec is None:
        raise ValueError("this MoELayer was not made by moekit.hf (no hf_spec); pass spec=")
    cfg = layer.config
    Fh = cfg.ffn_hidden_size
    out: dict[str, torch.Tensor] = {"gate.weight": layer.router.weight.detach()}
    if layer.router.e_score_correction_bias is not None:
        out["gate.e_score_correction_bias"] = layer.router.e_score_correction_bias.detach()
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    if spec.experts_layout == "fused":
        out["experts.gate_up_proj"] = w_in
        out["experts.down_proj"] = w_out
    else:
        g, u, d = _PER_EXPERT_NAMES[spec.experts_layout]
        for e in range(cfg.num_experts):
            out[f"experts.{e}.{g}.weight"] = w_in[e, :Fh]
            out[f"experts.{e}.{u}.weight"] = w_in[e, Fh:]
            out[f"experts.{e}.{d}.weight"] = w_out[e]
    if spec.shared_attr is not None:
        S = cfg.shared_hidden
        sw_in = layer.shared_expert.w_in.detach()
        out[f"{spec.shared_attr}.gate_proj.weight"] = sw_in[:S]
        out[f"{spec.shared_attr}.up_proj.weight"] = sw_in[S:]
        out[f"{spec.shared_attr}.down_proj.weight"] = layer.shared_expert.w_out.detach()
        if spec.shared_gate:
            out["shared_expert_gate.weight"] = layer.shared_expert_gate.weight.detach()
    return out


@torch.no_grad()
def to_hf(layer: nn.Module, block: nn.Module) -> nn.Module:
    """Copy a MoELayer's weights (and correction bias) into an HF block of the matching
    family and shapes, in place; returns the block. The block's layout (fused or
    per-expert) is read from the block itself, so a layer may be written into either."""
    layer = _layer_of(layer)
    family = _require_family(block)
    cfg_hf, spec = _read_block(block, family, layer.config.backend)
    mine = layer.config
    for f in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "activation", "router", "norm_topk_prob",
              "routed_scaling_factor", "n_group", "topk_group", "score_correction_bias", "shared_hidden",
              "shared_expert_gate"):
        a, b = getattr(mine, f), getattr(cfg_hf, f)
        if a != b:
            raise ValueError(f"to_hf: layer has {f}={a!r} but {type(block).__name__} has {f}={b!r}")
    state = block.state_dict(keep_vars=True)
    for key, src in hf_tensors(layer, spec).items():
        dst = state.get(key)
        if dst is None:
            raise ValueError(f"to_hf: {type(block).__name__} has no tensor {key!r}")
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"to_hf: {key} has shape {tuple(dst.shape)} in the block, {tuple(src.shape)} in the layer")
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    return block


# ---- whole models ----------------------------------------------------------------------------------

def _returns_tuple(block: nn.Module, dtype: torch.dtype, device: torch.device) -> bool:
    """Probe the HF block on one zero token: does it return a tuple (transformers 4.x)?"""
    if device.type == "meta":
        return False
    was_training = block.training
    try:
        block.eval()
        with torch.no_grad():
            out = block(torch.zeros(1, 1, block.gate.weight.shape[1], dtype=dtype, device=device))
    except Exception:  # a block we cannot probe cheaply: assume the 5.x convention
        return False
    finally:
        block.train(was_training)
    if isinstance(out, tuple):
        if len(out) != 2:
            raise NotImplementedError(f"{type(block).__name__} returns a {len(out)}-tuple; moekit.hf handles a "
                                      f"plain tensor or (hidden, router_logits)")
        return True
    return False


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(qualified name, block, family) of every HF MoE block, outermost first, not nested."""
    found: list[tuple[str, nn.Module, str]] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(t + ".") for t in taken) or isinstance(module, (MoELayer, HFMoEAdapter)):
            continue
        family = hf_family(module)  # raises NotImplementedError for GPT-OSS
        if family is None:
            if _looks_like_moe_block(module):
                raise TypeError(f"{name or 'model'} is a {type(module).__name__}, an MoE block of a family moekit.hf "
                                f"does not support; supported classes: {sorted(SUPPORTED_BLOCKS)}")
            continue
        if not name:
            raise TypeError("patch_model expects a model containing MoE blocks; use from_hf for a single block")
        found.append((name, module, family))
        taken.append(name)
    return found


def patch_model(model: nn.Module, *, share_weights: bool = False, backend: str = "auto",
                config_overrides: Optional[dict[str, Any]] = None) -> nn.Module:
    """Replace every supported HF MoE block inside ``model`` by a MoELayer, in place; returns
    ``model``. Dense MLPs (Qwen2-MoE ``mlp_only_layers`` / ``decoder_sparse_step``,
    DeepSeek-V3's first ``first_k_dense_replace`` layers) are left alone. Router logits keep
    feeding HF's ``output_router_logits`` machinery (see the module docstring), so HF's own
    aux loss (``router_aux_loss_coef``) keeps working; MoELayer's own losses stay off unless
    asked for through ``config_overrides`` (see :func:`from_hf`; applied to every block).

    Raises TypeError when the model holds an MoE block of an unsupported family, and
    ValueError when it holds no MoE block at all (a model already patched is returned as is).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = _find_blocks(model)
    if not blocks:
        if any(isinstance(m, MoELayer) for m in model.modules()):
            return model
        raise ValueError(f"{type(model).__name__} contains no Hugging Face MoE block "
                         f"(looked for {sorted(SUPPORTED_BLOCKS)})")
    for name, block, _ in blocks:
        layer = from_hf(block, share_weights=share_weights, backend=backend, config_overrides=config_overrides)
        tuple_out = _returns_tuple(block, layer.experts.w_in.dtype, layer.experts.w_in.device)
        layer.hf_spec = dataclasses.replace(layer.hf_spec, returns_tuple=tuple_out)
        replacement: nn.Module = HFMoEAdapter(layer) if tuple_out else layer
        replacement.train(block.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, replacement)
    return model


def _patched(model: nn.Module) -> list[tuple[str, MoELayer]]:
    """(name of the module that replaced an HF block, its MoELayer) for every patched block."""
    out: list[tuple[str, MoELayer]] = []
    adapters: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, HFMoEAdapter):
            adapters.add(name)
            out.append((name, m.moe))
        elif isinstance(m, MoELayer) and getattr(m, "hf_spec", None) is not None \
                and name.rpartition(".")[0] not in adapters:
            out.append((name, m))
    return out


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The HF-format state dict of a patched model: ``model.state_dict()`` with each MoELayer's
    entries replaced by the keys and layout of the HF block it replaced (tensors detached;
    fused tensors are the layer's own storage, split ones are views into it). Loads with
    ``load_state_dict(strict=True)`` into the un-patched model class, and through
    :func:`save_pretrained` / ``from_pretrained``."""
    sd = model.state_dict()
    for name, layer in _patched(model):
        mod_prefix = name + "."
        sd = {k: v for k, v in sd.items() if not k.startswith(mod_prefix)}
        for key, t in hf_tensors(layer).items():
            sd[mod_prefix + key] = t
    return sd


def save_pretrained(model: nn.Module, save_directory, **kwargs: Any) -> None:
    """``model.save_pretrained(save_directory, state_dict=export_state_dict(model), **kwargs)``:
    a patched model saved as a checkpoint of its HF class (Hub key layout included)."""
    if "state_dict" in kwargs:
        raise TypeError("save_pretrained builds the state dict itself; do not pass state_dict=")
    model.save_pretrained(save_directory, state_dict=export_state_dict(model), **kwargs)


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put HF blocks back in place of the MoELayers made by :func:`patch_model`, holding the
    layers' current weights (copies); returns ``model``. Needs ``model.config`` (HF blocks
    are built from it)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None:
        raise ValueError("unpatch_model needs model.config to rebuild the HF blocks")
    for name, layer in _patched(model):
        spec: HFSpec = layer.hf_spec
        device = layer.experts.w_in.device
        dtype = layer.experts.w_in.dtype
        with torch.device("meta"):
            block = spec.block_class(hf_config)
        block.to_empty(device=device)
        for p_name, p in list(block.named_parameters()):
            if p.is_floating_point() and p.dtype != dtype:
                mod_name, _, attr = p_name.rpartition(".")
                setattr(block.get_submodule(mod_name), attr, nn.Parameter(p.detach().to(dtype)))
        to_hf(layer, block)
        block.train(layer.training)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, block)
    return model
