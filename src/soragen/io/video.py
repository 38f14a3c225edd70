"""Reading, probing and writing short RGB video clips.

Video containers (mp4, mov, mkv, avi, webm) are read in-process with PyAV
(``import av``, which bundles its own FFmpeg libraries); when PyAV is not
installed, reading falls back to imageio's FFMPEG plugin, which runs the ffmpeg
binary bundled with imageio-ffmpeg once per file (slower).  Writing
.mp4 always goes through imageio-ffmpeg (libx264).  GIFs and PNG folders go
through Pillow.  Every failure that is about the user's file becomes a
one-line :class:`VideoError` (reading) or :class:`SoragenError` (writing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
from PIL import Image, ImageSequence

from soragen.core.atomic import atomic_path
from soragen.core.errors import SoragenError, UsageError

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
_DEFAULT_GIF_FPS = 10.0
_MP4_CRF = "18"
_PNG_PATTERN = "frame_{:05d}.png"

# Exceptions imageio / imageio-ffmpeg / Pillow raise for bad input.  ffmpeg
# problems surface as OSError ("Could not load meta information"), a partial
# frame as RuntimeError, odd headers as ValueError/IndexError/KeyError, and
# Pillow uses OSError/EOFError/SyntaxError for damaged images.  When PyAV
# reads the file, _decode adds av.error.FFmpegError (the base of PyAV's errors).
_DECODE_ERRORS = (
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

# One decoded frame as the backends hand it to _decode: (height, width, RGB
# array).  The array is None when the caller only counts frames (probe_video),
# which lets PyAV skip the colour conversion.
_Frame = Tuple[int, int, Optional[np.ndarray]]

# Top-level ISO base media (MP4/MOV) box types; used only to explain why a file
# that looks like an MP4/MOV could not be opened.
_ISO_TOP_BOXES = frozenset(
    {"ftyp", "styp", "moov", "mdat", "free", "skip", "wide", "pnot", "uuid",
     "meta", "moof", "mfra", "sidx", "pdin", "prft", "emsg"}
)


class VideoError(SoragenError):
    """A video file is missing, unreadable, damaged or has no video stream."""


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


def _iter_gif(path: Path) -> tuple[Iterator[_Frame], float]:
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
    fps = 1000.0 / (sum(durations) / len(durations)) if durations else _DEFAULT_GIF_FPS

    def frames() -> Iterator[_Frame]:
        try:
            for fr in ImageSequence.Iterator(img):
                a = _to_rgb(np.asarray(fr.convert("RGB")))
                yield a.shape[0], a.shape[1], a
        finally:
            img.close()

    return frames(), fps


def _import_av():
    """Return the PyAV module, or None when it is not installed."""
    try:
        import av  # local: it is optional, and its import is not free
    except ImportError:
        return None
    return av


def _iter_imageio(path: Path) -> tuple[Iterator[_Frame], float, Callable[[], None]]:
    """Fallback reader: imageio's FFMPEG plugin (one ffmpeg process per file)."""
    import imageio.v3 as iio  # local: importing imageio is not free

    reader = iio.imopen(path, "r", plugin="FFMPEG")
    try:
        meta = reader.metadata()
        fps = float(meta.get("fps") or 0.0)
    except BaseException:
        reader.close()
        raise

    def frames() -> Iterator[_Frame]:
        for fr in reader.iter():
            a = _to_rgb(fr)
            yield a.shape[0], a.shape[1], a

    return frames(), fps, reader.close


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
    return 0.0  # _decode substitutes the default


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


def _iter_pyav(av, path: Path, keep: bool) -> tuple[Iterator[_Frame], float, Callable[[], None]]:
    """Decode in-process with PyAV.

    Like the ffmpeg command line, a packet that fails to decode is skipped and a
    container that breaks off part-way ends the stream, so a file damaged in the
    middle yields the frames that do decode.  Only when nothing decodes is the
    last error raised.
    """
    container = av.open(str(path), metadata_errors="replace")
    try:
        stream = container.streams.best("video")  # skips cover art when it can
        if stream is None and container.streams.video:
            stream = container.streams.video[0]
        if stream is None:
            raise VideoError(f"{path}: no video stream (audio-only or empty container)")
        if stream.codec_context is None:
            raise VideoError(f"{path}: no decoder for the video stream's codec")
        fps = _stream_fps(stream)
    except BaseException:
        container.close()
        raise

    def frames() -> Iterator[_Frame]:
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
                k = _quarter_turns(getattr(fr, "rotation", 0))  # PyAV >= 14 exposes it
                h, w = (fr.width, fr.height) if k % 2 else (fr.height, fr.width)
                a = None
                if keep:
                    a = to_rgb.reformat(fr, format="rgb24").to_ndarray()
                    if k:
                        a = np.ascontiguousarray(np.rot90(a, k))
                decoded += 1
                yield h, w, a
        if decoded == 0 and failure is not None:
            raise failure

    return frames(), fps, container.close


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
    av = _import_av()
    if av is not None and isinstance(err, av.error.InvalidDataError):
        return "not a recognisable video (ffmpeg: invalid data found when processing input)"
    text = getattr(err, "strerror", None) or str(err)
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    detail = lines[0] if lines else type(err).__name__
    if av is not None and isinstance(err, av.error.EOFError):
        return f"truncated or damaged video (ffmpeg: {detail})"
    return f"damaged or unsupported video (ffmpeg: {detail})"


def _decode(path, max_frames: int | None, keep: bool):
    """Decode up to ``max_frames`` frames; return (frames list or None, count, shape, fps)."""
    path = Path(path)
    _check_input_path(path)
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    is_gif = path.suffix.lower() == ".gif"
    av = None if is_gif else _import_av()
    errors = _DECODE_ERRORS if av is None else _DECODE_ERRORS + (av.error.FFmpegError,)
    kept: list[np.ndarray] = []
    count = 0
    shape: tuple[int, int] | None = None
    close: Callable[[], None] | None = None
    try:
        if is_gif:
            it, fps = _iter_gif(path)
        elif av is not None:
            it, fps, close = _iter_pyav(av, path, keep)
        else:
            it, fps, close = _iter_imageio(path)
        try:
            for h, w, frame in it:
                if shape is None:
                    shape = (h, w)
                    if h * w > MAX_PIXELS:
                        raise VideoError(f"{path}: frames of {w}x{h} are too large for soragen "
                                         f"(at most {MAX_PIXELS // 10**6} megapixels)")
                elif (h, w) != shape:
                    raise VideoError(
                        f"{path}: frame {count} is {w}x{h}, expected {shape[1]}x{shape[0]}"
                    )
                count += 1
                if keep:
                    kept.append(frame)
                if max_frames is not None and count >= max_frames:
                    break
        finally:
            it.close()
    except VideoError:
        raise
    except MemoryError:
        raise VideoError(f"{path}: out of memory while decoding ({count} frames read)") from None
    except errors as err:
        if is_gif:
            reason = f"not a readable GIF ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
        elif av is not None and isinstance(err, av.error.FFmpegError):
            reason = _av_reason(path, err)
        else:
            reason = _ffmpeg_reason(err)
        if count:
            reason += f" after {count} frames"
        raise VideoError(f"{path}: {reason}") from None
    finally:
        if close is not None:
            try:
                close()
            except errors:
                pass
    if count == 0 or shape is None:
        raise VideoError(f"{path}: no video frames could be decoded")
    if not (fps > 0 and math.isfinite(fps)):
        fps = _DEFAULT_GIF_FPS
    return (kept if keep else None), count, shape, fps


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
