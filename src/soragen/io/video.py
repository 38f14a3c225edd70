"""Reading, probing and writing short RGB video clips.

Reading checks the file, decodes it with one of the backends of
:mod:`soragen.io.video_decode` (PyAV for video containers, imageio's ffmpeg when
PyAV is not installed, Pillow for GIFs) and checks the frames it gets.  Writing
.mp4 always goes through imageio-ffmpeg (libx264).  GIFs and PNG folders go
through Pillow.  Every failure that is about the user's file becomes a
one-line :class:`VideoError` (reading) or :class:`SoragenError` (writing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from soragen.core.atomic import atomic_path
from soragen.core.errors import SoragenError, UsageError
from soragen.io.video_decode import DECODE_ERRORS, DEFAULT_FPS, Frame, VideoError, failure_reason, import_av

# The backends, bound in this module under the names _open_frames calls, so that replacing one
# here (as tests/test_video_io.py does to see which backend read a file) takes effect.
from soragen.io.video_decode import iter_gif as _iter_gif
from soragen.io.video_decode import iter_imageio as _iter_imageio
from soragen.io.video_decode import iter_pyav as _iter_pyav

# Larger frames are refused on reading: one 16k x 16k RGB frame alone is 768 MB.
MAX_PIXELS = 8192 * 8192

__all__ = [
    "VIDEO_SUFFIXES",
    "VideoError",
    "VideoInfo",
    "WriteResult",
    "check_output",
    "probe_video",
    "read_video",
    "write_video",
]

VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif"})

_WRITE_SUFFIXES = (".mp4", ".gif")
_MP4_CRF = "18"
_PNG_PATTERN = "frame_{:05d}.png"


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int
    height: int
    width: int
    fps: float


@dataclass(frozen=True)
class WriteResult:
    path: Path
    note: str | None


# --------------------------------------------------------------------------
# reading


def _check_input_path(path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file") from None
    except OSError as err:
        raise VideoError(f"{path}: cannot access: {err.strerror or err}") from None
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file")
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        allowed = ", ".join(sorted(VIDEO_SUFFIXES))
        raise VideoError(
            f"{path}: not a video file (suffix {suffix or 'missing'!r}; expected one of {allowed})"
        )
    if st.st_size == 0:
        raise VideoError(f"{path}: file is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: cannot read: Permission denied")


@dataclass
class _Decoded:
    """What a decode has read so far: the frames kept, how many frames, and their (height, width)."""

    frames: list[np.ndarray] = field(default_factory=list)
    count: int = 0
    shape: tuple[int, int] | None = None


def _open_frames(path: Path, is_gif: bool, av, keep: bool) -> tuple[Iterator[Frame], float, Callable[[], None] | None]:
    """The frames, fps and closer (None when there is nothing to close) of the backend for ``path``."""
    if is_gif:
        it, fps = _iter_gif(path)
        return it, fps, None
    if av is not None:
        return _iter_pyav(av, path, keep)
    return _iter_imageio(path)


def _check_frame_size(path: Path, got: _Decoded, h: int, w: int) -> None:
    """The first frame sets the clip's size (within MAX_PIXELS); every other frame must match it."""
    if got.shape is None:
        got.shape = (h, w)
        if h * w > MAX_PIXELS:
            raise VideoError(f"{path}: frames of {w}x{h} are too large for soragen "
                             f"(at most {MAX_PIXELS // 10**6} megapixels)")
    elif (h, w) != got.shape:
        raise VideoError(
            f"{path}: frame {got.count} is {w}x{h}, expected {got.shape[1]}x{got.shape[0]}"
        )


def _take_frames(path: Path, it: Iterator[Frame], got: _Decoded, max_frames: int | None, keep: bool) -> None:
    """Read frames from ``it`` into ``got``, up to ``max_frames``; close ``it`` either way."""
    try:
        for h, w, frame in it:
            _check_frame_size(path, got, h, w)
            got.count += 1
            if keep:
                got.frames.append(frame)
            if max_frames is not None and got.count >= max_frames:
                break
    finally:
        it.close()


def _decode(path, max_frames: int | None, keep: bool):
    """Decode up to ``max_frames`` frames; return (frames list or None, count, shape, fps)."""
    path = Path(path)
    _check_input_path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    is_gif = path.suffix.lower() == ".gif"
    av = None if is_gif else import_av()
    errors = DECODE_ERRORS if av is None else DECODE_ERRORS + (av.error.FFmpegError,)
    got = _Decoded()
    close: Callable[[], None] | None = None
    try:
        it, fps, close = _open_frames(path, is_gif, av, keep)
        _take_frames(path, it, got, max_frames, keep)
    except VideoError:
        raise
    except MemoryError:
        raise VideoError(f"{path}: out of memory while decoding ({got.count} frames read)") from None
    except errors as err:
        reason = failure_reason(path, err, is_gif, av)
        if got.count:
            reason += f" after {got.count} frames"
        raise VideoError(f"{path}: {reason}") from None
    finally:
        if close is not None:
            try:
                close()
            except errors:
                pass
    if got.count == 0 or got.shape is None:
        raise VideoError(f"{path}: no video frames could be decoded")
    if not (fps > 0 and math.isfinite(fps)):
        fps = DEFAULT_FPS
    return (got.frames if keep else None), got.count, got.shape, fps


