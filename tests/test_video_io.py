"""Tests for soragen.io.video: round trips, padding, atomic writes, bad inputs."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from soragen.io import video as video_io
from soragen.core.errors import SoragenError, UsageError
from soragen.io.video import (
    VIDEO_SUFFIXES,
    VideoError,
    VideoInfo,
    WriteResult,
    probe_video,
    read_video,
    write_video,
)


def smooth_clip(t: int = 6, h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth moving gradient: compresses well, so H.264 errors stay small."""
    y, x = np.mgrid[0:h, 0:w]
    frames = []
    for i in range(t):
        r = (x * 3 + i * 6) % 256
        g = (y * 4 + i * 2) % 256
        b = np.full_like(x, 100 + i * 10)
        frames.append(np.stack([r, g, b], axis=-1))
    return np.stack(frames).astype(np.uint8)


def noise_clip(t: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def valid_mp4(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "clip.mp4"
    frames = smooth_clip()
    write_video(path, frames, 12)
    return path, frames


# --------------------------------------------------------------------------- writing


def test_public_api():
    assert VIDEO_SUFFIXES == frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm", ".gif"})
    assert issubclass(VideoError, SoragenError)
    source = open(video_io.__file__, encoding="utf-8").read()
    assert not re.search(r"^\s*(import|from)\s+torch\b", source, re.M)


def test_mp4_round_trip(valid_mp4):
    path, frames = valid_mp4
    back, fps = read_video(path)
    assert back.shape == frames.shape
    assert back.dtype == np.uint8
    assert fps == pytest.approx(12.0)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6


def test_mp4_fractional_fps_and_frame_count(tmp_path):
    path = tmp_path / "f.mp4"
    frames = smooth_clip(t=7, h=32, w=32)
    res = write_video(path, frames, 7.5)
    assert res == WriteResult(path=path, note=None)
    info = probe_video(path)
    assert info == VideoInfo(path=path, frames=7, height=32, width=32, fps=pytest.approx(7.5))


def test_probe_matches_written(valid_mp4):
    path, frames = valid_mp4
    info = probe_video(path)
    assert (info.frames, info.height, info.width) == frames.shape[:3]
    assert info.fps == pytest.approx(12.0)
    assert info.path == path


def test_read_max_frames(valid_mp4):
    path, frames = valid_mp4
    back, _ = read_video(path, max_frames=2)
    assert back.shape == (2,) + frames.shape[1:]


def test_odd_size_is_padded_with_note(tmp_path):
    frames = smooth_clip(t=3, h=47, w=63)
    res = write_video(tmp_path / "odd.mp4", frames, 10)
    assert res.note is not None
    assert "padded 63x47 to 64x48" in res.note and "even" in res.note
    back, _ = read_video(tmp_path / "odd.mp4")
    assert back.shape == (3, 48, 64, 3)
    err = np.abs(back[:, :47, :63].astype(int) - frames.astype(int)).mean()
    assert err < 6
    # The padding replicates the last row/column rather than adding black.
    assert np.abs(back[:, 47, :63].astype(int) - frames[:, 46].astype(int)).mean() < 8


def test_gif_round_trip(tmp_path):
    frames = smooth_clip(t=4, h=32, w=32)
    res = write_video(tmp_path / "a.gif", frames, 10)
    assert res.note is None
    back, fps = read_video(tmp_path / "a.gif")
    assert back.shape == frames.shape
    assert fps == pytest.approx(10.0)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 8
    assert probe_video(tmp_path / "a.gif").frames == 4
    from PIL import Image

    with Image.open(tmp_path / "a.gif") as im:
        assert im.info.get("loop") == 0


def test_gif_fps_rounding_note(tmp_path):
    res = write_video(tmp_path / "b.gif", noise_clip(t=2), 12)
    assert res.note is not None and "12.5" in res.note
    assert read_video(tmp_path / "b.gif")[1] == pytest.approx(12.5)


def test_png_folder_round_trip_exact(tmp_path):
    frames = noise_clip(t=3, h=32, w=40)
    out = tmp_path / "frames"
    res = write_video(out, frames, 8)
    assert res.note is None and out.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_00000.png",
        "frame_00001.png",
        "frame_00002.png",
    ]
    from PIL import Image

    back = np.stack([np.asarray(Image.open(out / f"frame_{i:05d}.png")) for i in range(3)])
    np.testing.assert_array_equal(back, frames)
    # Writing again over our own folder replaces it (fewer frames -> fewer files).
    write_video(out, frames[:1], 8)
    assert sorted(p.name for p in out.iterdir()) == ["frame_00000.png"]
    assert leftovers(tmp_path) == []


def test_existing_directory_with_suffix_gets_pngs(tmp_path):
    out = tmp_path / "looks_like.mp4"
    out.mkdir()
    write_video(out, noise_clip(t=2), 5)
    assert (out / "frame_00001.png").is_file()


def test_png_folder_refuses_foreign_files(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SoragenError, match="notes.txt"):
        write_video(out, noise_clip(t=1), 5)
    assert (out / "notes.txt").read_text() == "keep me"


def test_creates_missing_parent(tmp_path):
    out = tmp_path / "a" / "b" / "c.mp4"
    write_video(out, noise_clip(t=2), 5)
    assert out.is_file()


def test_unknown_suffix_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match=r"\.avi.*\.mp4.*\.gif"):
        write_video(tmp_path / "x.avi", noise_clip(), 5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((2, 8, 8, 4), dtype=np.uint8),
        np.zeros((0, 8, 8, 3), dtype=np.uint8),
        [[[[0, 0, 0]]]],
    ],
    ids=["float", "3d", "rgba", "empty", "list"],
)
def test_bad_frames_raise_value_error_and_leave_file(tmp_path, frames):
    out = tmp_path / "keep.mp4"
    out.write_bytes(b"previous")
    with pytest.raises(ValueError):
        write_video(out, frames, 5)
    assert out.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fps", [0, -1, float("nan"), float("inf")])
