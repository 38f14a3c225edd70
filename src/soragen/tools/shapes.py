"""The "shapes" world: a tiny synthetic text-to-video domain with a pixel judge.

Every clip shows one filled object (circle, square or triangle) in one of five
colours, moving in a straight line at constant speed over one of three
backgrounds.  This module

* renders clips (:func:`render_clip`) and captions them (:func:`caption_for`),
* writes training sets to disk (:func:`make_dataset`),
* reads the attributes back from pixels only (:func:`judge_video`) and scores a
  batch of judgements against the prompts that produced them (:func:`score`).

Captions come from two disjoint vocabularies: the *training* wordings, and a
*held-out* set of wordings (``crimson``, ``sphere``, ``heading east``,
``meadow``, ``starry`` ...) that training captions never use, so that a model's
generalisation to new phrasings can be measured.

No torch here: numpy and the standard library only (scipy is used for connected
components when installed, with a pure-Python fallback).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from soragen.core.errors import SoragenError, UsageError

# --------------------------------------------------------------------------- world

BACKGROUNDS = ("sky", "night", "grass")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

SKY_TOP = (90, 160, 230)
SKY_BOTTOM = (180, 215, 245)
NIGHT = (15, 15, 45)
STAR = (255, 255, 255)
GRASS = (60, 150, 60)

FPS = 8.0
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 64

ATTRIBUTES = ("background", "color", "shape", "direction")


@dataclass(frozen=True)
class ClipSpec:
    """What a clip shows; where exactly it shows it is drawn from the rng at render time."""

    background: str
    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for name, allowed in (
            ("background", BACKGROUNDS),
            ("color", tuple(COLORS)),
            ("shape", SHAPES),
            ("direction", DIRECTIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_specs() -> list[ClipSpec]:
    """All 3 * 5 * 3 * 4 = 180 combinations, in a fixed order."""
    return [ClipSpec(*c) for c in itertools.product(BACKGROUNDS, COLORS, SHAPES, DIRECTIONS)]


def random_spec(rng: random.Random) -> ClipSpec:
    return ClipSpec(
        rng.choice(BACKGROUNDS), rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(DIRECTIONS)
    )


# --------------------------------------------------------------------------- rendering


def background_image(name: str, size: int) -> np.ndarray:
    """The star-less background as a (size, size, 3) float array."""
    if name == "sky":
        t = np.linspace(0.0, 1.0, size)[:, None]
        rows = np.asarray(SKY_TOP, float) + (np.asarray(SKY_BOTTOM, float) - np.asarray(SKY_TOP, float)) * t
        return np.repeat(rows[:, None, :], size, axis=1)
    if name == "night":
        return np.broadcast_to(np.asarray(NIGHT, float), (size, size, 3)).copy()
    if name == "grass":
        return np.broadcast_to(np.asarray(GRASS, float), (size, size, 3)).copy()
    raise UsageError(f"unknown background {name!r}")


def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
    cy, cx = np.mgrid[0:size, 0:size].astype(float) + 0.5
    return cy, cx


def _shape_mask(shape: str, x: float, y: float, s: float, centres: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Crisp filled mask of a shape whose bounding box is [x, x+s) x [y, y+s), tested at pixel centres."""
    cy, cx = centres
    if shape == "square":
        return (cx >= x) & (cx < x + s) & (cy >= y) & (cy < y + s)
    if shape == "circle":
        r = s / 2.0
        return (cx - (x + r)) ** 2 + (cy - (y + r)) ** 2 <= r * r
    if shape == "triangle":  # isosceles, apex up, height == base width
        v = (cy - y) / s  # 0 at the apex, 1 at the base
        return (v >= 0) & (v <= 1) & (np.abs(cx - (x + s / 2.0)) <= v * s / 2.0)
    raise UsageError(f"unknown shape {shape!r}")


def _trajectory(
    spec: ClipSpec, rng: random.Random, frames: int, size: int
) -> tuple[float, list[tuple[float, float]]]:
    """Object size and the top-left corner of its bounding box in each frame."""
    s = size / 4.0 * rng.uniform(0.9, 1.1)
    travel = size / 2.0
    margin = 1.0 if size >= 32 else 0.0
    lo, hi = margin, max(margin, size - s - travel - margin)
    start = rng.uniform(lo, hi)
    other = rng.uniform(margin, max(margin, size - s - margin))
    sign = 1.0 if spec.direction in ("right", "down") else -1.0
    first = start if sign > 0 else start + travel
    corners = []
    for t in range(frames):
        p = first + sign * travel * (t / (frames - 1) if frames > 1 else 0.0)
        corners.append((p, other) if spec.direction in ("left", "right") else (other, p))
    return s, corners


