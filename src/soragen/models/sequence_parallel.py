"""One video's DiT step across processes (torch.distributed: gloo on CPUs, nccl on GPUs).

Sequence parallelism: each process holds a run of the tokens (padded to a multiple of the process
count; the padding is never attended to and is dropped at the end). Everything a token does on its
own (patch embedding, adaLN, cross-attention to the text, the MLP, the final layer) runs on the
local run; only self-attention needs every token, in one of two ways:

- Ulysses: an all-to-all turns (all heads, local tokens) into (local heads, all tokens), attention
  runs as in one process, and a second all-to-all turns it back. Needs heads divisible by the
  process count.
- ring: the keys and values go round the processes, a block at a time, and each process merges
  its queries' attention over the blocks by their log-sum-exp (online softmax). Any head count.

The step's result is gathered to every process before the sampler's update, so all keep the same
latent. Classifier-free guidance's two halves may instead go to two groups of processes (`Split`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Split:
    """How a step is split: `cfg` groups of processes (1, or 2: conditional and unconditional), each
    splitting the tokens over `size` processes the way `how` says (ulysses, ring, or none)."""

    how: str  # "ulysses" | "ring" | "none"
    size: int  # processes sharing one batch's tokens
    index: int  # this process's place among them
    group: object = None  # their process group
    cfg: int = 1
    cfg_index: int = 0
    cfg_group: object = None  # this process and its counterpart in the other half


def _exchange(chunks: list[torch.Tensor], group) -> list[torch.Tensor]:
    """Send chunks[j] to the j-th process of `group`; returns what each of them sent this one."""
    out = [torch.empty(c.shape, dtype=c.dtype, device=c.device) for c in chunks]
    dist.all_to_all(out, [c.contiguous() for c in chunks], group=group)
    return out


def ulysses_attend(inner, split: Split, keys: int):
    """An `attend` over local tokens (B, heads, n, d) that attends over all `keys` real tokens."""
    def attend(q, k, v, bias):
        q, k, v = (torch.cat(_exchange(list(t.chunk(split.size, dim=1)), split.group), dim=2) for t in (q, k, v))
        mask = _padding_bias(k.shape[2], keys, q)  # self-attention has no bias of its own
        out = inner(q, k, v, mask if bias is None else bias if mask is None else bias + mask)
        return torch.cat(_exchange(list(out.chunk(split.size, dim=2)), split.group), dim=1)
    return attend


def ring_attend(split: Split, keys: int):
    """An `attend` over local tokens whose keys and values visit every process in turn, merged by
    online softmax (a running maximum, sum and unnormalised output, as flash attention keeps them)."""
    def attend(q, k, v, bias):
        n, size, rank = k.shape[2], split.size, split.index
        ranks = dist.get_process_group_ranks(split.group) if split.group is not None else list(range(size))
        qf = q.float()
        top = torch.full((*q.shape[:-1], 1), float("-inf"), device=q.device)
        total = torch.zeros_like(top)
        out = torch.zeros(*q.shape[:-1], v.shape[-1], device=q.device)
        for step in range(size):
            owner = (rank - step) % size  # whose block of keys this process holds now
            valid = min(max(keys - owner * n, 0), n)
            if valid:
                scores = qf @ k[:, :, :valid].float().transpose(-1, -2)
                new_top = torch.maximum(top, scores.amax(dim=-1, keepdim=True))
                weights, rescale = torch.exp(scores - new_top), torch.exp(top - new_top)
                total = total * rescale + weights.sum(dim=-1, keepdim=True)
                out = out * rescale + weights @ v[:, :, :valid].float()
                top = new_top
            if step < size - 1:
                k, v = _pass_on(k, ranks, rank, size, split.group), _pass_on(v, ranks, rank, size, split.group)
        return (out / total).to(q.dtype)
    return attend


def _pass_on(t: torch.Tensor, ranks: list[int], rank: int, size: int, group) -> torch.Tensor:
    """Send `t` to the next process of the ring and take the previous one's."""
    received = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    ops = [dist.P2POp(dist.isend, t.contiguous(), ranks[(rank + 1) % size], group),
           dist.P2POp(dist.irecv, received, ranks[(rank - 1) % size], group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _padding_bias(total: int, keys: int, like: torch.Tensor) -> torch.Tensor | None:
    if total == keys:
        return None
    bias = torch.zeros(total, dtype=like.dtype, device=like.device)
    bias[keys:] = float("-inf")
    return bias.view(1, 1, 1, total)


def local_segments(segments: list[int] | None, lo: int, hi: int) -> list[int] | None:
    """A step's runs of tokens (still frames, the rest) as they fall in the local run [lo, hi)."""
    if segments is None:
        return None
    still = min(max(segments[0] - lo, 0), hi - lo)
    return [still, hi - lo - still]


def parallel_predict(dit, split: Split):
    """`dit.predict` with the tokens split over `split`'s processes; every process gets the whole
    prediction. The blocks' self-attention is given the split's `attend` for the run."""
    def predict(x: torch.Tensor, cond) -> torch.Tensor:
        tokens, rope, shape = dit.tokens_in(x, cond)
        count = tokens.shape[1]
        n = math.ceil(count / split.size)
        tokens = torch.nn.functional.pad(tokens, (0, 0, 0, n * split.size - count))
        lo, hi = split.index * n, (split.index + 1) * n
        if rope is not None:
            rope = tuple(torch.nn.functional.pad(a, (0, 0, 0, n * split.size - count))[lo:hi] for a in rope)
        segments = local_segments(cond.segments, lo, hi)
        saved = [block.attn.attend for block in dit.blocks]
        for block in dit.blocks:
            block.attn.attend = ulysses_attend(block.attn.attend, split, count) if split.how == "ulysses" \
                else ring_attend(split, count)
        try:
            local = dit.run_blocks(tokens[:, lo:hi].contiguous(), cond, rope, segments=segments)
        finally:
            for block, attend in zip(dit.blocks, saved):
                block.attn.attend = attend
        patches = dit.final(local, cond.final, segments).contiguous()
        parts = [torch.empty_like(patches) for _ in range(split.size)]
        dist.all_gather(parts, patches, group=split.group)
        return dit.unpatch(torch.cat(parts, dim=1)[:, :count], shape)
    return predict


class CfgSplit:
    """The sampling loop's model (x, t, text) -> prediction with its batch of 2 (conditional, then
    unconditional) split over two groups of processes: each runs its half, and the halves are
    gathered back in order."""

    def __init__(self, model, split: Split):
        self.model, self.split, self.halves = model, split, {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        half, i = x.shape[0] // 2, self.split.cfg_index
        if id(text) not in self.halves:  # the same half object every step: its keys/values are made once
            self.halves = {id(text): text.half(i)}
        out = self.model(x[i * half:(i + 1) * half], t[i * half:(i + 1) * half], self.halves[id(text)]).contiguous()
        parts = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(parts, out, group=self.split.cfg_group)
        return torch.cat(parts)


CFG_WITHOUT_GUIDANCE = ("--parallel cfg puts guidance's two passes on two groups of processes; with --guidance 1 "
                        "there is one pass: use --parallel ulysses, ring or auto")


def make_split(mode: str, heads: int, guided: bool) -> Split:
    """The split of `--parallel MODE` over this process group (every process calls it, in step):
    auto is cfg's two halves where guidance is on and the process count is even, then the tokens
    of each half by Ulysses where the heads divide, else by ring."""
    from soragen.core.errors import UsageError
    world, rank = dist.get_world_size(), dist.get_rank()
    if mode == "cfg" and not guided:
        raise UsageError(CFG_WITHOUT_GUIDANCE)
    if mode == "cfg" and world % 2:
        raise UsageError(f"--parallel cfg needs an even number of processes, got {world}")
    cfg = 2 if mode == "cfg" or (mode == "auto" and guided and world % 2 == 0) else 1
    size = world // cfg
    how = mode if mode in ("ulysses", "ring") else "none" if size == 1 else "ulysses" if heads % size == 0 else "ring"
    if how == "ulysses" and heads % size:
        raise UsageError(f"--parallel ulysses splits the DiT's {heads} attention heads over {size} processes, which "
                         f"does not divide them; use --parallel ring or auto")
    halves = [dist.new_group(list(range(h * size, (h + 1) * size))) for h in range(cfg)]
    pairs = [dist.new_group([i, i + size]) for i in range(size)] if cfg == 2 else []
    return Split(how, size, rank % size, halves[rank // size], cfg, rank // size, pairs[rank % size] if pairs else None)


def share_text(embedding, device, dtype):
    """The text embedding rank 0 made, on every process (the others pass None): the text encoder runs once."""
    from soragen.models.text import TextEmbedding
    header = torch.zeros(4, dtype=torch.int64, device=device)
    if dist.get_rank() == 0:
        header = torch.tensor([*embedding.tokens.shape[1:], int(embedding.pooled is not None), 0], device=device)
    dist.broadcast(header, 0)
    length, width, pooled = (int(v) for v in header[:3])
    if dist.get_rank() != 0:
        embedding = TextEmbedding(torch.empty(1, length, width, device=device),
                                  torch.empty(1, length, dtype=torch.bool, device=device),
                                  torch.empty(1, width, device=device) if pooled else None)
    parts = [embedding.tokens.float().contiguous(), embedding.mask.to(torch.uint8).contiguous()]
    parts += [embedding.pooled.float().contiguous()] if pooled else []
    for part in parts:
        dist.broadcast(part, 0)
    return TextEmbedding(parts[0].to(dtype), parts[1].bool(), parts[2].to(dtype) if pooled else None)
