"""FSDP2 (`soragen train --fsdp` under torchrun): the DiT's weights, gradients and optimizer state
sharded across the processes, for models that do not fit one device.

Each block is a unit (`fully_shard`), then the root: a block's weights are gathered just before it
runs and freed after. The parts of a block that the model calls before the block itself runs (its
adaLN modulation, its cross-attention's text keys and values, made once per batch for every block)
are units of their own, or they would be used still sharded. Checkpoints are sharded too (each
process writes its shards: soragen.train.train_state); rank 0 gathers the EMA into an ordinary
model folder beside them, so a sharded run's checkpoint generates like any other.
"""

from __future__ import annotations

import warnings

import torch


def shard(dit, device: torch.device, amp: torch.dtype | None):
    """Shard `dit` over all processes in place: per block, then the root. With `amp`, weights are
    gathered in that dtype and gradients reduced in float32 (Wan's modulation stays float32)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    # FSDP warns that these units return views; nothing adds to them in place
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for block in dit.blocks:
        fully_shard(block.adaLN_modulation, mesh=mesh, mp_policy=fp32 if dit.config.fp32_modulation else policy)
        if dit.config.cross_attention:
            fully_shard(block.cross.kv, mesh=mesh, mp_policy=policy)
            if any(True for _ in block.cross.k_norm.parameters()):
                fully_shard(block.cross.k_norm, mesh=mesh, mp_policy=policy)
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(dit, mesh=mesh, mp_policy=policy)
    return dit


class ShardedEMA:
    """The EMA of the trained weights as shards beside them (FSDP modules cannot be copied)."""

    def __init__(self, module: torch.nn.Module):
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.values = [p.detach().clone() for p in self.params]

    def update(self, weight: float) -> None:
        with torch.no_grad():
            for e, p in zip(self.values, self.params):
                e.lerp_(p.detach(), weight)

    def state(self) -> dict:
        return dict(zip(self.names, self.values))


def full_state(module, ema: ShardedEMA | None) -> dict:
    """Every process takes part; rank 0 gets the whole state dict on the CPU (with the EMA's values
    for the trained weights), the others an empty one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if ema is None:
        return get_model_state_dict(module, options=options)
    with torch.no_grad():
        kept = [p.detach().clone() for p in ema.params]
        for p, e in zip(ema.params, ema.values):
            p.copy_(e)
        try:
            return get_model_state_dict(module, options=options)
        finally:
            for p, k in zip(ema.params, kept):
                p.copy_(k)


def plain_copy(build, state: dict):
    """An ordinary module (made by `build()` on the meta device) holding `state`."""
    with torch.device("meta"):
        plain = build()
    plain.load_state_dict(state, strict=True, assign=True)
    return plain.eval().requires_grad_(False)
