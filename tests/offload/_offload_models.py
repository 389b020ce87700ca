"""Small real HF MoE checkpoints for the store / runner / `moekit run` tests.

Each is built from a config with random weights (routers std 0.5 so many experts win), saved
with ``save_pretrained`` (transformers 5.x writes per-expert keys) and read back by the code
under test from disk.
"""
from __future__ import annotations

from pathlib import Path

import torch

V = 101
PROMPT = [5, 17, 42, 3, 9, 77, 31, 64, 12, 50, 2, 88]  # 12 tokens: the prefill touches more than a quota


def make_config(family: str):
    import transformers as T

    common = dict(vocab_size=V, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=False,
                  eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "olmoe":
        return T.OlmoeConfig(**common, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                             num_hidden_layers=3, norm_topk_prob=False)
    if family == "qwen2_moe":  # MoE layers 0, 2 (layer 1 dense); gated shared expert
        return T.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2,
                                num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1],
                                norm_topk_prob=False)
    if family == "mixtral":  # checkpoint keys block_sparse_moe.experts.N.w1/w2/w3
        return T.MixtralConfig(**common, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                               num_hidden_layers=2)
    raise AssertionError(family)


def save_model(family: str, path: Path, seed: int = 0, dtype=torch.float32) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(family)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return Path(path)


def load_reference(path: Path, dtype=torch.float32):
    """The model fully in memory, as transformers loads it."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def hf_generate(model, ids: list[int], max_new_tokens: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(x),
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def generation_setup(root: Path, new_tokens: int, families=("olmoe", "qwen2_moe")) -> dict:
    """family -> (model dir, store dir, transformers' greedy tokens) for models saved under ``root``."""
    out = {}
    for i, fam in enumerate(families):
        d = save_model(fam, root / fam, seed=10 + i)
        out[fam] = (d, root / f"{fam}.store", hf_generate(load_reference(d), PROMPT, new_tokens))
    return out
