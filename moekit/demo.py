"""The demo job: a small byte-level MoE language model trained on the Python standard
library's own source (a real corpus every machine has offline).

Legend: B batch, S sequence length, D model dim, V vocabulary (256 bytes).
"""
from __future__ import annotations

import logging
import math
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig
from moekit.layer import MoELayer, moe_layers

log = logging.getLogger(__name__)


# ---- corpus ------------------------------------------------------------------------------------

def stdlib_corpus(max_bytes: int = 8 << 20) -> bytes:
    """Concatenated ``.py`` files of this Python's standard library (sorted paths, so the
    corpus is the same on every run of the same Python), at most ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library path {root}")
    chunks, size = [], 0
    for p in files:
        try:
            data = p.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


VAL_FRACTION = 0.05  # share of the corpus ByteBatches holds out for validation


def split_sizes(n_bytes: int, seq_len: int, val_fraction: float = VAL_FRACTION) -> tuple[int, int]:
    """(train, validation) bytes that :class:`ByteBatches` makes of an ``n_bytes`` corpus."""
    n_val = max(int(n_bytes * val_fraction), seq_len + 2)
    return n_bytes - n_val, n_val


def min_corpus_bytes(seq_len: int, val_fraction: float = VAL_FRACTION) -> int:
    """Smallest corpus whose train and validation splits each hold a window of
    ``seq_len + 1`` bytes at more than one start."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = 2 * seq_len + 4
    while split_sizes(n, seq_len, val_fraction)[0] < seq_len + 2:
        n += 1
    return n


class ByteBatches:
    """Random windows of a byte corpus: ``(inputs [B, S], targets [B, S])`` int64."""

    def __init__(self, corpus: bytes, batch_size: int, seq_len: int, val_fraction: float = VAL_FRACTION,
                 seed: int = 0):
        if len(corpus) < min_corpus_bytes(seq_len, val_fraction):
            raise ValueError(f"a corpus of {len(corpus)} bytes is too small for seq_len={seq_len}: it needs "
                             f"at least {min_corpus_bytes(seq_len, val_fraction)} bytes")
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).long()
        n_val = split_sizes(len(data), seq_len, val_fraction)[1]
        self.train, self.val = data[:-n_val], data[-n_val:]
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def sample(self, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(0, len(data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        window = torch.stack([data[s:s + self.seq_len + 1] for s in starts.tolist()])
        return window[:, :-1], window[:, 1:]


# ---- model -------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm decoder block: causal self-attention + MoELayer."""

    def __init__(self, d_model: int, n_heads: int, moe: MoEConfig):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.moe = MoELayer(moe)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True)
        x_BSD = x_BSD + self.proj(attn.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.moe(self.norm2(x_BSD))


class ByteMoELM(nn.Module):
    """A small byte-level decoder whose every MLP is a :class:`moekit.MoELayer`."""

    def __init__(self, moe: MoEConfig, n_layers: int = 4, n_heads: int = 4, max_seq_len: int = 512):
        super().__init__()
        D = moe.hidden_size
        if D % n_heads:
            raise ValueError(f"hidden_size={D} must be divisible by n_heads={n_heads}")
        self.embed = nn.Embedding(256, D)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied output head: keep initial logits small
        self.pos = nn.Parameter(torch.randn(max_seq_len, D) * 0.02)
        self.blocks = nn.ModuleList(Block(D, n_heads, moe) for _ in range(n_layers))
        self.norm = nn.LayerNorm(D)
        self.max_seq_len = max_seq_len

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] int64 -> logits [B, S, 256]."""
        S = tokens_BS.shape[1]
        if S > self.max_seq_len:
            raise ValueError(f"sequence length {S} exceeds max_seq_len={self.max_seq_len}")
        x = self.embed(tokens_BS) + self.pos[:S]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()

    @torch.no_grad()
    def generate(self, prompt: bytes, n_bytes: int, temperature: float = 0.8, seed: int = 0) -> bytes:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.tensor([list(prompt)], dtype=torch.long)
        for _ in range(n_bytes):
            logits = self(tokens[:, -self.max_seq_len:])[:, -1] / max(temperature, 1e-6)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
            tokens = torch.cat([tokens, nxt], dim=1)
        return bytes(tokens[0, len(prompt):].tolist())


# ---- training ----------------------------------------------------------------------------------

@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # train loss per step
    val_loss_before: float = float("nan")
    val_loss_after: float = float("nan")
    seconds: float = 0.0
    tokens_per_expert: list[list[int]] = field(default_factory=list)  # [L][E] over the run


@torch.no_grad()
def evaluate(model: ByteMoELM, batches: ByteBatches, n_batches: int = 4) -> float:
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(n_batches):
        x, y = batches.sample("val")
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    model.train(was_training)
    return total / n_batches


def train(model: ByteMoELM, batches: ByteBatches, steps: int, lr: float = 3e-3,
          on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """AdamW with warm-up and cosine decay; the MoE aux loss rides in the graph."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    result = TrainResult(val_loss_before=evaluate(model, batches))
    layers = [m for _, m in moe_layers(model)]
    load = torch.zeros(len(layers), layers[0].config.num_experts, dtype=torch.long)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        x, y = batches.sample("train")
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        for i, layer in enumerate(layers):
            load[i] += layer.tokens_per_expert
        result.losses.append(loss.item())
        if on_step is not None:
            on_step(step, loss.item())
    result.seconds = time.perf_counter() - start
    result.val_loss_after = evaluate(model, batches)
    result.tokens_per_expert = load.tolist()
    return result


def load_table(tokens_per_expert: list[list[int]]) -> str:
    """Text table: share of assignments per expert for each layer, and max/mean."""
    E = len(tokens_per_expert[0])
    head = "layer | " + " ".join(f"e{e:<4d}" for e in range(E)) + " | max/mean"
    lines = [head, "-" * len(head)]
    for l, row in enumerate(tokens_per_expert):
        total = max(sum(row), 1)
        shares = " ".join(f"{100 * c / total:4.1f}%" for c in row)
        imbalance = max(row) / (total / E)
        lines.append(f"{l:5d} | {shares} | {imbalance:6.2f}")
    return "\n".join(lines)
