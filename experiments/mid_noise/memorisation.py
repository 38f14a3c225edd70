"""Does the DiT know its training clips better than new ones? Velocity MSE of the first N clips of
two shapes-world folders (the training data, and one made with another --seed), at fixed timesteps
with the same noise for both.

    soragen make-dataset shapes data/shapes-fresh --n 240 --seed 77
    python experiments/mid_noise/memorisation.py MODEL data/shapes data/shapes-fresh [--clips 120]

A probe of weights/README.md, phase 15.
"""
import argparse

import torch

from _probe import first_clips, load, velocity_error

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("folders", nargs="+")
parser.add_argument("--clips", type=int, default=120)
parser.add_argument("--timesteps", default="100,300,500,700,900")
args = parser.parse_args()

model, encoder, scheduler, dit = load(args.model)
timesteps = list(map(int, args.timesteps.split(",")))
print("| clips | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
print("| --- |" + " --- |" * len(timesteps))
for folder in args.folders:
    clips, samples = first_clips(folder, args.clips, model, encoder)
    row = []
    for t in timesteps:
        noise_generator = torch.Generator().manual_seed(t)
        total, count = 0.0, 0
        for i in range(0, len(clips), 8):
            latents, text = samples.batch(list(range(i, min(len(clips), i + 8))), torch.Generator().manual_seed(0), 0.0)
            noise = torch.randn(latents.shape, generator=noise_generator)
            total += velocity_error(dit, scheduler, latents, noise, t, text.tokens, text.mask, text.pooled)
            count += latents.numel()
        row.append(total / count)
    print(f"| {folder} | " + " | ".join(f"{x:.4f}" for x in row) + " |", flush=True)
