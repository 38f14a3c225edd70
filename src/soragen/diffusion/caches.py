"""Step caches: skip the DiT's blocks on steps whose output barely changes (generate --cache).

Each cache decides, pass by pass, whether the blocks run or an earlier step's work stands in:

- first-block:T (First-Block-Cache): the first block always runs; when its residual (output minus
  input) changed by at most T relative to the one of the last full pass (mean absolute
  difference over mean absolute value, as diffusers' FirstBlockCacheConfig measures), the other
  blocks' residual of that pass is added to the first block's output instead of running them.
- taylorseer[:K[:ORDER]] (TaylorSeer): after 3 full passes, K passes in every K + 1 extrapolate the
  blocks' residual from the last full ones (a Taylor series of ORDER 1 or 2 in the step).
- magcache[:T] (MagCache): skips while the accumulated error of the residual's magnitude ratios
  from step to step stays under T (at most 3 passes in a row, never in the first fifth of the
  steps); the ratios are the model's, measured by `soragen calibrate-cache` (`Calibration`).

Why these are soragen's and not diffusers' hooks (`enable_cache`): the sampling loop runs the
conditional and the unconditional pass as one batch of 2 through `VideoDiT.predict`, with the
conditioning made once per video (soragen.pipeline.CachedDiT); diffusers' hooks keep one state per
call (its pipelines call the transformer once per half under cache_context("cond"/"uncond")), find
the blocks through its own registry of block classes and argument names, and stay installed on the
modules. Here each row of the batch (cond, uncond) keeps its own state and decisions, as diffusers'
two contexts do, and the blocks run only for the rows that need them. The decisions follow
diffusers' hooks (first_block_cache.py, mag_cache.py), TaylorSeer's extrapolation is diffusers'
`TaylorSeerState`, MagCache's interpolation of the ratios to the run's steps its `nearest_interp`.
A threshold of 0 (K = 0) runs every pass: the latents are those of no cache, bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from soragen.core.errors import UsageError

CACHES = ("none", "first-block", "taylorseer", "magcache")
DEFAULTS = {"first-block": 0.05, "taylorseer": 2, "magcache": 0.06}


@dataclass(frozen=True)
class CacheSpec:
    """A parsed --cache: its kind, threshold (TaylorSeer: passes extrapolated per full one), and
    TaylorSeer's order; MagCache's calibrated ratios (per row: cond, uncond) once read."""

    kind: str
    threshold: float
    order: int = 1
    ratios: tuple[tuple[float, ...], ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}:{self.threshold:g}" + (f":{self.order}" if self.kind == "taylorseer" else "")


def parse_cache(text: str | None) -> CacheSpec | None:
    """--cache TEXT as a CacheSpec (None for none); UsageError in one line otherwise."""
    if text is None or text == "none":
        return None
    kind, _, rest = text.partition(":")
    if kind not in CACHES:
        raise UsageError(f"--cache {text!r}: unknown cache; choose none, first-block[:T], taylorseer[:K[:ORDER]] or "
                         f"magcache[:T]")
    parts = rest.split(":") if rest else []
    if len(parts) > (2 if kind == "taylorseer" else 1):
        raise UsageError(f"--cache {text!r}: too many values; {kind} takes "
                         f"{'K[:ORDER]' if kind == 'taylorseer' else 'one threshold'}")
    try:
        threshold = float(parts[0]) if parts else float(DEFAULTS[kind])
        order = int(parts[1]) if len(parts) > 1 else 1
    except ValueError:
        raise UsageError(f"--cache {text!r}: {parts} are not numbers") from None
    if not math.isfinite(threshold) or threshold < 0:
        raise UsageError(f"--cache {text!r}: the threshold must be a finite number at least 0, got {parts[0]}")
    if kind == "taylorseer" and (threshold != int(threshold) or threshold > 100 or order not in (1, 2)):
        raise UsageError(f"--cache {text!r}: taylorseer:K:ORDER takes K, the passes extrapolated after each full "
                         f"one, a whole number from 0 to 100, and ORDER 1 or 2")
    if kind != "taylorseer" and threshold > 10:
        raise UsageError(f"--cache {text!r}: the threshold must be at most 10, got {threshold:g}")
    return CacheSpec(kind, threshold, order)


def select(cond, rows: list[int]):
    """The Conditioning of some rows of the batch (what is shared by all rows stays as it is)."""
    import dataclasses
    index = torch.tensor(rows)

    def take(t):
        return t[index.to(t.device)] if isinstance(t, torch.Tensor) and t.shape[0] > 1 else t

    text = [None if kv is None else type(kv)(*(take(getattr(kv, f.name)) for f in dataclasses.fields(kv)))
            for kv in cond.text]
    return dataclasses.replace(cond, blocks=[take(b) for b in cond.blocks], final=take(cond.final), text=text)


class StepCache:
    """A cache as the DiT's step calls it: `cache(dit, x, cond, step)` -> the prediction. Runs the
    first `head` blocks on every row, asks `compute` for each row (0: cond, 1: uncond) whether the
    other blocks run, runs them for those rows alone, and has `reuse` stand in for the others.
    `run` and `skipped` count the passes (a row at a step) of each kind."""

    head = 0

    def __init__(self, spec: CacheSpec, steps: int):
        self.spec, self.steps = spec, steps
        self.state: dict[int, dict] = {}
        self.run = self.skipped = 0
        self.step = 0
        self.ran: list[tuple[int, int, bool]] = []  # (step, row, whether the blocks ran) of each pass

    def __call__(self, dit, x: torch.Tensor, cond, step: int) -> torch.Tensor:
        self.step = step
        tokens, rope, shape = dit.tokens_in(x, cond)
        start = dit.run_blocks(tokens, cond, rope, 0, self.head) if self.head else tokens
        rows = list(range(x.shape[0]))
        states = [self.state.setdefault(r, {"row": r}) for r in rows]
        keep = self.spec.threshold > 0  # at 0 every pass runs and nothing need be kept
        computed = [r for r in rows if not keep or self.compute(states[r], tokens[r:r + 1], start[r:r + 1])]
        if len(computed) == len(rows):
            out = dit.run_blocks(start, cond, rope, self.head)
        elif computed:
            ran = dit.run_blocks(start[computed], select(cond, computed), rope, self.head)
            parts = {r: ran[i:i + 1] for i, r in enumerate(computed)}
        else:
            parts = {}
        if len(computed) < len(rows):
            out = torch.cat([parts[r] if r in parts else self.reuse(states[r], tokens[r:r + 1], start[r:r + 1])
                             for r in rows])
        for r in computed if keep else ():
            self.store(states[r], tokens[r:r + 1], start[r:r + 1], out[r:r + 1])
        self.ran += [(step, r, r in computed) for r in rows]
        self.run += len(computed)
        self.skipped += len(rows) - len(computed)
        return dit.tokens_out(out, cond, shape)

    def compute(self, state: dict, tokens: torch.Tensor, start: torch.Tensor) -> bool:
        raise NotImplementedError

    def store(self, state: dict, tokens: torch.Tensor, start: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError

    def reuse(self, state: dict, tokens: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FirstBlockCache(StepCache):
    """First-Block-Cache, decided as diffusers' FBCHeadBlockHook decides."""

    head = 1

    def compute(self, state, tokens, start) -> bool:
        state["now"] = start - tokens
        if "tail" not in state:
            return True
        previous = state["head"]
        change = ((state["now"] - previous).abs().mean() / previous.abs().mean()).item()
        return change > self.spec.threshold

    def store(self, state, tokens, start, out) -> None:
        state["head"], state["tail"] = state["now"], out - start

    def reuse(self, state, tokens, start) -> torch.Tensor:
        return state["tail"] + start


