"""Decoding video files into RGB frames: the backends behind :mod:`soragen.io.video`'s reading,
and the one-line reasons its errors give.

Video containers (mp4, mov, mkv, avi, webm) are decoded in-process with PyAV
(``import av``, which bundles its own FFmpeg libraries); when PyAV is not
installed, imageio's FFMPEG plugin runs the ffmpeg binary bundled with
imageio-ffmpeg once per file (slower).  GIFs go through Pillow.  Each backend
hands back an iterator of frames, the stream's fps and, where it holds the file
open, a function that closes it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageSequence

from soragen.core.errors import SoragenError

# The frame rate of a file that gives none (a GIF without delays, a stream without a rate).
DEFAULT_FPS = 10.0

# Exceptions imageio / imageio-ffmpeg / Pillow raise for bad input.  ffmpeg
# problems surface as OSError ("Could not load meta information"), a partial
# frame as RuntimeError, odd headers as ValueError/IndexError/KeyError, and
# Pillow uses OSError/EOFError/SyntaxError for damaged images.  When PyAV
# reads the file, the reader adds av.error.FFmpegError (the base of PyAV's errors).
DECODE_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    IndexError,
    KeyError,
    EOFError,
    SyntaxError,
    AssertionError,
    Image.DecompressionBombError,
)

# One decoded frame as the backends hand it on: (height, width, RGB array).
# The array is None when the caller only counts frames (probe_video), which
# lets PyAV skip the colour conversion.
Frame = Tuple[int, int, Optional[np.ndarray]]

# Top-level ISO base media (MP4/MOV) box types; used only to explain why a file
# that looks like an MP4/MOV could not be opened.
_ISO_TOP_BOXES = frozenset(
    {"ftyp", "styp", "moov", "mdat", "free", "skip", "wide", "pnot", "uuid",
     "meta", "moof", "mfra", "sidx", "pdin", "prft", "emsg"}
)


class VideoError(SoragenError):
    """A video file is missing, unreadable, damaged or has no video stream."""


def import_av():
    """Return the PyAV module, or None when it is not installed."""
    try:
        import av  # local: it is optional, and its import is not free
    except ImportError:
        return None
    return av


# --------------------------------------------------------------------------
# GIF (Pillow) and the imageio fallback


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """Return a (H, W, 3) uint8 RGB frame from gray / gray+alpha / RGB / RGBA input."""
    a = np.asarray(frame)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.size and a.max() > 255:
            a = (a.astype(np.float64) / a.max() * 255.0).round()
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"unexpected frame shape {a.shape}")
    channels = a.shape[2]
    if channels in (1, 2):
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif channels >= 3:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def iter_gif(path: Path) -> tuple[Iterator[Frame], float]:
    """Open a GIF; return a frame iterator and its fps (from the frame delays)."""
    img = Image.open(path)
    durations: list[float] = []
    try:
        # Reading the delays walks the whole file once; cheap for GIFs.
        for fr in ImageSequence.Iterator(img):
            d = fr.info.get("duration")
            if isinstance(d, (int, float)) and d > 0:
                durations.append(float(d))
    except Exception:
        img.close()
        raise
    fps = 1000.0 / (sum(durations) / len(durations)) if durations else DEFAULT_FPS

    def frames() -> Iterator[Frame]:
        try:
            for fr in ImageSequence.Iterator(img):
                a = _to_rgb(np.asarray(fr.convert("RGB")))
                yield a.shape[0], a.shape[1], a
        finally:
            img.close()

    return frames(), fps


def iter_imageio(path: Path) -> tuple[Iterator[Frame], float, Callable[[], None]]:
    """Fallback reader: imageio's FFMPEG plugin (one ffmpeg process per file)."""
    import imageio.v3 as iio  # local: importing imageio is not free

    reader = iio.imopen(path, "r", plugin="FFMPEG")
    try:
        meta = reader.metadata()
        fps = float(meta.get("fps") or 0.0)
    except BaseException:
        reader.close()
        raise

    def frames() -> Iterator[Frame]:
        for fr in reader.iter():
            a = _to_rgb(fr)
            yield a.shape[0], a.shape[1], a

    return frames(), fps, reader.close


# --------------------------------------------------------------------------
# PyAV


def _stream_fps(stream) -> float:
    """Frames per second of a PyAV stream: average rate, else FFmpeg's guess, else base rate."""
    for name in ("average_rate", "guessed_rate", "base_rate"):
        rate = getattr(stream, name, None)
        try:
            value = float(rate) if rate is not None else 0.0
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if value > 0 and math.isfinite(value):
            return value
    return 0.0  # the reader substitutes DEFAULT_FPS


def _quarter_turns(rotation) -> int:
    """np.rot90 turns that undo a display rotation, as the ffmpeg CLI's autorotate does.

    Only multiples of 90 degrees are applied (like ffmpeg); anything else is ignored.
    """
    try:
        deg = float(rotation or 0)
    except (TypeError, ValueError):
        return 0
    if not math.isfinite(deg):
        return 0
    k = round(deg / 90.0)
    return k % 4 if abs(deg - 90.0 * k) < 1.0 else 0


def _video_stream(container, path: Path):
    """The container's video stream, one PyAV can decode; VideoError when there is none."""
    stream = container.streams.best("video")  # skips cover art when it can
    if stream is None and container.streams.video:
        stream = container.streams.video[0]
    if stream is None:
        raise VideoError(f"{path}: no video stream (audio-only or empty container)")
    if stream.codec_context is None:
        raise VideoError(f"{path}: no decoder for the video stream's codec")
    return stream


