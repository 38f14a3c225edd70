"""The pixel judge of the shapes world, and the prompt sets it is scored on.

:func:`judge_video` reads a clip's background, colour, shape and direction of motion back from
its pixels alone; :func:`score` and :func:`mistakes` compare a batch of judgements with the
prompts that produced them.  The packaged prompt sets (``prompts/eval.jsonl``,
``prompts/heldout.jsonl``) are rebuilt by :func:`build_prompt_set` and read by
:func:`load_prompt_set`.  The world itself (what a clip can show, how it is drawn and
captioned) is :mod:`soragen.tools.shapes`.

No torch here: numpy and the standard library only (scipy is used for connected
components when installed, with a pure-Python fallback).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np

from soragen.core.errors import SoragenError, UsageError
from soragen.tools.shapes import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SAMPLE_PROMPTS,
    SHAPES,
    ClipSpec,
    background_image,
    caption_for,
    shape_mask,
)

# --------------------------------------------------------------------------- judge


@dataclass(frozen=True)
class Judgement:
    """Attributes read back from a clip's pixels (None where the judge could not tell)."""

    background: str | None
    color: str | None
    shape: str | None
    direction: str | None
    presence: float  # fraction of frames where an object of plausible size is found


_PALETTE_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _PALETTE_NAMES], np.float32)

# The shape judge fits each shape to the object's soft mask in every frame: a template of the
# shape with the object's mass and centroid (both kept by blur), drawn at a few sizes and blurred
# by a few widths.  The shape whose best templates are nearest over the clip wins, so a blurred
# triangle is compared with a blurred triangle, not with a crisp one.
_SHAPE_AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box side^2
_SHAPE_CENTROID = {"circle": 0.5, "square": 0.5, "triangle": 2.0 / 3.0}  # centroid depth / side
_TEMPLATE_SCALES = (0.9, 1.0, 1.1)
_TEMPLATE_BLURS = (0.0, 0.75, 1.5, 2.25, 3.0)  # Gaussian sigma, pixels
_SUPERSAMPLE = 4


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels of a 2-D boolean mask (0 = background)."""
    try:
        from scipy import ndimage  # optional speed-up
    except ImportError:  # pragma: no cover - exercised only without scipy
        return _label_python(mask)
    labels, count = ndimage.label(mask)
    return labels, int(count)


def _label_python(mask: np.ndarray) -> tuple[np.ndarray, int]:
    h, w = mask.shape
    labels = np.zeros((h, w), np.int32)
    flat = mask.ravel()
    lab = labels.ravel()
    count = 0
    for start in np.flatnonzero(flat):
        if lab[start]:
            continue
        count += 1
        lab[start] = count
        stack = [int(start)]
        while stack:
            p = stack.pop()
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not lab[q]:
                    lab[q] = count
                    stack.append(q)
    return labels, count


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    labels, count = _label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _background_templates(size: int) -> dict[str, np.ndarray]:
    return {name: background_image(name, size)[:, 0, :] for name in BACKGROUNDS}


def _classify_background(rows: np.ndarray) -> str | None:
    """``rows``: (H, 3) median colour of each row over the clip."""
    templates = _background_templates(rows.shape[0])
    dists = {name: float(np.sqrt(np.mean((rows - tpl) ** 2))) for name, tpl in templates.items()}
    name = min(dists, key=dists.get)
    return name if dists[name] < 110.0 else None


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix that blurs a length-n signal with a Gaussian, renormalised at the ends."""
    if sigma <= 0:
        return np.eye(n)
    i = np.arange(n, dtype=np.float64)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True)


