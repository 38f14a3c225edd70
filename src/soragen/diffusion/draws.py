"""Where training's randomness comes from: each clip's draws (its window, whether its caption is
dropped, its noise, its noise level or timestep, a VAE's posterior sample) from generators of its
own, seeded by (the run's seed, the step, the clip's index in the step's global batch, what is
drawn), and a step's shared draws from (seed, step, what is drawn). A clip gets the same draws
however the global batch is split over processes and micro-batches, so the split does not change
the run.

    draws = ClipDraws(seed=0, step=12, indices=[4, 5])   # clips 4 and 5 of step 12's global batch
    noise = draws.randn((2, 16, 3, 8, 8), "noise")        # each clip's own (16, 3, 8, 8)

The losses take a ClipDraws or a plain torch.Generator (`as_draws`): from a generator, the whole
batch is drawn in one go, as before per-clip draws existed.
"""

from __future__ import annotations

import hashlib

import torch


def seeded(*parts) -> torch.Generator:
    """A CPU generator seeded from `parts` (any values with a stable str), mixed by sha256."""
    key = ":".join(str(p) for p in parts).encode()
    return torch.Generator("cpu").manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


class ClipDraws:
    """The draws of one micro-batch's clips: `indices`, their places in step `step`'s global batch."""

    def __init__(self, seed: int, step: int, indices: list[int]):
        self.seed, self.step, self.indices = seed, step, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def generator(self, n: int, what: str) -> torch.Generator:
        """The generator of the micro-batch's `n`th clip for `what`."""
        return seeded("clip", self.seed, self.step, self.indices[n], what)

    def shared(self, what: str) -> torch.Generator:
        """The generator of a draw the whole step shares (every micro-batch of it gets the same)."""
        return seeded("step", self.seed, self.step, what)

    def randn(self, shape, what: str) -> torch.Tensor:
        """(len, *shape[1:]) standard normal: row n drawn from clip n's generator."""
        return torch.stack([torch.randn(tuple(shape[1:]), generator=self.generator(n, what)) for n in range(len(self))])

    def rand(self, what: str) -> torch.Tensor:
        """One uniform draw in [0, 1) per clip."""
        return torch.stack([torch.rand((), generator=self.generator(n, what)) for n in range(len(self))])

    def randint(self, high: int, what: str) -> torch.Tensor:
        """One integer in [0, high) per clip."""
        return torch.stack([torch.randint(0, high, (), generator=self.generator(n, what)) for n in range(len(self))])


class BatchDraws:
    """ClipDraws' interface over one plain generator: everything from it, a batch at a time."""

    def __init__(self, generator: torch.Generator, count: int | None = None):
        self.source, self.count = generator, count

    def generator(self, n: int, what: str) -> torch.Generator:
        return self.source

    def shared(self, what: str) -> torch.Generator:
        return self.source

    def randn(self, shape, what: str) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.source)

    def rand(self, what: str, count: int | None = None) -> torch.Tensor:
        return torch.rand(count or self.count, generator=self.source)

    def randint(self, high: int, what: str, count: int | None = None) -> torch.Tensor:
        return torch.randint(0, high, (count or self.count,), generator=self.source)


def as_draws(source, count: int) -> "ClipDraws | BatchDraws":
    """`source` as draws for a batch of `count` clips: a ClipDraws as it is, a generator wrapped."""
    if isinstance(source, torch.Generator):
        return BatchDraws(source, count)
    if len(source) != count:
        raise ValueError(f"draws for {len(source)} clips, a batch of {count}")
    return source
