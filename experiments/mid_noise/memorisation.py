"""Does the DiT know its training clips better than new ones? Velocity MSE of the first N clips of
two shapes-world folders (the training data, and one made with another --seed), at fixed timesteps
with the same noise for both.

    soragen make-dataset shapes data/shapes-fresh --n 240 --seed 77
    python experiments/mid_noise/memorisation.py MODEL data/shapes data/shapes-fresh [--clips 120]

A probe of weights/README.md, phase 15.
"""
import argparse

import torch
import torch.nn.functional as F

from soragen.cli import _default_cache
from soragen.config import TrainConfig
from soragen.model_io import load_model
from soragen.sampling import training_scheduler
from soragen.text import TextEncoder
from soragen.train import build_samples, scan

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("folders", nargs="+")
parser.add_argument("--clips", type=int, default=120)
parser.add_argument("--timesteps", default="100,300,500,700,900")
args = parser.parse_args()

model = load_model(args.model)
encoder = TextEncoder(model.text_spec)
scheduler = training_scheduler(model.scheduler_config)
dit = model.dit.float().eval()
timesteps = list(map(int, args.timesteps.split(",")))
print("| clips | " + " | ".join(f"t = {t}" for t in timesteps) + " |")
print("| --- |" + " --- |" * len(timesteps))
for folder in args.folders:
    cfg = TrainConfig(data=folder, frames=16, height=64, width=64, fps=8.0)
    clips = sorted(scan(cfg, None).clips, key=lambda c: c.path.name)[:args.clips]
    samples = build_samples(clips, model.vae, encoder, cfg, _default_cache(), 4, None)
    row = []
    for t in timesteps:
        noise_generator = torch.Generator().manual_seed(t)
        total, count = 0.0, 0
        for i in range(0, len(clips), 8):
            latents, text = samples.batch(list(range(i, min(len(clips), i + 8))), torch.Generator().manual_seed(0), 0.0)
            noise = torch.randn(latents.shape, generator=noise_generator)
            ts = torch.full((latents.shape[0],), t)
            with torch.no_grad():
                pred = dit(scheduler.add_noise(latents, noise, ts), ts, text.tokens, text.mask, text.pooled).float()
            total += F.mse_loss(pred, scheduler.get_velocity(latents, noise, ts), reduction="sum").item()
            count += latents.numel()
        row.append(total / count)
    print(f"| {folder} | " + " | ".join(f"{x:.4f}" for x in row) + " |", flush=True)
