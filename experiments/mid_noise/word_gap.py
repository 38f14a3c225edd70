"""How much a DiT's loss rests on each word of the caption: the velocity MSE on shapes-world clips
with the right caption, and how much it rises when the shape word (or the colour word) is swapped
for another one, or the caption left out. Same clips, timesteps and noise for every caption.

    python experiments/mid_noise/word_gap.py MODEL DATA [--clips 96]

DATA is a folder from `soragen make-dataset shapes` (best one the model was not trained on); its
latents go through soragen train's cache. A prototype (weights/README.md, phase 15).
"""
import argparse
import re

import torch

from _probe import first_clips, load, velocity_error

# The first synonym found is replaced by a word of another value (training vocabulary).
SHAPE_SWAPS = [(r"\bround dot\b|\bcircle\b|\bball\b|\bdisc\b", "square"),
               (r"\bsquare\b|\bbox\b|\bblock\b", "triangle"),
               (r"\btriangular shape\b|\btriangle\b|\bwedge\b", "circle")]
COLOUR_SWAPS = [(r"\bred\b|\bscarlet\b", "yellow"), (r"\byellow\b", "white"), (r"\bwhite\b", "purple"),
                (r"\bpurple\b", "orange"), (r"\borange\b", "red")]


def swap(caption: str, table) -> str:
    for pattern, word in table:
        if re.search(pattern, caption):
            return re.sub(pattern, word, caption, count=1)
    raise ValueError(f"no word to swap in {caption!r}")


parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("data")
parser.add_argument("--clips", type=int, default=96)
parser.add_argument("--timesteps", default="200,400,600,800,950")
args = parser.parse_args()

model, encoder, scheduler, dit = load(args.model)
clips, samples = first_clips(args.data, args.clips, model, encoder)
captions = [c.caption for c in clips]
texts = {"right": encoder.encode(captions),
         "shape": encoder.encode([swap(c, SHAPE_SWAPS) for c in captions]),
         "colour": encoder.encode([swap(c, COLOUR_SWAPS) for c in captions]),
         "none": encoder.encode([""] * len(captions))}
latents = torch.stack([samples.latents[i][0] for i in range(len(clips))])

print(f"{args.model}: velocity MSE with the right caption, and its rise with a wrong word")
print("| t | right | wrong shape | wrong colour | no caption |\n| --- | --- | --- | --- | --- |")
for t in map(int, args.timesteps.split(",")):
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
    loss = {}
    for name, text in texts.items():
        total = 0.0
        for i in range(0, len(clips), 8):
            part = slice(i, i + 8)
            total += velocity_error(dit, scheduler, latents[part], noise[part], t,
                                    text.tokens[part], text.mask[part], text.pooled[part])
        loss[name] = total / latents.numel()
    r = loss["right"]
    print(f"| {t} | {r:.4f} | {loss['shape'] - r:+.4f} | {loss['colour'] - r:+.4f} | {loss['none'] - r:+.4f} |",
          flush=True)
