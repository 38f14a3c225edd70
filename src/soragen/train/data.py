"""Finding, checking and loading the training clips of `soragen train --data DIR`.

A data folder holds video files anywhere below it (hidden files and folders are
ignored) and, optionally, captions in the Hugging Face video-folder layout, which
:mod:`soragen.train.captions` reads.

Everything here is numpy + pillow; nothing imports torch.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from soragen.core.errors import SoragenError, UsageError
from soragen.io.video import VIDEO_SUFFIXES, VideoError, VideoInfo, probe_video, read_video
from soragen.train.captions import captions_for

__all__ = [
    "Clip",
    "ResizePlan",
    "ScanReport",
    "describe_resize",
    "file_hash",
    "find_videos",
    "frames_needed",
    "load_clip",
    "plan_resize",
    "read_captions",
    "require_clips",
    "resize_and_crop",
    "sample_frame_indices",
    "scan_clips",
]

_HASH_CHUNK = 1 << 20


def _round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's round() rounds halves to even)."""
    return int(math.floor(x + 0.5 + 1e-9))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Clip:
    path: Path
    caption: str  # "" when the clip has no caption
    info: VideoInfo


@dataclass
class ScanReport:
    clips: list[Clip] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, one-line reason)
    uncaptioned: int = 0

    def skip_counts(self) -> Counter:
        """How many files were skipped per kind: "too short" or "unreadable"."""
        return Counter(_skip_kind(reason) for _, reason in self.skipped)

    def summary(self) -> str:
        """One line, e.g. "used 12 clips, skipped 3 (2 unreadable, 1 too short)"."""
        if not self.clips and not self.skipped:
            suffixes = ", ".join(sorted(VIDEO_SUFFIXES))
            return f"found no video file ({suffixes})"
        text = f"used {_plural(len(self.clips), 'clip')}"
        if self.uncaptioned:
            text += f" ({self.uncaptioned} without caption)"
        if self.skipped:
            counts = self.skip_counts()
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
            text += f", skipped {len(self.skipped)} ({kinds})"
        return text

    def skipped_details(self, limit: int | None = 10) -> list[str]:
        """One "file: reason" line per skipped file, at most `limit` plus a "... and N more" line."""
        shown = self.skipped if limit is None else self.skipped[:limit]
        lines = [f"{path}: {reason}" for path, reason in shown]
        if len(shown) < len(self.skipped):
            lines.append(f"... and {len(self.skipped) - len(shown)} more")
        return lines


def _skip_kind(reason: str) -> str:
    return "too short" if reason.startswith("too short") else "unreadable"


# --------------------------------------------------------------------------- finding files


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def find_videos(root: Path) -> list[Path]:
    """Every file with a video suffix (any case) anywhere below `root`, sorted.

    Hidden files and folders (name starting with ".") below `root` are skipped;
    symlinked folders are not followed.
    """
    root = Path(root)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if _is_hidden(name):
                continue
            if os.path.splitext(name)[1].lower() in VIDEO_SUFFIXES:
                path = Path(dirpath) / name
                if path.is_file():
                    found.append(path)
    return sorted(found)


# --------------------------------------------------------------------------- captions


def read_captions(root: Path) -> dict[Path, str]:
    """Captions keyed by clip path (``root / file_name``, as find_videos spells it).

    Reads ``metadata.csv`` and ``metadata.jsonl`` at the root (jsonl wins if both),
    then a non-empty ``.txt`` beside each clip, which wins over the metadata.
    Whitespace runs (including newlines) collapse to single spaces.
    Raises SoragenError naming the file and line for malformed metadata.
    """
    root = Path(root)
    return captions_for(root, find_videos(root))


# --------------------------------------------------------------------------- frame sampling


def _step(source_fps: float, target_fps: float) -> float:
    if target_fps <= 0:
        raise UsageError(f"the target frame rate must be positive, got {target_fps}")
    if source_fps <= 0 or not math.isfinite(source_fps):  # unknown rate: take frames one by one
        return 1.0
    return source_fps / target_fps