def _pyav_frame(fr, to_rgb, keep: bool) -> Frame:
    """One decoded PyAV frame, turned upright; its pixels only when ``keep``."""
    k = _quarter_turns(getattr(fr, "rotation", 0))  # PyAV >= 14 exposes it
    h, w = (fr.width, fr.height) if k % 2 else (fr.height, fr.width)
    a = None
    if keep:
        a = to_rgb.reformat(fr, format="rgb24").to_ndarray()
        if k:
            a = np.ascontiguousarray(np.rot90(a, k))
    return h, w, a


def _pyav_frames(av, container, stream, keep: bool) -> Iterator[Frame]:
    """The frames of ``stream``, skipping packets that fail to decode; a container that breaks
    off ends the stream.  Raises the last error only when no frame decoded."""
    # One reformatter for the whole clip reuses its swscale context; a bare
    # frame.to_ndarray(format="rgb24") would build a new one per frame.
    to_rgb = av.video.reformatter.VideoReformatter()
    decoded = 0
    failure: BaseException | None = None
    packets = container.demux(stream)
    ended = False
    while not ended:
        try:
            packet = next(packets)
        except StopIteration:
            break
        except av.error.FFmpegError as err:
            if isinstance(err, MemoryError):
                raise
            # The container breaks off here: flush what the decoder still holds.
            failure, packet, ended = err, None, True
        try:
            got = stream.decode(packet)  # packet None flushes the decoder
        except av.error.FFmpegError as err:
            if isinstance(err, MemoryError):
                raise
            failure = err
            continue
        for fr in got:
            frame = _pyav_frame(fr, to_rgb, keep)
            decoded += 1
            yield frame
    if decoded == 0 and failure is not None:
        raise failure


def iter_pyav(av, path: Path, keep: bool) -> tuple[Iterator[Frame], float, Callable[[], None]]:
    """Decode in-process with PyAV.

    Like the ffmpeg command line, a packet that fails to decode is skipped and a
    container that breaks off part-way ends the stream, so a file damaged in the
    middle yields the frames that do decode.  Only when nothing decodes is the
    last error raised.
    """
    container = av.open(str(path), metadata_errors="replace")
    try:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream)
    except BaseException:
        container.close()
        raise
    return _pyav_frames(av, container, stream, keep), fps, container.close


# --------------------------------------------------------------------------
# why a file could not be read


def _ffmpeg_reason(err: BaseException) -> str:
    """Turn an imageio-ffmpeg exception (with ffmpeg's stderr inside) into a short reason."""
    text = str(err)
    lowered = text.lower()
    if "does not contain any stream" in lowered or "matches no streams" in lowered:
        return "no video stream (audio-only or empty container)"
    if "moov atom not found" in lowered:
        return "truncated or not a valid MP4/MOV (moov atom not found)"
    if "invalid data found when processing input" in lowered:
        return "not a recognisable video (ffmpeg: invalid data found when processing input)"
    if "end of file reached before full frame" in lowered:
        return "truncated video (a frame ended early)"
    if "could not load meta information" in lowered:
        return "ffmpeg could not read the video header"
    # Fall back to the most specific line ffmpeg printed.
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "===" not in ln]
    for ln in reversed(lines):
        if "error" in ln.lower() or "invalid" in ln.lower():
            return "ffmpeg: " + ln
    return lines[0] if lines else type(err).__name__


def _iso_box_problem(path: Path) -> str | None:
    """If ``path`` looks like an MP4/MOV, say what is wrong with its top-level boxes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            off, seen = 0, []
            while off < size and len(seen) < 10_000:
                f.seek(off)
                head = f.read(16)
                if len(head) < 8:
                    return "truncated MP4/MOV (file ends inside a box header)" if seen else None
                box_size = int.from_bytes(head[:4], "big")
                kind = head[4:8].decode("latin-1")
                if kind not in _ISO_TOP_BOXES:
                    if not seen:
                        return None  # not an MP4/MOV at all
                    return f"damaged MP4/MOV (unexpected top-level box {kind!r})"
                header = 8
                if box_size == 1:
                    if len(head) < 16:
                        return "truncated MP4/MOV (file ends inside a box header)"
                    box_size, header = int.from_bytes(head[8:16], "big"), 16
                elif box_size == 0:
                    box_size = size - off
                if box_size < header:
                    return f"damaged MP4/MOV (bad size for the {kind!r} box)"
                seen.append(kind)
                if off + box_size > size:
                    missing = "" if "moov" in seen else ", moov atom not found"
                    return f"truncated MP4/MOV (file ends inside the {kind!r} box{missing})"
                off += box_size
    except OSError:
        return None
    if seen and "moov" not in seen and "moof" not in seen:
        return "truncated or not a valid MP4/MOV (moov atom not found)"
    return None


def _av_reason(path: Path, err: BaseException) -> str:
    """A short reason for a PyAV (FFmpeg library) error about ``path``."""
    problem = _iso_box_problem(path)
    if problem:
        return problem
    av = import_av()
    if av is not None and isinstance(err, av.error.InvalidDataError):
        return "not a recognisable video (ffmpeg: invalid data found when processing input)"
    text = getattr(err, "strerror", None) or str(err)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    detail = lines[0] if lines else type(err).__name__
    if av is not None and isinstance(err, av.error.EOFError):
        return f"truncated or damaged video (ffmpeg: {detail})"
    return f"damaged or unsupported video (ffmpeg: {detail})"


def failure_reason(path: Path, err: BaseException, is_gif: bool, av) -> str:
    """The one-line reason a backend's error ``err`` gives for ``path`` (``av``: PyAV, or None
    when it did not read the file)."""
    if is_gif:
        return f"not a readable GIF ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    if av is not None and isinstance(err, av.error.FFmpegError):
        return _av_reason(path, err)
    return _ffmpeg_reason(err)
