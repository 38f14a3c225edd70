"""Does the DiT read a clip out of the 'pure noise' it starts from? With DiT's linear betas, the
last training step still keeps sqrt(alpha_bar) = 0.0064 of the clean latent, and sampling starts
from noise that keeps none (the signal leak of Lin et al., 2024).

For rendered shapes-world clips, noised to t with the model's own schedule, this prints how well
the DiT's unconditional clean-latent prediction correlates with the clip's latent (each centred
on the mean over clips: 0 means nothing of the clip was read), and how often the decoded
prediction's colour is the clip's.

    python experiments/zero_snr/leak.py MODEL [--clips 24]

A prototype (weights/README.md, phase 17).
"""
import argparse
import random

import torch

from soragen.model_io import load_model
from soragen.sampling import training_scheduler
from soragen.shapes import all_specs, judge_video, render_clip
from soragen.text import TextEncoder
from soragen.vae import uint8_to_frames


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--clips", type=int, default=24)
    args = parser.parse_args()

    model = load_model(args.model)
    dit = model.dit.float().eval()
    scheduler = training_scheduler(model.scheduler_config)
    specs = random.Random(5).sample(all_specs(), args.clips)
    x0 = torch.cat([model.vae.encode(uint8_to_frames(render_clip(s, random.Random(i)))) for i, s in enumerate(specs)])
    empty = TextEncoder(model.text_spec).encode([""] * len(specs))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    for t in (999, 950, 900):
        steps = torch.full((len(specs),), t)
        keep = scheduler.alphas_cumprod[t].sqrt()
        x_t = scheduler.add_noise(x0, noise, steps)
        v = dit(x_t, steps, empty.tokens, empty.mask, empty.pooled).float()
        x0_pred = keep * x_t - (1 - keep ** 2).sqrt() * v  # from the velocity
        a, b = (x0_pred - x0_pred.mean(0)).flatten(1), (x0 - x0.mean(0)).flatten(1)
        corr = ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()
        videos = model.vae.decode_uint8(x0_pred, 16)
        colours = sum(judge_video(video).color == spec.color for video, spec in zip(videos, specs))
        print(f"t = {t}: sqrt(alpha_bar) {keep:.4f}, correlation {corr:+.3f}, "
              f"colour of the clip read back {colours} / {len(specs)} (1 in 5 by chance)", flush=True)


if __name__ == "__main__":
    main()
