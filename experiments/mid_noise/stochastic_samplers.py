"""`soragen eval` with a sampler the CLI does not offer: SDE-DPM-Solver++ or DDIM with eta 1.

    python experiments/mid_noise/stochastic_samplers.py sde-dpm++ --steps 20 --guidance 3 --seed 0
    python experiments/mid_noise/stochastic_samplers.py ddim-eta1 --steps 50 --guidance 3 --seed 0

Prints the scores and the shape mistakes as one JSON line (weights/README.md, phase 15).
"""
import argparse
import json

import torch

import soragen.pipeline as pipeline
from soragen.evaluate import evaluate_pipeline
from soragen.model_io import default_model_dir
from soragen.sampling import SCHEDULER_CONFIG
from soragen.shapes import load_prompt_set

parser = argparse.ArgumentParser()
parser.add_argument("sampler", choices=["sde-dpm++", "ddim-eta1"])
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--guidance", type=float, default=3.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--model", default=None)
args = parser.parse_args()


def make_scheduler(name, config=None):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    config = {**SCHEDULER_CONFIG, **(config or {})}
    if args.sampler == "sde-dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++", solver_order=2)
    return DDIMScheduler.from_config(config)


pipeline.make_scheduler = make_scheduler
torch.manual_seed(args.seed)  # the SDE solver draws its noise from torch's global generator
pipe = pipeline.Pipeline.load(args.model or default_model_dir())
settings = {"sampler": "ddim", "steps": args.steps, "guidance": args.guidance,
            "eta": 1.0 if args.sampler == "ddim-eta1" else 0.0}
result = evaluate_pipeline(pipe, load_prompt_set("eval"), settings, seed=args.seed)
print(json.dumps({"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
                  "scores": result["scores"], "shape mistakes": result["mistakes"]["shape"],
                  "seconds": round(result["seconds"])}))