def render_clip(
    spec: ClipSpec, rng: random.Random, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE
) -> np.ndarray:
    """Render a clip as a (frames, size, size, 3) uint8 array; all randomness comes from ``rng``."""
    if frames < 1 or size < 8:
        raise UsageError(f"a clip needs at least 1 frame of at least 8x8 pixels (got {frames} x {size})")
    bg = background_image(spec.background, size)
    if spec.background == "night":
        for _ in range(rng.randint(6, 10)):
            bg[rng.randrange(size), rng.randrange(size)] = STAR
    s, corners = _trajectory(spec, rng, frames, size)
    colour = np.asarray(COLORS[spec.color], float)
    out = np.empty((frames, size, size, 3), np.uint8)
    centres = _pixel_centres(size)
    for t, (x, y) in enumerate(corners):
        img = bg.copy()
        img[_shape_mask(spec.shape, x, y, s, centres)] = colour
        out[t] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def render_background(name: str, rng: random.Random, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE) -> np.ndarray:
    """A clip of the background alone (no object); handy as a negative for the judge."""
    bg = background_image(name, size)
    if name == "night":
        for _ in range(rng.randint(6, 10)):
            bg[rng.randrange(size), rng.randrange(size)] = STAR
    img = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
    return np.repeat(img[None], frames, axis=0)


# --------------------------------------------------------------------------- captions

# Each entry is a list of alternatives.  Motion phrases come as (participle, present-tense) pairs
# so templates can say "a red ball moving left" as well as "a red ball moves left".
_TRAIN_WORDS: dict[str, dict[str, list]] = {
    "color": {
        "red": ["red", "scarlet"],
        "yellow": ["yellow", "bright yellow"],
        "white": ["white", "pure white"],
        "purple": ["purple", "deep purple"],
        "orange": ["orange", "bright orange"],
    },
    "shape": {
        "circle": ["circle", "ball", "disc", "round dot"],
        "square": ["square", "box", "block"],
        "triangle": ["triangle", "triangular shape", "wedge"],
    },
    "direction": {
        "left": [("moving left", "moves left"), ("sliding to the left", "slides to the left"),
                 ("travelling leftward", "travels leftward"), ("drifting left", "drifts left")],
        "right": [("moving right", "moves right"), ("sliding to the right", "slides to the right"),
                  ("travelling rightward", "travels rightward"), ("drifting right", "drifts right")],
        "up": [("moving up", "moves up"), ("rising", "rises"), ("floating up", "floats up"),
               ("drifting upward", "drifts upward")],
        "down": [("moving down", "moves down"), ("falling", "falls"), ("dropping", "drops"),
                 ("sinking", "sinks")],
    },
    "background": {
        "sky": ["in the blue sky", "against a daytime sky", "in a clear blue sky", "across the sky"],
        "night": ["at night", "under the night sky", "in the dark night sky", "against a dark night"],
        "grass": ["over green grass", "on a lawn", "above the green grass", "on the grass"],
    },
}

_HELDOUT_WORDS: dict[str, dict[str, list]] = {
    "color": {
        "red": ["crimson"],
        "yellow": ["golden"],
        "white": ["ivory"],
        "purple": ["violet"],
        "orange": ["tangerine"],
    },
    "shape": {
        "circle": ["sphere", "orb"],
        "square": ["cube", "tile"],
        "triangle": ["pyramid"],
    },
    "direction": {
        "left": [("heading west", "heads west"), ("gliding westward", "glides westward")],
        "right": [("heading east", "heads east"), ("gliding eastward", "glides eastward")],
        "up": [("ascending", "ascends"), ("climbing skyward", "climbs skyward")],
        "down": [("descending", "descends"), ("plunging downward", "plunges downward")],
    },
    "background": {
        "sky": ["in an azure sky", "beneath cloudless heavens"],
        "night": ["under a starry sky", "in the midnight darkness"],
        "grass": ["over a meadow", "across a grassy field"],
    },
}

# {c} colour, {s} shape, {m} participle motion, {v} present-tense motion, {b} background phrase.
_TEMPLATES = (
    "a {c} {s} {m} {b}",
    "{b}, a {c} {s} {v}",
    "a {c} {s} {v} {b}",
    "{b}, there is a {c} {s} {m}",
    "a video of a {c} {s} {m} {b}",
    "the {c} {s} is {m} {b}",
)


def _words(heldout: bool) -> dict[str, dict[str, list]]:
    return _HELDOUT_WORDS if heldout else _TRAIN_WORDS