def frames_needed(num_frames: int, target_fps: float, source_fps: float) -> int:
    """Source frames a clip must have to give `num_frames` frames at `target_fps`."""
    if num_frames < 1:
        raise UsageError(f"the number of frames must be at least 1, got {num_frames}")
    return _round_half_up((num_frames - 1) * _step(source_fps, target_fps)) + 1


def sample_frame_indices(
    source_frames: int,
    source_fps: float,
    num_frames: int,
    target_fps: float,
    rng: random.Random,
) -> list[int]:
    """`num_frames` source frame indices at `target_fps`, from a random start.

    index_k = round(start + k * source_fps / target_fps), with an integer `start`
    drawn from `rng` so that the whole window fits in the clip. A source slower
    than the target repeats frames. A clip too short for the window (which
    scan_clips filters out) gives start 0 and indices clamped to the last frame.
    """
    if source_frames < 1:
        raise ValueError(f"a clip with {source_frames} frames has nothing to sample")
    step = _step(source_fps, target_fps)
    needed = frames_needed(num_frames, target_fps, source_fps)
    start = rng.randint(0, source_frames - needed) if source_frames >= needed else 0
    last = source_frames - 1
    return [min(_round_half_up(start + k * step), last) for k in range(num_frames)]


# --------------------------------------------------------------------------- resizing


@dataclass(frozen=True)
class ResizePlan:
    """Resize (src_w x src_h) -> (resized_w x resized_h), then crop at (top, left) to height x width."""

    src_h: int
    src_w: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    height: int
    width: int

    @property
    def resizes(self) -> bool:
        return (self.resized_h, self.resized_w) != (self.src_h, self.src_w)

    @property
    def crops(self) -> bool:
        return (self.resized_h, self.resized_w) != (self.height, self.width)

    @property
    def shrinks(self) -> bool:
        return self.resized_h * self.resized_w < self.src_h * self.src_w


def plan_resize(src_h: int, src_w: int, height: int, width: int) -> ResizePlan:
    """Pure: the scale that makes the frame cover height x width (aspect kept) and the centre crop."""
    if min(src_h, src_w) < 1:
        raise ValueError(f"cannot resize an empty {src_w}x{src_h} frame")
    if min(height, width) < 1:
        raise UsageError(f"the output size must be positive, got {width}x{height}")
    scale = max(height / src_h, width / src_w)
    new_h = max(height, _round_half_up(src_h * scale))
    new_w = max(width, _round_half_up(src_w * scale))
    return ResizePlan(
        src_h=src_h,
        src_w=src_w,
        resized_h=new_h,
        resized_w=new_w,
        top=(new_h - height) // 2,
        left=(new_w - width) // 2,
        height=height,
        width=width,
    )


def describe_resize(src_h: int, src_w: int, height: int, width: int) -> str:
    """One line, sizes as WxH, e.g. "resized 1280x720 -> 114x64, centre-cropped to 64x64"."""
    p = plan_resize(src_h, src_w, height, width)
    src, out = f"{src_w}x{src_h}", f"{width}x{height}"
    if not p.resizes and not p.crops:
        return f"kept {src} as is"
    if not p.resizes:
        return f"centre-cropped {src} to {out}"
    text = f"resized {src} -> {p.resized_w}x{p.resized_h}"
    if p.crops:
        text += f", centre-cropped to {out}"
    return text


