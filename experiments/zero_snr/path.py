"""What a model predicts along one sampling path: the guided clean-latent prediction at every step,
decoded, as rows of frames 0, 5, 10 and 15, and the finished video as the last row.

    python experiments/zero_snr/path.py MODEL "PROMPT" OUT.png [--seed 0] [--guidance G]

The model's own sampler, steps and guidance unless --guidance is given. The first row of the
default model (weights/README.md, phase 17) is what showed the signal leak.
"""
import argparse

import numpy as np
import torch
from PIL import Image

from soragen.pipeline import Pipeline
from soragen.sampling import denoise, make_scheduler


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("prompt")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance", type=float, default=None)
    args = parser.parse_args()

    pipe = Pipeline.load(args.model, dtype="float32")
    settings = pipe.sampler_settings(guidance=args.guidance)
    scheduler = make_scheduler(settings["sampler"], pipe.model.scheduler_config)
    alphas, g = scheduler.alphas_cumprod, settings["guidance"]
    predictions = []

    def model(x, t, text):  # records the guided clean-latent prediction (v-prediction models)
        out = pipe.predict_noise(x, t, text).float()
        v = out[1:] + g * (out[:1] - out[1:]) if g != 1.0 else out  # cond first, as denoise batches them
        a = alphas[int(t[0])]
        predictions.append(a.sqrt() * x[:1] - (1 - a).sqrt() * v)
        return out

    video = pipe.model.video
    noise = torch.randn((1, *pipe.model.vae.latent_shape(video.frames, video.height, video.width)),
                        generator=torch.Generator().manual_seed(args.seed))
    cond, uncond = pipe.text_encoder.encode([args.prompt]), pipe.text_encoder.encode([""])
    latent = denoise(model, noise, cond, uncond, scheduler, settings["steps"], g)
    rows = [pipe.model.vae.decode_uint8(x, video.frames)[0] for x in predictions + [latent]]
    image = np.concatenate([np.concatenate([v[i] for i in (0, 5, 10, 15)], 1) for v in rows], 0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: {len(predictions)} steps of {settings}")


if __name__ == "__main__":
    main()
