"""A deeper copy of a model's DiT that computes exactly the same function: new adaLN-Zero blocks
(zero modulation and cross-attention output, so each is the identity) go in after every
--every old blocks. Fine-tune the result with `soragen train --init OUT`.

    python experiments/deeper/grow.py src/soragen/weights/default runs/deep10 --new 2

The shipped size limit (40 MB) leaves room for two more blocks in bfloat16.
"""
import argparse
import dataclasses

import torch

from soragen.dit import VideoDiT
from soragen.model_io import load_model, save_model

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--new", type=int, default=2, help="blocks to add")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = load_model(args.model)
old = model.dit
depth = old.config.depth
every = depth // args.new
torch.manual_seed(args.seed)
grown = VideoDiT(dataclasses.replace(old.config, depth=depth + args.new))  # new blocks: adaLN-Zero init
old_state = old.state_dict()
grown.load_state_dict({k: v for k, v in old_state.items() if not k.startswith("blocks.")}, strict=False)
position = 0
for i, block in enumerate(old.blocks):
    grown.blocks[position].load_state_dict(block.state_dict())
    position += 1
    if (i + 1) % every == 0 and position - (i + 1) < args.new:
        position += 1  # leave the freshly initialised identity block here
assert position == depth + args.new, position

x = torch.randn(2, old.config.in_channels, 5, 16, 16)
t, text = torch.tensor([100.0, 800.0]), torch.randn(2, 7, old.config.text_dim)
mask, pooled = torch.ones(2, 7, dtype=torch.bool), torch.randn(2, old.config.text_dim)
with torch.no_grad():
    diff = (grown.eval()(x, t, text, mask, pooled) - old(x, t, text, mask, pooled)).abs().max().item()
print(f"{depth} -> {depth + args.new} blocks; largest output difference on a random input: {diff:.2e}")
save_model(args.out, grown, model.vae, model.text_spec, model.video, model.scheduler_config, model.sampling)
print(f"wrote {args.out}")