def _coverage(shape: str, x: float, y: float, s: float, subpixels: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Fraction of each pixel that the crisp shape covers, from a grid of sub-pixel centres."""
    n = _SUPERSAMPLE
    h, w = subpixels[0].shape[0] // n, subpixels[0].shape[1] // n
    return shape_mask(shape, x, y, s, subpixels).reshape(h, n, w, n).mean(axis=(1, 3))


def _shape_errors(alpha: np.ndarray, window: np.ndarray) -> dict[str, float]:
    """Squared error of the best-fitting template of each shape to ``alpha`` inside ``window``."""
    ys, xs = np.nonzero(window)
    top, left = int(ys.min()), int(xs.min())
    h, w = int(ys.max()) + 1 - top, int(xs.max()) + 1 - left
    win = window[top : top + h, left : left + w].astype(np.float64)
    a = alpha[top : top + h, left : left + w] * win
    mass = float(a.sum())
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cy, cx = float((a * gy).sum()) / mass + top, float((a * gx).sum()) / mass + left
    n = _SUPERSAMPLE
    sy, sx = np.mgrid[0 : h * n, 0 : w * n].astype(np.float64)
    subpixels = (top + (sy + 0.5) / n, left + (sx + 0.5) / n)
    blur_y = np.stack([_blur_matrix(h, b) for b in _TEMPLATE_BLURS])  # (blurs, h, h)
    blur_x_t = np.stack([_blur_matrix(w, b).T for b in _TEMPLATE_BLURS])  # (blurs, w, w)
    errors = {}
    for shape, area in _SHAPE_AREA.items():
        sides = [scale * np.sqrt(mass / area) for scale in _TEMPLATE_SCALES]
        crisp = np.stack([_coverage(shape, cx - d / 2, cy - _SHAPE_CENTROID[shape] * d, d, subpixels) for d in sides])
        templates = blur_y[None] @ crisp[:, None] @ blur_x_t[None]  # (scales, blurs, h, w)
        errors[shape] = float((((templates * win - a) ** 2).sum(axis=(2, 3))).min())
    return errors


def _as_clip(frames: np.ndarray) -> np.ndarray:
    """The clip as float32 (T, H, W, 3); UsageError for any other shape."""
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] < 1:
        raise UsageError(f"judge_video needs a (T, H, W, 3) array, got shape {f.shape}")
    return f.astype(np.float32)


def _object_colour(f: np.ndarray, dist: np.ndarray, min_area: float, max_area: float) -> np.ndarray | None:
    """Pass 1: rough masks (far from the background), largest component per frame -> the object's
    colour; None when no frame holds an object of plausible size."""
    t_count = f.shape[0]
    rough = [_largest_component(dist[t] > 40.0) for t in range(t_count)]
    good = [t for t in range(t_count) if min_area <= rough[t].sum() <= max_area]
    if not good:
        return None
    # The colour comes from each mask's core (the pixels farthest from the background), so that
    # edges blended with the background (blur, compression) do not drag it toward another colour.
    cores = []
    for t in good:
        d = dist[t][rough[t]]
        cores.append(f[t][rough[t]][d >= np.percentile(d, 60)])
    pixels = np.concatenate(cores)
    return np.median(pixels, axis=0)


def _track_object(
    diff: np.ndarray, dist: np.ndarray, axis: np.ndarray, min_area: float, max_area: float
) -> tuple[list[tuple[int, float, float]], dict[str, float]]:
    """Pass 2: the object's centre in each frame where it has a plausible size, and each shape's
    template error summed over those frames.

    A pixel is object when it is nearer the object colour than its row's background (the
    midpoint rule gives the right area even on blurred or compressed edges); ``axis`` runs from
    each row's background to the object colour.
    """
    norm2 = np.maximum(np.sum(axis * axis, axis=-1), 1.0)
    proj = np.sum(diff * axis, axis=-1) / norm2
    fine = (proj > 0.5) & (dist > 20.0)
    alpha_all = np.clip(proj, 0.0, 1.0)

    tracks = []
    errors = dict.fromkeys(_SHAPE_AREA, 0.0)
    for t in range(diff.shape[0]):
        m = _largest_component(fine[t])
        area = int(m.sum())
        if not (min_area <= area <= max_area):
            continue
        ys, xs = np.nonzero(m)
        tracks.append((t, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
        for shape, err in _shape_errors(alpha_all[t], _dilate(m, 4)).items():
            errors[shape] += err
    return tracks, errors


def _direction(tracks: list[tuple[int, float, float]], t_count: int, side: int) -> str | None:
    """The direction of the centre's least-squares line over the clip, when it travels at least a
    tenth of the frame's shorter ``side``."""
    if len(tracks) < 2:
        return None
    tr = np.array(tracks, float)
    ts = tr[:, 0] - tr[:, 0].mean()
    denom = float(np.sum(ts * ts))
    span = t_count - 1
    dx = float(np.sum(ts * (tr[:, 1] - tr[:, 1].mean())) / denom) * span
    dy = float(np.sum(ts * (tr[:, 2] - tr[:, 2].mean())) / denom) * span
    if max(abs(dx), abs(dy)) >= 0.1 * side:
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"  # image y grows downward
    return None


def judge_video(frames: np.ndarray) -> Judgement:
    """Read background, colour, shape and direction back from a (T, H, W, 3) clip's pixels."""
    f = _as_clip(frames)
    t_count, h, w, _ = f.shape
    # The object covers at most ~30% of any row, so each row's median is its background colour.
    bg_rows = np.median(f, axis=2)  # (T, H, 3)
    background = _classify_background(np.median(bg_rows, axis=0))
    bg = bg_rows[:, :, None, :]
    diff = f - bg
    dist = np.sqrt(np.sum(diff * diff, axis=-1))  # (T, H, W)

    expected = min(h, w) / 4.0
    min_area, max_area = 0.2 * expected * expected, 4.0 * expected * expected

    obj = _object_colour(f, dist, min_area, max_area)
    if obj is None:
        return Judgement(background, None, None, None, 0.0)
    color = _PALETTE_NAMES[int(np.argmin(np.sum((_PALETTE - obj) ** 2, axis=1)))]

    axis = obj[None, None, None, :] - bg  # (T, H, 1, 3)
    tracks, errors = _track_object(diff, dist, axis, min_area, max_area)
    presence = len(tracks) / t_count
    if not tracks:
        return Judgement(background, color, None, None, presence)

    shape = min(errors, key=errors.get)
    return Judgement(background, color, shape, _direction(tracks, t_count, min(h, w)), presence)


