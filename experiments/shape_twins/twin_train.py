"""Fine-tune the default DiT where, at t >= --t-swap, the noisy input is sometimes made from the
clip's shape twin (make_twins.py) while the target stays the clip itself: the velocity that leads to
its own x0. To lower that loss the DiT has to turn a wrong shape into the caption's, so it has to
read the shape word. Both folders are also plain training data (3600 clips for 1800 pairs).

    python experiments/shape_twins/twin_train.py data/shapes data/shapes-twins runs/twin-p05 \
        --p-swap 0.5 --t-swap 300 --steps 1200 --lr 1e-4

A prototype (weights/README.md, phase 13), not part of the package: batch 8, AdamW, 50 warm-up
steps, EMA 0.999, caption dropout 0.1, float32; a checkpoint (EMA weights) every 400 steps.
"""
import argparse, copy, dataclasses, json, time
from pathlib import Path
import torch, torch.nn.functional as F
from soragen.cli import _default_cache
from soragen.config import TrainConfig
from soragen.model_io import load_model, default_model_dir, save_model
from soragen.sampling import training_scheduler
from soragen.text import TextEncoder
from soragen.train import scan, build_samples

parser = argparse.ArgumentParser()
parser.add_argument("data")
parser.add_argument("twins")
parser.add_argument("out", type=Path)
parser.add_argument("--p-swap", type=float, default=0.5)
parser.add_argument("--t-swap", type=int, default=300)
parser.add_argument("--steps", type=int, default=1200)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--init", help="model to start from (default: the packaged one)")
args = parser.parse_args()
out, p_swap, t_swap, max_steps, lr = args.out, args.p_swap, args.t_swap, args.steps, args.lr
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
base = load_model(args.init or default_model_dir())
te = TextEncoder(base.text_spec)
cache = _default_cache()  # where soragen train keeps its latent cache
cfg_a = TrainConfig(data=args.data, frames=16, height=64, width=64, fps=8.0)
cfg_b = dataclasses.replace(cfg_a, data=args.twins)
ra, rb = scan(cfg_a, None), scan(cfg_b, None)
sa = build_samples(ra.clips, base.vae, te, cfg_a, cache, 4, None)
sb = build_samples(rb.clips, base.vae, te, cfg_b, cache, 4, None)
names_b = {c.path.name: j for j, c in enumerate(rb.clips)}
pair = [names_b[c.path.name] for c in ra.clips]
print("clips", len(pair), flush=True)
sch = training_scheduler(base.scheduler_config)
ac = sch.alphas_cumprod
print("alpha, sigma at t_swap:", float(ac[t_swap].sqrt()), float((1 - ac[t_swap]).sqrt()), flush=True)

dit = copy.deepcopy(base.dit).float().train().requires_grad_(True)
ema = copy.deepcopy(dit).eval().requires_grad_(False)
opt = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
g = torch.Generator().manual_seed(1)
log = open(out / "metrics.jsonl", "a")
start = time.time()
for step in range(1, max_steps + 1):
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, step / 50)
    lat_in, lat_own, toks, pools, ts = [], [], [], [], []
    swaps = 0
    for _ in range(8):
        i = int(torch.randint(0, len(pair), (1,), generator=g))
        side = int(torch.randint(0, 2, (1,), generator=g))
        own, other = (sa, sb) if side == 0 else (sb, sa)
        io, ia = (i, pair[i]) if side == 0 else (pair[i], i)
        t = int(torch.randint(0, 1000, (1,), generator=g))
        drop = float(torch.rand((), generator=g)) < 0.1
        swap = (not drop) and t >= t_swap and float(torch.rand((), generator=g)) < p_swap
        swaps += swap
        lat_own.append(own.latents[io][0])
        lat_in.append(other.latents[ia][0] if swap else own.latents[io][0])
        toks.append(own.empty_tokens if drop else own.tokens[io])
        pools.append(own.empty_pooled if drop else own.pooled[io])
        ts.append(t)
    L = max(x.shape[0] for x in toks)
    mask = torch.stack([torch.arange(L) < x.shape[0] for x in toks])
    toks = torch.stack([F.pad(x, (0, 0, 0, L - x.shape[0])) for x in toks])
    pools = torch.stack(pools)
    x_in, x0 = torch.stack(lat_in), torch.stack(lat_own)
    t = torch.tensor(ts)
    noise = torch.randn(x0.shape, generator=g)
    a = ac[t].sqrt().view(-1, 1, 1, 1, 1).float(); s = (1 - ac[t]).sqrt().view(-1, 1, 1, 1, 1).float()
    xt = a * x_in + s * noise
    target = (a * xt - x0) / s  # = a*noise - s*x0 when x_in is x0: the usual velocity
    pred = dit(xt, t, toks, mask, pools)
    loss = F.mse_loss(pred.float(), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
    opt.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema.parameters(), dit.parameters()):
            e.lerp_(p, 1 - decay)
    log.write(json.dumps({"step": step, "loss": loss.item(), "swaps": swaps, "s": time.time() - start}) + "\n")
    if step % 20 == 0:
        log.flush()
        print(step, f"{loss.item():.4f}", f"{step / (time.time() - start):.2f} it/s", flush=True)
    if step % 400 == 0:
        save_model(out / f"checkpoint-{step}", ema, base.vae, base.text_spec, base.video, base.scheduler_config,
                   base.sampling)
