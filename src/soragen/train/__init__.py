"""Training: the loop, its tasks, one process / DDP / FSDP, checkpoints, clips and captions, the latent cache, --dry-run's plan."""