class TaylorSeerCache(StepCache):
    """TaylorSeer on the blocks' residual: WARMUP full passes first, then one in every K + 1 steps;
    the others extrapolate (diffusers' TaylorSeerState, its factors in float32)."""

    WARMUP = 3

    def compute(self, state, tokens, start) -> bool:
        period = int(self.spec.threshold) + 1
        # full passes first (counted, not by step: a second expert starts mid-run with none of its own)
        return state.get("full", 0) < self.WARMUP or (self.step - self.WARMUP) % period == period - 1

    def _series(self, state):
        if "series" not in state:
            from diffusers.hooks.taylorseer_cache import TaylorSeerState
            state["series"] = TaylorSeerState(taylor_factors_dtype=torch.float32, max_order=self.spec.order)
        state["series"].current_step = self.step
        return state["series"]

    def store(self, state, tokens, start, out) -> None:
        self._series(state).update((out - tokens,))
        state["full"] = state.get("full", 0) + 1

    def reuse(self, state, tokens, start) -> torch.Tensor:
        return tokens + self._series(state).predict()[0]


class MagCache(StepCache):
    """MagCache, decided as diffusers' MagCacheHeadHook decides, each row with its own ratios."""

    MAX_SKIPS, RETENTION = 3, 0.2

    def __init__(self, spec: CacheSpec, steps: int):
        super().__init__(spec, steps)
        from diffusers.hooks.mag_cache import nearest_interp
        self.ratios = [nearest_interp(torch.tensor(r, dtype=torch.float32), steps).tolist() for r in spec.ratios]

    def compute(self, state, tokens, start) -> bool:
        if self.step < int(self.RETENTION * self.steps + 0.5):
            return True
        ratios = self.ratios[min(state["row"], len(self.ratios) - 1)]
        state["ratio"] = state.get("ratio", 1.0) * ratios[self.step]
        state["steps"] = state.get("steps", 0) + 1
        state["error"] = state.get("error", 0.0) + abs(1.0 - state["ratio"])
        if "residual" in state and state["error"] <= self.spec.threshold and state["steps"] <= self.MAX_SKIPS:
            return False
        state["ratio"], state["steps"], state["error"] = 1.0, 0, 0.0
        return True

    def store(self, state, tokens, start, out) -> None:
        state["residual"] = out - tokens

    def reuse(self, state, tokens, start) -> torch.Tensor:
        return tokens + state["residual"]


