"""MagCache's calibration of a model (soragen calibrate-cache): sample the prompts with every pass
run and record, per step, how the magnitude of the DiT blocks' residual changes from the step
before (soragen.diffusion.caches.Calibration), averaged over the prompts; a row for the
conditional pass and, with guidance, one for the unconditional."""

from __future__ import annotations

from soragen.diffusion.caches import Calibration


def calibrate(pipe, prompts: list[str], frames: int, height: int, width: int, settings, seed: int = 0,
              progress=None) -> list[list[float]]:
    """The ratios (a list per row, a ratio per step) of `pipe`'s model at `settings`."""
    runs = []
    for i, prompt in enumerate(prompts):
        measured: dict[int, dict[int, float]] = {}  # row -> step -> ratio, shared by two experts' caches
        pipe.sample_latent(prompt, frames, height, width, settings, seed=seed + i, progress=progress,
                           cache=lambda steps, measured=measured: Calibration(steps, measured))
        runs.append(measured)
    rows = sorted(runs[0])
    return [[round(sum(run[row][step] for run in runs) / len(runs), 5) for step in sorted(runs[0][row])]
            for row in rows]
