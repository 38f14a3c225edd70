"""What the probes of this folder share: a model ready to score, a folder's clips as cached
latents, and the summed velocity error of one batch."""
import torch
import torch.nn.functional as F

from soragen.cli import _default_cache
from soragen.config import TrainConfig
from soragen.model_io import load_model
from soragen.sampling import training_scheduler
from soragen.text import TextEncoder
from soragen.train import build_samples, scan


def load(model_dir):
    """(model, text encoder, training scheduler, float32 DiT in eval mode)."""
    model = load_model(model_dir)
    return model, TextEncoder(model.text_spec), training_scheduler(model.scheduler_config), model.dit.float().eval()


def first_clips(folder, count, model, encoder):
    """The first `count` clips of a folder (by file name) and their LatentSamples, through
    soragen train's latent cache."""
    cfg = TrainConfig(data=folder, frames=16, height=64, width=64, fps=8.0)
    clips = sorted(scan(cfg, None).clips, key=lambda c: c.path.name)[:count]
    return clips, build_samples(clips, model.vae, encoder, cfg, _default_cache(), 4, None)


@torch.no_grad()
def velocity_error(dit, scheduler, latents, noise, t, tokens, mask, pooled) -> float:
    """Summed squared error of the DiT's velocity for clean `latents` noised with `noise` to step t."""
    ts = torch.full((latents.shape[0],), t)
    pred = dit(scheduler.add_noise(latents, noise, ts), ts, tokens, mask, pooled).float()
    return F.mse_loss(pred, scheduler.get_velocity(latents, noise, ts), reduction="sum").item()