# --------------------------------------------------------------------------- prompt sets & scoring


# (size, seed, held-out wording) of the packaged prompt sets; build_prompt_set regenerates them.
_PROMPT_SET_RECIPES = {"eval": (60, 1234, False), "heldout": (30, 4321, True)}


def build_prompt_set(name: str) -> list[dict]:
    """Deterministically rebuild a packaged prompt set ("eval" or "heldout").

    Each attribute takes every value equally often (up to rounding); values are paired at random.
    """
    if name not in _PROMPT_SET_RECIPES:
        raise UsageError(f"no recipe for prompt set {name!r}")
    n, seed, heldout = _PROMPT_SET_RECIPES[name]
    rng = random.Random(seed)
    columns = []
    for values in (BACKGROUNDS, tuple(COLORS), SHAPES, DIRECTIONS):
        column = [values[i % len(values)] for i in range(n)]
        rng.shuffle(column)
        columns.append(column)
    rows = []
    for background, color, shape, direction in zip(*columns):
        spec = ClipSpec(background, color, shape, direction)
        rows.append({"prompt": caption_for(spec, rng, heldout=heldout), **spec.as_dict()})
    return rows


def write_prompt_sets(directory: str | os.PathLike) -> None:
    """Write eval.jsonl, heldout.jsonl and samples.txt (how src/soragen/prompts was made)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name in _PROMPT_SET_RECIPES:
        lines = [json.dumps(row) for row in build_prompt_set(name)]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "samples.txt").write_text("\n".join(p for p, _ in SAMPLE_PROMPTS) + "\n", encoding="utf-8")


def load_prompt_set(name: str = "eval") -> list[dict]:
    """Read the packaged prompt set ``prompts/<name>.jsonl`` (keys: prompt + the four attributes)."""
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", name or ""):
        raise UsageError(f"bad prompt set name {name!r}")
    resource = resources.files("soragen").joinpath("prompts", f"{name}.jsonl")
    if not resource.is_file():
        available = sorted(
            p.name[: -len(".jsonl")]
            for p in resources.files("soragen").joinpath("prompts").iterdir()
            if p.name.endswith(".jsonl")
        )
        raise UsageError(f"unknown prompt set {name!r}; available: {', '.join(available)}")
    return parse_prompt_set(resource.read_text(encoding="utf-8"), repr(name))


def parse_prompt_set(text: str, where: str) -> list[dict]:
    """JSONL lines, each with a prompt and the four attributes it asks for."""
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SoragenError(f"prompt set {where} line {i} is not valid JSON: {exc}") from exc
        missing = [k for k in ("prompt", *ATTRIBUTES) if not isinstance(row, dict) or k not in row]
        if missing:
            raise SoragenError(f"prompt set {where} line {i} lacks {', '.join(missing)}")
        rows.append(row)
    return rows


def score(judgements: list[Judgement], expected: Iterable[dict]) -> dict[str, float]:
    """Accuracy per attribute, mean presence, and "all" (all four attributes right)."""
    expected = list(expected)
    if len(judgements) != len(expected):
        raise UsageError(f"score needs one judgement per prompt ({len(judgements)} vs {len(expected)})")
    if not judgements:
        raise UsageError("score needs at least one judgement")
    hits = {a: 0 for a in ATTRIBUTES}
    all_right = 0
    for j, e in zip(judgements, expected):
        right = [getattr(j, a) is not None and getattr(j, a) == e.get(a) for a in ATTRIBUTES]
        for a, ok in zip(ATTRIBUTES, right):
            hits[a] += ok
        all_right += all(right)
    n = len(judgements)
    result = {a: hits[a] / n for a in ATTRIBUTES}
    result["presence"] = float(np.mean([j.presence for j in judgements]))
    result["all"] = all_right / n
    return result


def mistakes(judgements: list[Judgement], expected: Iterable[dict]) -> dict[str, dict[str, int]]:
    """Per attribute, how often each wrong reading happened: {"shape": {"triangle -> circle": 15}},
    most frequent first; "none" where the judge could not tell. What to fix next, at a glance."""
    counts: dict[str, Counter] = {a: Counter() for a in ATTRIBUTES}
    for j, e in zip(judgements, expected):
        for a in ATTRIBUTES:
            got = getattr(j, a)
            if got != e.get(a):
                counts[a][f"{e.get(a)} -> {got or 'none'}"] += 1
    return {a: dict(c.most_common()) for a, c in counts.items()}