def test_bad_fps(tmp_path, fps):
    with pytest.raises(ValueError):
        write_video(tmp_path / "a.mp4", noise_clip(t=1), fps)


def test_unwritable_parent_is_soragen_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SoragenError, match=r"cannot write to .*file.*out\.mp4") as exc:
        write_video(blocker / "sub" / "out.mp4", noise_clip(t=1), 5)
    assert "\n" not in str(exc.value)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("name", ["keep.mp4", "keep.gif", "keepdir"])
def test_failure_mid_write_is_atomic(tmp_path, monkeypatch, name):
    out = tmp_path / name
    if name == "keepdir":
        write_video(out, noise_clip(t=2), 5)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    else:
        out.write_bytes(b"previous")

    def boom(tmp, frames, *args):
        if tmp.suffix:
            tmp.write_bytes(b"partial")
        else:
            tmp.mkdir()
            (tmp / "frame_00000.png").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video_io, "_write_mp4", boom)
    monkeypatch.setattr(video_io, "_write_gif", boom)
    monkeypatch.setattr(video_io, "_write_png_dir", boom)
    with pytest.raises(SoragenError, match="No space left on device") as exc:
        write_video(out, noise_clip(t=3), 5)
    assert str(out) in str(exc.value)
    assert leftovers(tmp_path) == []
    if name == "keepdir":
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    else:
        assert out.read_bytes() == b"previous"


