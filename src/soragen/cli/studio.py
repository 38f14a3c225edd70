"""What `soragen serve` does with a request, apart from the web page: the settings checked as
`soragen generate` checks its options (the same one-line messages), the video made with a loaded
pipeline (one at a time, cancellable between steps, LoRA weights set per request), and the history
of what this server made, kept in its output folder:

    OUT/videos/*.mp4          the videos, written whole (soragen.core.atomic) under names of our own
    OUT/history.jsonl         one line of settings per video, appended when its file is complete

Nothing here knows Gradio (soragen.cli.page lays out the page); nothing a request carries names a
path: an image comes as bytes and is decoded in memory under `--image`'s limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from soragen.cli.app import check_overrides, check_text
from soragen.cli.generate import _check_choices, _slug, _video_size
from soragen.core.config import MAX_SEED
from soragen.core.errors import SoragenError, UsageError

RANDOM_SEEDS = 2**32  # a random seed below this shows exactly in a browser (a JS number holds 53 bits)
HISTORY = "history.jsonl"
VIDEOS = "videos"
STAGES = {"encode": "encoding the prompt", "denoise": "denoising", "decode": "decoding", "write": "writing the MP4"}


class Cancelled(SoragenError):
    """The run was cancelled between two steps."""


@dataclass
class Request:
    """What the page's form sends: None is the model's default (as an option left out on the CLI)."""

    prompt: str = ""
    negative_prompt: Optional[str] = None
    frames: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    sampler: Optional[str] = None
    seed: Optional[int] = None  # None: a random one, reported back
    lora_weights: list[float] = field(default_factory=list)
    image: Optional[bytes] = None
    last_image: Optional[bytes] = None  # a first-last-frame model's


@dataclass
class Lora:
    file: Path
    weight: float
    expert: str = "both"


def _whole(value, name: str) -> Optional[int]:
    """A form's number as the int the CLI's option would take; 8.0 is 8, 8.5 is refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UsageError(f"--{name} must be a whole number, not {value!r}")
    return int(value)