def probe_video(path) -> VideoInfo:
    """Return frame count (counted by decoding), size and fps of a video; raise VideoError."""
    _, count, (h, w), fps = _decode(path, None, keep=False)
    return VideoInfo(path=Path(path), frames=count, height=int(h), width=int(w), fps=float(fps))


def read_video(path, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Read frames as (T, H, W, 3) uint8 RGB plus fps; raise VideoError on bad input.

    If the file is damaged part-way, the frames that decode are returned (PyAV
    skips packets that fail to decode, as the ffmpeg command line does).
    Frames are turned upright by the stream's display rotation (multiples of
    90 degrees), matching ffmpeg's autorotate.
    """
    frames, _, _, fps = _decode(path, max_frames, keep=True)
    return np.stack(frames), float(fps)


# --------------------------------------------------------------------------
# writing


def _validate_frames(frames) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    t, h, w, _ = frames.shape
    if t < 1 or h < 1 or w < 1:
        raise ValueError(f"frames must have T, H, W >= 1, got {frames.shape}")
    return np.ascontiguousarray(frames)


def _write_error(path: Path, err: BaseException) -> SoragenError:
    if isinstance(err, OSError) and err.strerror:
        return SoragenError(f"cannot write to {path}: {err.strerror}")
    first = str(err).strip().splitlines()
    return SoragenError(f"cannot write to {path}: {first[0] if first else type(err).__name__}")


def _write_mp4(tmp: Path, frames: np.ndarray, fps: float) -> str | None:
    import imageio.v3 as iio

    note = None
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        note = (
            f"padded {w}x{h} to {w + pw}x{h + ph} with edge pixels: "
            "H.264 yuv420p needs even sizes"
        )
    iio.imwrite(
        tmp,
        frames,
        plugin="FFMPEG",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        quality=None,
        output_params=["-crf", _MP4_CRF],
        ffmpeg_log_level="error",
    )
    return note


def _write_gif(tmp: Path, frames: np.ndarray, fps: float) -> str | None:
    notes = []
    # GIF delays are whole centiseconds; most viewers treat < 2 cs as 10 cs.
    cs = max(2, round(100.0 / fps))
    stored_fps = 100.0 / cs
    if abs(stored_fps - fps) > 1e-6 * fps:
        notes.append(
            f"GIF frame delays are whole 1/100 s, so {fps:g} fps is stored as {stored_fps:g} fps"
        )
    images = [Image.fromarray(f, mode="RGB") for f in frames]
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=cs * 10,
        loop=0,
        disposal=1,
    )
    with Image.open(tmp) as check:
        stored = getattr(check, "n_frames", 1)
    if stored != len(frames):
        notes.append(
            f"GIF merged identical consecutive frames: {len(frames)} frames stored as {stored} "
            "(timing kept)"
        )
    return "; ".join(notes) or None


def _write_png_dir(tmp: Path, frames: np.ndarray) -> None:
    tmp.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray(f, mode="RGB").save(tmp / _PNG_PATTERN.format(i), format="PNG")


def _check_replaceable_dir(path: Path) -> None:
    """Refuse to replace a directory that holds anything but our own frame PNGs."""
    for entry in path.iterdir():
        name = entry.name
        if not (name.startswith("frame_") and name.endswith(".png") and entry.is_file()):
            raise SoragenError(
                f"refusing to replace {path}: it contains {name!r}, not only frame_*.png files"
            )


def check_output(path: Path) -> bool:
    """Whether `path` may be written as a video (True: as a folder of PNGs), before the work that
    makes the frames: a known suffix, and no folder of the user's own to replace."""
    path = Path(path)
    suffix = path.suffix.lower()
    as_dir = path.is_dir() or suffix == ""
    if not as_dir and suffix not in _WRITE_SUFFIXES:
        raise UsageError(
            f"cannot write {path}: unsupported suffix {path.suffix!r}; "
            "use .mp4, .gif, or a name without a suffix for a folder of PNGs"
        )
    if as_dir and path.exists():
        if not path.is_dir():
            raise SoragenError(f"cannot write PNG frames to {path}: it exists and is not a directory")
        _check_replaceable_dir(path)
    return as_dir


def write_video(path, frames: np.ndarray, fps: float) -> WriteResult:
    """Write frames (T, H, W, 3) uint8 as .mp4 (H.264), .gif, or a folder of PNGs.

    The output appears atomically: it is written under a temporary name in the
    same directory and moved into place only when complete.
    """
    path = Path(path)
    frames = _validate_frames(frames)
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number, got {fps!r}") from None
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive finite number, got {fps}")

    as_dir = check_output(path)
    suffix = path.suffix.lower()

    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SoragenError(
            f"cannot write to {path}: cannot create {parent}: {err.strerror or err}"
        ) from None

    note: str | None = None
    try:
        with atomic_path(path, "" if as_dir else path.suffix) as tmp:
            if as_dir:
                _write_png_dir(tmp, frames)
            else:
                # Create the file from Python first so permission problems give a
                # clean OSError instead of an ffmpeg log.
                with open(tmp, "wb"):
                    pass
                note = _write_mp4(tmp, frames, fps) if suffix == ".mp4" else _write_gif(tmp, frames, fps)
    except Exception as err:
        if isinstance(err, SoragenError):
            raise
        if isinstance(err, (OSError, RuntimeError, ValueError)):
            raise _write_error(path, err) from None
        raise
    return WriteResult(path=path, note=note)