def test_success_overwrites_existing_file(tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    write_video(out, noise_clip(t=2), 5)
    assert probe_video(out).frames == 2
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- bad input


def _ffmpeg():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def make_bad(kind: str, tmp_path, valid_mp4):
    if kind == "missing":
        return tmp_path / "missing.mp4"
    if kind == "directory":
        d = tmp_path / "dir.mp4"
        d.mkdir()
        return d
    if kind == "empty":
        p = tmp_path / "empty.mp4"
        p.write_bytes(b"")
        return p
    if kind == "truncated":
        data = valid_mp4[0].read_bytes()
        p = tmp_path / "trunc.mp4"
        p.write_bytes(data[: len(data) // 2])
        return p
    if kind == "text":
        p = tmp_path / "text.mp4"
        p.write_text("this is not a video\n" * 20)
        return p
    if kind == "audio":
        p = tmp_path / "audio.mp4"
        subprocess.run(
            [_ffmpeg(), "-y", "-loglevel", "error", "-f", "lavfi",
             "-i", "sine=frequency=440:duration=1", str(p)],
            check=True,
        )
        return p
    if kind == "wav":
        p = tmp_path / "audio.wav"
        p.write_bytes(b"RIFF....WAVE")
        return p
    if kind == "text_gif":
        p = tmp_path / "text.gif"
        p.write_text("GIF? no")
        return p
    if kind == "truncated_gif":
        g = tmp_path / "whole.gif"
        write_video(g, noise_clip(t=4), 10)
        data = g.read_bytes()
        p = tmp_path / "trunc.gif"
        p.write_bytes(data[: len(data) // 2])
        return p
    raise AssertionError(kind)


BAD_KINDS = [
    "missing", "directory", "empty", "truncated", "text", "audio", "wav", "text_gif",
    "truncated_gif",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("func", [probe_video, read_video], ids=["probe", "read"])
def test_bad_input_raises_video_error(tmp_path, valid_mp4, kind, func):
    path = make_bad(kind, tmp_path, valid_mp4)
    with pytest.raises(VideoError) as exc:
        func(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "\n" not in msg and len(msg) < 300


def test_audio_only_message_says_no_video(tmp_path, valid_mp4):
    with pytest.raises(VideoError, match="no video stream"):
        read_video(make_bad("audio", tmp_path, valid_mp4))


def test_empty_and_truncated_messages(tmp_path, valid_mp4):
    with pytest.raises(VideoError, match="empty"):
        probe_video(make_bad("empty", tmp_path, valid_mp4))
    with pytest.raises(VideoError, match="truncated"):
        probe_video(make_bad("truncated", tmp_path, valid_mp4))


def test_truncated_midway_returns_decodable_frames_or_video_error(tmp_path):
    """With the index at the front (faststart), half a file still decodes part-way."""
    import imageio.v3 as iio

    frames = noise_clip(t=20, h=32, w=32)
    whole = tmp_path / "fast.mp4"
    iio.imwrite(
        whole, frames, plugin="FFMPEG", fps=10, codec="libx264", macro_block_size=1,
        output_params=["-movflags", "+faststart"], ffmpeg_log_level="error",
    )
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    try:
        back, fps = read_video(cut)
    except VideoError as err:
        assert str(cut) in str(err)
        return
    assert 1 <= back.shape[0] < 20
    assert back.shape[1:] == (32, 32, 3)
    assert probe_video(cut).frames == back.shape[0]


def test_reads_gray_gif_as_rgb(tmp_path):
    from PIL import Image

    gray = np.random.default_rng(1).integers(0, 256, (3, 16, 24), dtype=np.uint8)
    ims = [Image.fromarray(g, mode="L") for g in gray]
    ims[0].save(tmp_path / "g.gif", save_all=True, append_images=ims[1:], duration=50)
    back, fps = read_video(tmp_path / "g.gif")
    assert back.shape == (3, 16, 24, 3)
    assert fps == pytest.approx(20.0)
    assert np.array_equal(back[..., 0], back[..., 2])


def test_gif_without_duration_defaults_to_10fps(tmp_path):
    from PIL import Image

    ims = [Image.fromarray(f) for f in noise_clip(t=2, h=8, w=8)]
    ims[0].save(tmp_path / "n.gif", save_all=True, append_images=ims[1:])
    assert probe_video(tmp_path / "n.gif").fps == pytest.approx(10.0)


# --------------------------------------------------------------------------- backends


def _without_pyav(monkeypatch):
    """Make `import av` fail, as if PyAV were not installed."""
    monkeypatch.setitem(sys.modules, "av", None)


def _spy(monkeypatch, name):
    """Record calls of video_io.<name> and the number of frames its iterator yields."""
    calls = []
    original = getattr(video_io, name)

    def wrapper(*args, **kwargs):
        it, *rest = original(*args, **kwargs)
        record = {"yielded": 0}
        calls.append(record)

        def counted():
            for item in it:
                record["yielded"] += 1
                yield item

        return (counted(), *rest)

    monkeypatch.setattr(video_io, name, wrapper)
    return calls


def test_reads_through_pyav_matching_imageio(tmp_path, valid_mp4, monkeypatch):
    pytest.importorskip("av")
    path, _ = valid_mp4
    via_av = _spy(monkeypatch, "_iter_pyav")
    via_imageio = _spy(monkeypatch, "_iter_imageio")
    fast, fast_fps = read_video(path)
    fast_info = probe_video(path)
    assert len(via_av) == 2 and via_imageio == []

    _without_pyav(monkeypatch)
    slow, slow_fps = read_video(path)
    slow_info = probe_video(path)
    assert len(via_av) == 2 and len(via_imageio) == 2

    assert fast.shape == slow.shape and fast.dtype == slow.dtype == np.uint8
    diff = np.abs(fast.astype(int) - slow.astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 3
    assert fast_fps == pytest.approx(slow_fps, rel=1e-3)
    assert fast_info == slow_info


@pytest.mark.parametrize("codec,suffix", [("libvpx-vp9", ".webm"), ("mpeg4", ".avi"),
                                          ("ffv1", ".mkv")])
def test_other_containers_match_imageio(tmp_path, valid_mp4, monkeypatch, codec, suffix):
    pytest.importorskip("av")
    src, _ = valid_mp4
    path = tmp_path / f"clip{suffix}"
    done = subprocess.run(
        [_ffmpeg(), "-y", "-loglevel", "error", "-i", str(src), "-c:v", codec, str(path)],
        capture_output=True,
    )
    if done.returncode:
        pytest.skip(f"bundled ffmpeg cannot encode {codec}")
    fast, fast_fps = read_video(path)
    _without_pyav(monkeypatch)
    slow, slow_fps = read_video(path)
    assert fast.shape == slow.shape == (6, 48, 64, 3)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 0.5
    assert fast_fps == pytest.approx(slow_fps, rel=1e-3) == pytest.approx(12.0, rel=1e-3)


def test_fallback_without_pyav(tmp_path, valid_mp4, monkeypatch):
    path, frames = valid_mp4
    _without_pyav(monkeypatch)
    via_av = _spy(monkeypatch, "_iter_pyav")
    via_imageio = _spy(monkeypatch, "_iter_imageio")
    back, fps = read_video(path)
    assert back.shape == frames.shape and fps == pytest.approx(12.0)
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 6
    assert probe_video(path).frames == 6
    assert read_video(path, max_frames=2)[0].shape[0] == 2
    assert via_av == [] and len(via_imageio) == 3
    with pytest.raises(VideoError, match="no video stream"):
        read_video(make_bad("audio", tmp_path, valid_mp4))
    with pytest.raises(VideoError, match="truncated"):
        probe_video(make_bad("truncated", tmp_path, valid_mp4))
    with pytest.raises(VideoError, match=r"text\.mp4: "):
        read_video(make_bad("text", tmp_path, valid_mp4))


def test_max_frames_stops_decoding_early(valid_mp4, monkeypatch):
    pytest.importorskip("av")
    calls = _spy(monkeypatch, "_iter_pyav")
    back, _ = read_video(valid_mp4[0], max_frames=2)
    assert back.shape[0] == 2
    assert calls == [{"yielded": 2}]


def test_pyav_messages(tmp_path, valid_mp4):
    pytest.importorskip("av")
    with pytest.raises(VideoError, match=r"truncated MP4/MOV .*moov atom not found"):
        read_video(make_bad("truncated", tmp_path, valid_mp4))
    with pytest.raises(VideoError, match=r"text\.mp4: not a recognisable video"):
        probe_video(make_bad("text", tmp_path, valid_mp4))
    with pytest.raises(VideoError, match=r"audio\.mp4: no video stream"):
        probe_video(make_bad("audio", tmp_path, valid_mp4))


def test_rotated_video_is_turned_upright_like_ffmpeg(tmp_path, monkeypatch):
    av = pytest.importorskip("av")
    if not hasattr(av.VideoFrame, "rotation"):
        pytest.skip("this PyAV does not expose frame rotation")
    src = tmp_path / "flat.mp4"
    write_video(src, smooth_clip(t=3, h=32, w=48), 10)
    rot = tmp_path / "rot.mp4"
    done = subprocess.run(
        [_ffmpeg(), "-y", "-loglevel", "error", "-display_rotation", "90", "-i", str(src),
         "-c", "copy", str(rot)],
        capture_output=True,
    )
    if done.returncode:
        pytest.skip("bundled ffmpeg has no -display_rotation")
    fast, _ = read_video(rot)
    info = probe_video(rot)
    _without_pyav(monkeypatch)
    slow, _ = read_video(rot)
    assert fast.shape == slow.shape == (3, 48, 32, 3)
    assert (info.height, info.width) == (48, 32)
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 0.5


def test_damaged_bytes_give_frames_or_video_error(tmp_path):
    """Overwritten, cut or deleted bytes anywhere: never an exception other than VideoError."""
    src = tmp_path / "src.mp4"
    write_video(src, noise_clip(t=8, h=32, w=32), 8)
    data = src.read_bytes()
    rng = np.random.default_rng(3)
    for i in range(24):
        d = bytearray(data)
        pos = int(rng.integers(0, len(d)))
        if i % 3 == 0:
            d = d[: max(pos, 1)]
        elif i % 3 == 1:
            d[pos : pos + 32] = rng.integers(0, 256, len(d[pos : pos + 32]), dtype=np.uint8).tobytes()
        else:
            del d[pos : pos + 100]
        p = tmp_path / f"bad{i}.mp4"
        p.write_bytes(bytes(d))
        try:
            back, _ = read_video(p)
        except VideoError as err:
            assert str(p) in str(err) and "\n" not in str(err)
            with pytest.raises(VideoError):
                probe_video(p)
            continue
        assert back.ndim == 4 and back.shape[0] >= 1 and back.shape[3] == 3
        assert probe_video(p).frames == back.shape[0]
