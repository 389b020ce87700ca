"""Train a tiny byte-level MoE language model on the Python standard library's source.

The readable version of `moekit demo`: every MoE block is a `moekit.MoELayer`, the
load-balancing loss rides in the autograd graph, and a routing trace of the trained model
is written for `moekit plan`.

    python examples/train_byte_lm.py            # ~1 minute on 2 CPU cores
    python examples/train_byte_lm.py --steps 5  # smoke test
"""
import argparse

import torch
import torch.nn.functional as F

import moekit
from moekit.demo import ByteBatches, ByteMoELM, stdlib_corpus

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=200, help="training steps")
parser.add_argument("--trace", default="byte_lm.trace.npz", help="where to write the routing trace")
args = parser.parse_args()

torch.manual_seed(0)
config = moekit.MoEConfig(hidden_size=128, ffn_hidden_size=256, num_experts=8, top_k=2, aux_loss_coef=0.01)
model = ByteMoELM(config, n_layers=4, n_heads=4, max_seq_len=128)
data = ByteBatches(stdlib_corpus(4 << 20), batch_size=16, seq_len=128)
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

for step in range(args.steps):
    inputs, targets = data.sample()
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())  # aux loss is in the graph
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 20 == 0 or step == args.steps - 1:
        counts = model.blocks[0].moe.tokens_per_expert.tolist()  # per-expert tokens, last forward
        print(f"step {step:4d}  loss {loss.item():.3f}  layer-0 expert load {counts}")

model.eval()
with torch.no_grad(), moekit.trace.record(model) as recorder:
    model(data.sample("val")[0])
print("routing trace written to", recorder.save(args.trace))