class Studio:
    """A loaded pipeline that makes one video at a time for the page, into `out`."""

    def __init__(self, pipe, out: Path, loras: list[Lora] = ()):
        self.pipe, self.out, self.loras = pipe, Path(out), list(loras)
        self.videos = self.out / VIDEOS
        self.videos.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.base = None  # the DiTs' weights before any LoRA, where there are LoRAs to reweigh
        if self.loras:
            self.base = [{k: v.detach().to("cpu", copy=True) for k, v in dit.state_dict().items()}
                         for dit in pipe.model.experts]
            self.merged = None
            self._merge([lora.weight for lora in self.loras])

    # ---- the form's defaults ---------------------------------------------------------------------
    def defaults(self) -> dict:
        """The model's own settings, as the form shows them at first."""
        video, sampling = self.pipe.model.video, self.pipe.model.sampling
        return {"negative_prompt": sampling.negative_prompt, "frames": video.frames, "height": video.height,
                "width": video.width, "steps": sampling.steps, "guidance": sampling.guidance,
                "sampler": sampling.sampler, "lora_weights": [lora.weight for lora in self.loras]}

    @property
    def takes_image(self) -> bool:
        return self.pipe.model.image_inputs > 0

    # ---- checks --------------------------------------------------------------------------------
    def check(self, req: Request):
        """(sampling settings, (frames, height, width), seed, image): the request checked as
        `soragen generate` checks its options, with its messages; UsageError otherwise."""
        if isinstance(req.guidance, float) and not math.isfinite(req.guidance):  # as the CLI's `command` says it
            raise UsageError(f"--guidance must be a finite number, not {req.guidance}")
        if not isinstance(req.prompt, str):
            raise UsageError("PROMPT must be text")
        check_text(req.prompt, "PROMPT")
        numbers = {name: _whole(getattr(req, name), name) for name in ("frames", "height", "width", "steps")}
        check_overrides(sampler=req.sampler, steps=numbers["steps"], guidance=req.guidance, frames=numbers["frames"])
        _check_choices(negative_prompt=req.negative_prompt)
        seed = _whole(req.seed, "seed")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise UsageError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
        if len(req.lora_weights) != len(self.loras):
            raise UsageError(f"this server has {len(self.loras)} LoRA(s); the request weighs {len(req.lora_weights)}")
        for lora, weight in zip(self.loras, req.lora_weights):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -100 <= weight <= 100:
                raise UsageError(f"--lora {lora.file.name}: the weight must be a number between -100 and 100, "
                                 f"not {weight!r}")
        settings = self.pipe.sampling(sampler=req.sampler, steps=numbers["steps"], guidance=req.guidance,
                                      negative_prompt=req.negative_prompt)
        image, last = self._image(req.image), self._last_image(req.last_image, req.image)
        # no height and width: the model's, or with an image its aspect ratio at the model's area, as generate
        size = _video_size(self.pipe, numbers["frames"], numbers["height"], numbers["width"],
                           [] if image is None else [image])
        return settings, size, seed, {"image": image, "last_image": last}

    def _image(self, data: Optional[bytes]):
        if data is None:
            return None
        if not self.takes_image:
            self._check_count(True, False)
        from soragen.io.image import decode_image
        return decode_image(bytes(data), "--image (the upload)")

    def _check_count(self, image: bool, last_image: bool) -> None:
        """As generate says it (soragen.io.image.check_image_count), before an upload is decoded."""
        from soragen.io.image import check_image_count
        from soragen.io.model_folder import family
        model = self.pipe.model
        check_image_count(image, last_image, model.image_inputs, False, f"{model.path} ({family(model).name})")

    def _last_image(self, data: Optional[bytes], first: Optional[bytes]):
        if data is None:
            return None
        self._check_count(first is not None, True)
        from soragen.io.image import decode_image
        return decode_image(bytes(data), "--last-image (the upload)")

    # ---- making a video --------------------------------------------------------------------------
    def make(self, req: Request, progress: Callable = None, cancelled: Callable[[], bool] = lambda: False) -> dict:
        """Check `req`, make its video and add it to the history; returns the history's entry. One
        run at a time; `cancelled()` is asked between steps (Cancelled raised when it says so)."""
        settings, size, seed, images = self.check(req)
        seed = random.randrange(RANDOM_SEEDS) if seed is None else seed
        report = progress or (lambda *a, **k: None)

        def step(stage, done, total, note=""):
            if cancelled():
                raise Cancelled(f"cancelled while {STAGES.get(stage, stage)} ({done}/{total} done)")
            report(stage, done, total)

        with self.lock:
            if cancelled():
                raise Cancelled("cancelled before it started")
            start = time.perf_counter()
            if self.loras:
                self._merge([float(w) for w in req.lora_weights])
            video = self.pipe.generate(req.prompt, *size, seed=seed, progress=step, **images,
                                       **dataclasses.asdict(settings))
            step("write", 0, 1)  # the last chance to cancel: a video begun to be written is kept
            path = self._write(video, req.prompt)
            report("write", 1, 1)
        entry = {"file": f"{VIDEOS}/{path.name}", "prompt": req.prompt, "negative_prompt": settings.negative_prompt,
                 "frames": size[0], "height": size[1], "width": size[2], "steps": settings.steps,
                 "guidance": settings.guidance, "sampler": settings.sampler, "seed": seed,
                 "lora_weights": [float(w) for w in req.lora_weights], "image": images["image"] is not None,
                 "model": str(self.pipe.model.path), "seconds": round(time.perf_counter() - start, 2),
                 "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(self.out / HISTORY, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        return entry

    def _write(self, video, prompt: str) -> Path:
        """The video as a new MP4 in OUT/videos, under a name no earlier video has."""
        from soragen.io.video import write_video
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(prompt, 32)}"
        path, n = self.videos / f"{stem}.mp4", 1
        while path.exists():
            n += 1
            path = self.videos / f"{stem}-{n}.mp4"
        return write_video(path, video, self.pipe.model.video.fps).path

    def _merge(self, weights: list[float]) -> None:
        """The LoRAs merged at `weights` into the base weights (restored first where they change)."""
        if weights == self.merged:
            return
        from soragen.models import fast_paths
        from soragen.pipeline import merge_lora
        for dit, base in zip(self.pipe.model.experts, self.base):
            dit.load_state_dict(base)  # copies into the parameters in place: device and dtype kept
        self.merged = None
        for lora, weight in zip(self.loras, weights):
            if weight:
                merge_lora(self.pipe.model, lora.file, weight, lora.expert)
        for dit in self.pipe.model.experts:
            fast_paths.install(dit)  # the linears' prepacked weights, packed again from the new ones
        self.merged = list(weights)

    # ---- the history ---------------------------------------------------------------------------
    def history(self, limit: int = 100) -> list[dict]:
        """This folder's videos, newest first, each with its settings and `path`; lines that are
        not JSON objects, or name a file that is gone or not one of ours, are passed over."""
        try:
            lines = (self.out / HISTORY).read_text(encoding="utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in reversed(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            name = entry.get("file") if isinstance(entry, dict) else None
            if not isinstance(name, str) or Path(name).parent != Path(VIDEOS) or Path(name).name in ("", ".", ".."):
                continue
            path = self.videos / Path(name).name
            if path.is_file():
                entries.append({**entry, "path": path})
            if len(entries) == limit:
                break
        return entries


def caption(entry: dict) -> str:
    """One line under a gallery item: the prompt and its settings."""
    return (f"{entry.get('prompt', '')} | {entry.get('frames')} frames {entry.get('width')}x{entry.get('height')}, "
            f"{entry.get('sampler')} {entry.get('steps')} steps, guidance {entry.get('guidance')}, "
            f"seed {entry.get('seed')}")
