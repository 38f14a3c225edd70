"""For test_parallel_generate: the latents of one video with its steps shared as `--parallel MODE`
says, for each MODE@GUIDANCE in turn. Under torchrun (`python shared_steps.py MODEL RUNS FRAMES OUT`,
RUNS comma-separated) rank 0 saves each to OUT with RUN replaced; a test's own process, in a gloo
group of one, calls `latents` directly."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

PROMPT = "a red ball moving right in the blue sky"


def latents(model, runs: list[str], frames: int) -> dict[str, tuple[torch.Tensor, str]]:
    """{run: (latent, the way the tokens were split)}; every process of the group calls it, in step."""
    from soragen.models.sequence_parallel import make_split
    from soragen.pipeline import Pipeline
    pipe = Pipeline.load(model, device="cpu", dtype="float32")
    found = {}
    for run in runs:
        mode, guidance = run.split("@")
        settings = pipe.sampling(steps=3, guidance=float(guidance), negative_prompt="green box")
        split = make_split(mode, pipe.model.dit.config.num_heads, float(guidance) != 1)
        pipe.parallelise(split)
        found[run] = pipe.sample_latent(PROMPT, frames, 32, 48, settings, seed=7), split.how
    return found


if __name__ == "__main__":
    from safetensors.torch import save_file
    model, runs, frames, out = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    for run, (latent, how) in latents(model, runs, frames).items():
        if dist.get_rank() == 0:
            save_file({"latent": latent.contiguous(), "how": torch.tensor([ord(c) for c in how])},
                      out.replace("RUN", run))
    dist.barrier()  # every process done with the group before any leaves it
    dist.destroy_process_group()
