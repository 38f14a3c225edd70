"""`soragen train` with the timesteps drawn from a mixture: with probability --p-mid from
[--t-lo, --t-hi), else uniformly from all 1000. Every other argument goes to `soragen train`.

Why: the default DiT hardly uses the shape word where a video's layout is decided (its loss with
a wrong shape word is only ~0.008 above the right one at t = 600-950, against 0.07-0.11 for a wrong
colour word: scripts in weights/README.md, phase 15). Those timesteps get 35% of a uniform draw.

    python experiments/mid_noise/midt_train.py --p-mid 0.6 --t-lo 550 --t-hi 900 -- \
        --data data/shapes-both --init src/soragen/weights/default --out runs/midt ...

A prototype, not part of the package: it swaps DiTTask's timestep draw and runs the real command.
"""
import argparse
import sys

import torch

import soragen.train as train

parser = argparse.ArgumentParser()
parser.add_argument("--p-mid", type=float, default=0.6)
parser.add_argument("--t-lo", type=int, default=550)
parser.add_argument("--t-hi", type=int, default=900)
args, rest = parser.parse_known_args()
rest = [a for a in rest if a != "--"]
_plain_randint = torch.randint


class MidTimesteps:
    """Stands in for torch inside DiTTask.loss for its one timestep draw; the rest is torch's."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def randint(low, high, size, generator=None, **kw):
        t = _plain_randint(low, high, size, generator=generator, **kw)
        if high != 1000:
            return t
        mid = _plain_randint(args.t_lo, args.t_hi, size, generator=generator)
        pick = torch.rand(size, generator=generator) < args.p_mid
        return torch.where(pick, mid, t)


_loss = train.DiTTask.loss


def loss(self, module, items, generator):
    train.torch = MidTimesteps()
    try:
        return _loss(self, module, items, generator)
    finally:
        train.torch = torch


train.DiTTask.loss = loss
sys.argv = ["soragen", "train", *rest]
from soragen.cli import main  # noqa: E402

main()
