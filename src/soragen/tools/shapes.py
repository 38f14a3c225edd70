"""The "shapes" world: a tiny synthetic text-to-video domain.

Every clip shows one filled object (circle, square or triangle) in one of five
colours, moving in a straight line at constant speed over one of three
backgrounds.  This module

* renders clips (:func:`render_clip`) and captions them (:func:`caption_for`),
* writes training sets to disk (:func:`make_dataset`),
* holds the fixed prompts of the sample videos made during training (:func:`load_sample_prompts`).

The pixel judge that reads the attributes back, and the prompt sets it is scored on, are
:mod:`soragen.tools.judge`.

Captions come from two disjoint vocabularies: the *training* wordings, and a
*held-out* set of wordings (``crimson``, ``sphere``, ``heading east``,
``meadow``, ``starry`` ...) that training captions never use, so that a model's
generalisation to new phrasings can be measured.

No torch here: numpy and the standard library only.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

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


def shape_mask(shape: str, x: float, y: float, s: float, centres: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
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
        img[shape_mask(spec.shape, x, y, s, centres)] = colour
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


# --------------------------------------------------------------------------- sample prompts


#: The four fixed prompts of prompts/samples.txt, with the clip each one describes.
SAMPLE_PROMPTS: tuple[tuple[str, ClipSpec], ...] = (
    ("a red ball moving right in the blue sky", ClipSpec("sky", "red", "circle", "right")),
    ("a white box rising at night", ClipSpec("night", "white", "square", "up")),
    ("a yellow triangle falling over green grass", ClipSpec("grass", "yellow", "triangle", "down")),
    ("an orange square sliding to the left against a daytime sky", ClipSpec("sky", "orange", "square", "left")),
)


def load_sample_prompts() -> list[str]:
    """The fixed prompts used for sample videos during training."""
    text = resources.files("soragen").joinpath("prompts", "samples.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