def resize_and_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T,H,W,3) uint8 -> (T,height,width,3) uint8: cover-resize keeping aspect, then centre crop.

    Shrinking uses Lanczos (after a box pre-reduction for big factors), enlarging bicubic.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped (T,H,W,3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    t, src_h, src_w, _ = frames.shape
    p = plan_resize(src_h, src_w, height, width)
    if p.resizes:
        size = (p.resized_w, p.resized_h)
        if p.shrinks:
            kwargs = {"resample": Image.Resampling.LANCZOS, "reducing_gap": 3.0}
        else:
            kwargs = {"resample": Image.Resampling.BICUBIC}
        out = np.empty((t, height, width, 3), dtype=np.uint8)
        box = (p.left, p.top, p.left + width, p.top + height)
        for i in range(t):
            img = Image.fromarray(np.ascontiguousarray(frames[i]), mode="RGB")
            out[i] = np.asarray(img.resize(size, **kwargs).crop(box))
        return out
    cropped = frames[:, p.top : p.top + height, p.left : p.left + width]
    return np.ascontiguousarray(cropped)


# --------------------------------------------------------------------------- scanning and loading


def _one_line(message: object) -> str:
    text = str(message).strip()
    return text.splitlines()[0].strip() if text else ""


def _strip_path(reason: str, path: Path) -> str:
    """"/x/a.mp4: truncated" -> "truncated": the report already names the file."""
    prefix = f"{path}:"
    return reason[len(prefix):].strip() if reason.startswith(prefix) else reason


def _looks_like_text(path: Path) -> bool:
    """True when the file's first KiB is printable UTF-8 text (a caption or note renamed .mp4)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1024)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # a multi-byte character cut at the end is still text
            return False
        text = head[: e.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\r\n\f" for ch in text)


def _check_clip(path: Path, num_frames: int, target_fps: float) -> VideoInfo | str:
    """The clip's VideoInfo, or the one-line reason to skip it."""
    try:
        if path.stat().st_size == 0:
            return "zero-byte file"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    try:
        info = probe_video(path)
    except VideoError as e:
        if _looks_like_text(path):
            return "not a video (a text file)"
        return _strip_path(_one_line(e), path) or "unreadable"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except Exception as e:  # a decoder choking on a strange file must not stop the scan
        return f"unreadable ({type(e).__name__}: {_one_line(e)})"
    if info.frames < 1 or info.height < 1 or info.width < 1:
        return "no video frames"
    needed = frames_needed(num_frames, target_fps, info.fps)
    if info.frames < needed:
        return f"too short: {info.frames} frames at {info.fps:g} fps, needs {needed}"
    return info


def scan_clips(
    root,
    num_frames: int,
    target_fps: float,
    progress: Callable[[int, int], None] | None = None,
) -> ScanReport:
    """Probe every clip below `root` once; keep the usable ones, skip the others with a reason.

    `progress(done, total)` is called after each file. Raises UsageError if `root`
    is missing or not a folder; zero usable clips is not an error here (see require_clips).
    """
    root = Path(root)
    if not root.exists():
        raise UsageError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise UsageError(f"data folder {root} is not a folder")
    frames_needed(num_frames, target_fps, target_fps)  # validates num_frames and target_fps

    videos = find_videos(root)
    captions = captions_for(root, videos)
    report = ScanReport()
    for i, path in enumerate(videos):
        result = _check_clip(path, num_frames, target_fps)
        if isinstance(result, str):
            report.skipped.append((path, result))
        else:
            caption = captions.get(path, "")
            if not caption:
                report.uncaptioned += 1
            report.clips.append(Clip(path=path, caption=caption, info=result))
        if progress is not None:
            progress(i + 1, len(videos))
    return report


def require_clips(report: ScanReport, root) -> None:
    """SoragenError("no usable clip in DIR: <summary>") when the scan kept nothing."""
    if not report.clips:
        raise SoragenError(f"no usable clip in {root}: {report.summary()}")


def load_clip(
    clip: Clip,
    num_frames: int,
    target_fps: float,
    height: int,
    width: int,
    rng: random.Random,
) -> np.ndarray:
    """(num_frames, height, width, 3) uint8: a random window at `target_fps`, resized and centre-cropped.

    Decodes only up to the last frame it needs. If the file turns out shorter than
    its probe said, it samples again within the frames it got.
    """
    info = clip.info
    indices = sample_frame_indices(info.frames, info.fps, num_frames, target_fps, rng)
    frames, _ = read_video(clip.path, max_frames=max(indices) + 1)
    got = len(frames)
    if got == 0:
        raise VideoError(f"{clip.path}: no frame could be decoded")
    if got <= max(indices):
        indices = sample_frame_indices(got, info.fps, num_frames, target_fps, rng)
    return resize_and_crop(np.asarray(frames)[indices], height, width)


def file_hash(path: Path) -> str:
    """sha256 of the file's content, as hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as e:
        raise SoragenError(f"cannot read {path}: {e.strerror or e}") from None
    return digest.hexdigest()
