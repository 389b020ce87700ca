"""Train the demo's byte-level MoE LM with expert parallelism (gloo on CPU, NCCL on GPUs).

Every rank builds the same model, `moekit.parallel.expert_parallel` keeps each rank's experts
only, DDP averages the dense parameters' gradients, and `reduce_expert_grads(world_average=True)`
gives the expert gradients the same averaging. Each rank trains on its own batches.

    torchrun --nproc_per_node 4 examples/train_expert_parallel.py
    torchrun --nproc_per_node 2 examples/train_expert_parallel.py --placement placement.json
    python examples/train_expert_parallel.py --ranks 2 --steps 3   # launches torchrun itself
"""
import argparse
import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import moekit
from moekit.demo import ByteBatches, ByteMoELM, stdlib_corpus
from moekit.parallel import expert_param_names, expert_parallel, full_state_dict, reduce_expert_grads

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=100, help="training steps")
parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (W must divide it "
                                                            "unless --placement gives replicas)")
parser.add_argument("--placement", default=None, help="placement JSON written by `moekit plan` (num_gpus = W)")
parser.add_argument("--save", default=None, help="rank 0 writes the full (unconverted) state dict here")
parser.add_argument("--ranks", type=int, default=2, help="ranks to launch when not started by torchrun")
args = parser.parse_args()

if "RANK" not in os.environ:  # plain `python ...`: start the ranks with torchrun
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}",
           __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd))

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
else:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

torch.manual_seed(0)  # the same full model on every rank
config = moekit.MoEConfig(hidden_size=128, ffn_hidden_size=256, num_experts=args.experts, top_k=2,
                          aux_loss_coef=0.01)
model = ByteMoELM(config, n_layers=4, n_heads=4, max_seq_len=128).to(device)
expert_parallel(model, placement=args.placement)
DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))
ddp = DDP(model, device_ids=[device.index] if cuda else None)
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
data = ByteBatches(stdlib_corpus(4 << 20), batch_size=16, seq_len=128, seed=rank)  # each rank its own batches

for step in range(args.steps):
    inputs, targets = (t.to(device) for t in data.sample())
    loss = F.cross_entropy(ddp(inputs).flatten(0, 1), targets.flatten())
    opt.zero_grad()
    loss.backward()
    reduce_expert_grads(model, world_average=True)  # replicas summed; / W like DDP's dense average
    opt.step()
    if step % 20 == 0 or step == args.steps - 1:
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        layer0 = model.blocks[0].moe
        if rank == 0:
            print(f"step {step:4d}  loss {mean.item() / world:.3f}  W={world}  rank-0 experts "
                  f"{layer0.experts.logical_ids}, layer-0 tokens per expert {layer0.tokens_per_expert.tolist()}")

sent = sum(m.dispatcher.bytes_sent for _, m in moekit.moe_layers(model))
full = full_state_dict(model)  # a collective: every rank
if rank == 0:
    print(f"rank 0 sent {sent / 2 ** 20:.1f} MiB of token rows to other ranks over {args.steps} steps")
    if args.save:
        torch.save(full, args.save)
        print("full state dict written to", args.save)
dist.destroy_process_group()