class Calibration(StepCache):
    """Runs every pass and records, per row and step, the magnitude ratio of the blocks' residual
    to the previous step's (the mean over tokens of their norms' ratio, as diffusers calibrates):
    what MagCache reads. `ratios` may be shared by the caches of two experts."""

    def __init__(self, steps: int, ratios: dict[int, dict[int, float]] | None = None):
        super().__init__(CacheSpec("calibrate", 1.0), steps)  # a threshold above 0: `store` sees every pass
        self.ratios = {} if ratios is None else ratios

    def compute(self, state, tokens, start) -> bool:
        return True

    def store(self, state, tokens, start, out) -> None:
        residual = (out - tokens).float()
        previous = state.get("residual")
        ratio = 1.0 if previous is None else (residual.norm(dim=-1) / (previous.norm(dim=-1) + 1e-8)).mean().item()
        self.ratios.setdefault(state["row"], {})[self.step] = ratio
        state["residual"] = residual


def make_cache(spec, steps: int) -> StepCache | None:
    """The cache a CacheSpec asks for, for a run of `steps` steps (None: no cache; a function of the
    steps: what it makes, such as a `Calibration`)."""
    if spec is None or callable(spec):
        return spec and spec(steps)
    if spec.kind == "magcache" and not spec.ratios and spec.threshold > 0:
        raise UsageError("--cache magcache needs the model's calibration (soragen calibrate-cache)")
    return {"first-block": FirstBlockCache, "taylorseer": TaylorSeerCache, "magcache": MagCache}[spec.kind](spec, steps)


def passes(dits: list) -> dict[str, int]:
    """The DiT passes (a row of the batch at a step) the sampling DiTs ran and skipped, and the
    (step, row) of each skipped one (row 0 the conditional pass, 1 the unconditional)."""
    caches = [d.cache for d in dits if d.cache is not None]
    return {"run": sum(d.run for d in dits) + sum(c.run for c in caches), "skipped": sum(c.skipped for c in caches),
            "skipped_at": sorted((step, row) for c in caches for step, row, ran in c.ran if not ran)}