def _tokens(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _vocab_tokens(words: dict[str, dict[str, list]]) -> set[str]:
    out: set[str] = set()
    for by_value in words.values():
        for alternatives in by_value.values():
            for alt in alternatives:
                for phrase in (alt if isinstance(alt, tuple) else (alt,)):
                    out |= _tokens(phrase)
    return out


_TEMPLATE_TOKENS = set().union(*(_tokens(re.sub(r"\{.\}", " ", t)) for t in _TEMPLATES)) | {"an"}
#: Words that appear only in held-out captions: a training caption never contains any of them.
HELDOUT_MARKERS: frozenset[str] = frozenset(
    _vocab_tokens(_HELDOUT_WORDS) - _vocab_tokens(_TRAIN_WORDS) - _TEMPLATE_TOKENS
)
#: Every word a training caption can contain.
TRAIN_VOCABULARY: frozenset[str] = frozenset(_vocab_tokens(_TRAIN_WORDS) | _TEMPLATE_TOKENS)


def _fix_articles(text: str) -> str:
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", text)


def _compose(template: str, c: str, s: str, motion: tuple[str, str], b: str) -> str:
    return _fix_articles(template.format(c=c, s=s, m=motion[0], v=motion[1], b=b))


def caption_for(spec: ClipSpec, rng: random.Random, heldout: bool = False) -> str:
    """A random English caption for ``spec``, in the training (default) or the held-out wording."""
    w = _words(heldout)
    return _compose(
        rng.choice(_TEMPLATES),
        rng.choice(w["color"][spec.color]),
        rng.choice(w["shape"][spec.shape]),
        rng.choice(w["direction"][spec.direction]),
        rng.choice(w["background"][spec.background]),
    )


def all_captions(spec: ClipSpec, heldout: bool = False) -> list[str]:
    """Every caption :func:`caption_for` can produce for ``spec``."""
    w = _words(heldout)
    return [
        _compose(t, c, s, m, b)
        for t, c, s, m, b in itertools.product(
            _TEMPLATES,
            w["color"][spec.color],
            w["shape"][spec.shape],
            w["direction"][spec.direction],
            w["background"][spec.background],
        )
    ]


# --------------------------------------------------------------------------- datasets


def _clip_rng(seed: int, index: int) -> random.Random:
    return random.Random(seed * 1_000_003 + index)


def dataset_plan(n: int, seed: int = 0) -> list[ClipSpec]:
    """The specs of a dataset of ``n`` clips: a shuffled list of all 180 combinations, cycled."""
    rng = random.Random(seed)
    specs: list[ClipSpec] = []
    while len(specs) < n:
        cycle = all_specs()
        rng.shuffle(cycle)
        specs.extend(cycle)
    return specs[:n]


def make_dataset(
    out_dir: str | os.PathLike,
    n: int,
    seed: int = 0,
    frames: int = DEFAULT_FRAMES,
    size: int = DEFAULT_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``n`` clips (clip_00000.mp4 + clip_00000.txt ...) and metadata.jsonl into ``out_dir``.

    Deterministic for a seed and balanced over the 180 combinations.  Refuses to write into a
    directory that already holds clips or a metadata.jsonl.
    """
    if n < 1:
        raise UsageError(f"the number of clips must be at least 1 (got {n})")
    from soragen.io.video import write_video  # lazy: keeps this module importable without video deps

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SoragenError(f"{out} exists and is not a directory")
    if out.is_dir():
        clashes = [p.name for p in out.iterdir() if p.name.startswith("clip_") or p.name == "metadata.jsonl"]
        if clashes:
            raise SoragenError(
                f"{out} already holds a dataset ({len(clashes)} files such as {sorted(clashes)[0]}); "
                "choose an empty or new directory"
            )
    out.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    rows: list[str] = []
    for i, spec in enumerate(dataset_plan(n, seed)):
        rng = _clip_rng(seed, i)
        clip = render_clip(spec, rng, frames=frames, size=size)
        text = caption_for(spec, rng)
        name = f"clip_{i:05d}.mp4"
        path = out / name
        write_video(path, clip, FPS)
        (out / f"clip_{i:05d}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append(json.dumps({"file_name": name, "text": text, **spec.as_dict()}))
        paths.append(path)
        if progress is not None:
            progress(i + 1, n)
    from soragen.core.atomic import atomic_path
    with atomic_path(out / "metadata.jsonl") as tmp:
        tmp.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return paths


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
    return _shape_mask(shape, x, y, s, subpixels).reshape(h, n, w, n).mean(axis=(1, 3))


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


def judge_video(frames: np.ndarray) -> Judgement:
    """Read background, colour, shape and direction back from a (T, H, W, 3) clip's pixels."""
    f = np.asarray(frames)
    if f.ndim != 4 or f.shape[-1] != 3 or f.shape[0] < 1:
        raise UsageError(f"judge_video needs a (T, H, W, 3) array, got shape {f.shape}")
    f = f.astype(np.float32)
    t_count, h, w, _ = f.shape
    # The object covers at most ~30% of any row, so each row's median is its background colour.
    bg_rows = np.median(f, axis=2)  # (T, H, 3)
    background = _classify_background(np.median(bg_rows, axis=0))
    bg = bg_rows[:, :, None, :]
    diff = f - bg
    dist = np.sqrt(np.sum(diff * diff, axis=-1))  # (T, H, W)

    expected = min(h, w) / 4.0
    min_area, max_area = 0.2 * expected * expected, 4.0 * expected * expected

    # Pass 1: rough masks (far from the background), largest component per frame -> object colour.
    rough = [_largest_component(dist[t] > 40.0) for t in range(t_count)]
    good = [t for t in range(t_count) if min_area <= rough[t].sum() <= max_area]
    if not good:
        return Judgement(background, None, None, None, 0.0)
    # The colour comes from each mask's core (the pixels farthest from the background), so that
    # edges blended with the background (blur, compression) do not drag it toward another colour.
    cores = []
    for t in good:
        d = dist[t][rough[t]]
        cores.append(f[t][rough[t]][d >= np.percentile(d, 60)])
    pixels = np.concatenate(cores)
    obj = np.median(pixels, axis=0)
    color = _PALETTE_NAMES[int(np.argmin(np.sum((_PALETTE - obj) ** 2, axis=1)))]

    # Pass 2: a pixel is object when it is nearer the object colour than its row's background
    # (the midpoint rule gives the right area even on blurred or compressed edges).
    axis = obj[None, None, None, :] - bg  # (T, H, 1, 3)
    norm2 = np.maximum(np.sum(axis * axis, axis=-1), 1.0)
    proj = np.sum(diff * axis, axis=-1) / norm2
    fine = (proj > 0.5) & (dist > 20.0)
    alpha_all = np.clip(proj, 0.0, 1.0)

    tracks = []
    errors = dict.fromkeys(_SHAPE_AREA, 0.0)
    for t in range(t_count):
        m = _largest_component(fine[t])
        area = int(m.sum())
        if not (min_area <= area <= max_area):
            continue
        ys, xs = np.nonzero(m)
        tracks.append((t, float(xs.mean()) + 0.5, float(ys.mean()) + 0.5))
        for shape, err in _shape_errors(alpha_all[t], _dilate(m, 4)).items():
            errors[shape] += err
    presence = len(tracks) / t_count
    if not tracks:
        return Judgement(background, color, None, None, presence)

    shape = min(errors, key=errors.get)

    direction = None
    if len(tracks) >= 2:
        tr = np.array(tracks, float)
        ts = tr[:, 0] - tr[:, 0].mean()
        denom = float(np.sum(ts * ts))
        span = t_count - 1
        dx = float(np.sum(ts * (tr[:, 1] - tr[:, 1].mean())) / denom) * span
        dy = float(np.sum(ts * (tr[:, 2] - tr[:, 2].mean())) / denom) * span
        if max(abs(dx), abs(dy)) >= 0.1 * min(h, w):
            if abs(dx) >= abs(dy):
                direction = "right" if dx > 0 else "left"
            else:
                direction = "down" if dy > 0 else "up"  # image y grows downward
    return Judgement(background, color, shape, direction, presence)


# --------------------------------------------------------------------------- prompt sets & scoring


# (size, seed, held-out wording) of the packaged prompt sets; build_prompt_set regenerates them.
_PROMPT_SET_RECIPES = {"eval": (60, 1234, False), "heldout": (30, 4321, True)}
#: The four fixed prompts of prompts/samples.txt, with the clip each one describes.
SAMPLE_PROMPTS: tuple[tuple[str, ClipSpec], ...] = (
    ("a red ball moving right in the blue sky", ClipSpec("sky", "red", "circle", "right")),
    ("a white box rising at night", ClipSpec("night", "white", "square", "up")),
    ("a yellow triangle falling over green grass", ClipSpec("grass", "yellow", "triangle", "down")),
    ("an orange square sliding to the left against a daytime sky", ClipSpec("sky", "orange", "square", "left")),
)


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


def load_sample_prompts() -> list[str]:
    """The fixed prompts used for sample videos during training."""
    text = resources.files("soragen").joinpath("prompts", "samples.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


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
