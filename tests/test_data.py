"""Tests for soragen.train.data: finding, captioning, checking and loading training clips."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest

from soragen.train.data import (
    Clip,
    ScanReport,
    describe_resize,
    file_hash,
    find_videos,
    frames_needed,
    load_clip,
    plan_resize,
    read_captions,
    require_clips,
    resize_and_crop,
    sample_frame_indices,
    scan_clips,
)
from soragen.core.errors import SoragenError, UsageError
from soragen.io.video import write_video


def frames_array(t: int = 8, h: int = 32, w: int = 32) -> np.ndarray:
    """A little moving pattern that survives compression."""
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((t, h, w, 3), dtype=np.uint8)
    for i in range(t):
        out[i, ..., 0] = (xx * 255 // max(w - 1, 1)).astype(np.uint8)
        out[i, ..., 1] = (yy * 255 // max(h - 1, 1)).astype(np.uint8)
        out[i, ..., 2] = (i * 255 // max(t - 1, 1))
    return out


def make_clip(path: Path, t: int = 8, h: int = 32, w: int = 32, fps: float = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames_array(t, h, w), fps)
    return path


@pytest.fixture(scope="module")
def good_mp4(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("src") / "good.mp4", t=8, h=32, w=32, fps=8)


# --------------------------------------------------------------------------- find_videos


def test_find_videos_nested_case_insensitive_skips_hidden_and_others(tmp_path):
    for rel in ["a.mp4", "sub/b.MOV", "sub/deeper/c.Gif", "d.webm", "e.mkv", "f.AVI"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    for rel in ["notes.txt", "img.png", "sub/clip.mp4.part", ".hidden.mp4", ".cache/x.mp4", "sub/.git/y.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "folder.mp4").mkdir()  # a folder with a video suffix is not a video

    found = find_videos(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == sorted(
        ["a.mp4", "sub/b.MOV", "sub/deeper/c.Gif", "d.webm", "e.mkv", "f.AVI"],
        key=lambda r: tmp_path / r,
    )
    assert found == sorted(found)


def test_find_videos_works_inside_a_hidden_root(tmp_path):
    root = tmp_path / ".data"
    (root / "x").mkdir(parents=True)
    (root / "x" / "a.mp4").write_bytes(b"x")
    assert find_videos(root) == [root / "x" / "a.mp4"]


# --------------------------------------------------------------------------- captions


def _touch_videos(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def test_captions_from_txt(tmp_path):
    _touch_videos(tmp_path, "a.mp4", "sub/b.gif", "c.mp4")
    (tmp_path / "a.txt").write_text("a red  ball\nbouncing\n", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("a cat", encoding="utf-8")
    caps = read_captions(tmp_path)
    assert caps == {tmp_path / "a.mp4": "a red ball bouncing", tmp_path / "sub" / "b.gif": "a cat"}


def test_captions_from_jsonl(tmp_path):
    _touch_videos(tmp_path, "a.mp4", "sub/b.mp4")
    lines = [
        json.dumps({"file_name": "a.mp4", "text": "first"}),
        "",
        json.dumps({"file_name": "sub/b.mp4", "text": "second", "extra": 3}),
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    caps = read_captions(tmp_path)
    assert caps[tmp_path / "a.mp4"] == "first"
    assert caps[tmp_path / "sub" / "b.mp4"] == "second"


def test_captions_from_csv_with_subfolder_and_txt_wins(tmp_path):
    _touch_videos(tmp_path, "a.mp4", "sub/b.mp4")
    (tmp_path / "metadata.csv").write_text(
        'file_name,text\na.mp4,"from csv, with a comma"\nsub/b.mp4,csv caption\n', encoding="utf-8"
    )
    (tmp_path / "sub" / "b.txt").write_text("txt caption", encoding="utf-8")
    caps = read_captions(tmp_path)
    assert caps[tmp_path / "a.mp4"] == "from csv, with a comma"
    assert caps[tmp_path / "sub" / "b.mp4"] == "txt caption"


def test_malformed_metadata_names_file_and_line(tmp_path):
    _touch_videos(tmp_path, "a.mp4")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.mp4", "text": "ok"}) + "\n{not json\n", encoding="utf-8"
    )
    with pytest.raises(SoragenError, match=r"metadata\.jsonl.*line 2"):
        read_captions(tmp_path)

    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\na.mp4,ok\nb.mp4\n", encoding="utf-8")
    with pytest.raises(SoragenError, match=r"metadata\.csv.*line 3"):
        read_captions(tmp_path)

    (tmp_path / "metadata.csv").write_text("name,caption\na.mp4,ok\n", encoding="utf-8")
    with pytest.raises(SoragenError, match=r"metadata\.csv.*line 1.*file_name"):
        read_captions(tmp_path)


# --------------------------------------------------------------------------- scanning


def test_scan_clips_keeps_good_and_explains_skipped(tmp_path, good_mp4):
    root = tmp_path / "data"
    make_clip(root / "good1.mp4", t=8, fps=8)
    make_clip(root / "sub" / "good2.gif", t=8, h=48, w=64, fps=8)
    (root / "good1.txt").write_text("a gradient", encoding="utf-8")
    make_clip(root / "short.mp4", t=3, fps=8)
    (root / "empty.mp4").write_bytes(b"")
    (root / "notes.mp4").write_text("this is just text, not a video\n" * 20, encoding="utf-8")
    data = good_mp4.read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])

    calls = []
    report = scan_clips(root, num_frames=8, target_fps=8, progress=lambda d, t: calls.append((d, t)))

    assert [c.path.name for c in report.clips] == ["good1.mp4", "good2.gif"]
    assert report.clips[0].caption == "a gradient"
    assert report.clips[1].caption == ""
    assert report.uncaptioned == 1
    assert report.clips[1].info.height == 48 and report.clips[1].info.width == 64
    assert calls[-1] == (6, 6) and len(calls) == 6

    reasons = {p.name: r for p, r in report.skipped}
    assert set(reasons) == {"short.mp4", "empty.mp4", "notes.mp4", "truncated.mp4"}
    assert reasons["empty.mp4"] == "zero-byte file"
    assert reasons["short.mp4"] == "too short: 3 frames at 8 fps, needs 8"
    assert reasons["notes.mp4"] == "not a video (a text file)"
    assert "truncated" in reasons["truncated.mp4"]
    for reason in reasons.values():  # one line, without repeating the path
        assert reason and "\n" not in reason and str(root) not in reason
    assert report.summary() == "used 2 clips (1 without caption), skipped 4 (1 too short, 3 unreadable)"
    require_clips(report, root)  # does not raise


def test_require_clips_on_only_broken_files(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.mov").write_text("not a video", encoding="utf-8")
    report = scan_clips(tmp_path, num_frames=4, target_fps=8)
    assert report.clips == [] and len(report.skipped) == 2
    with pytest.raises(SoragenError, match="no usable clip in .*skipped 2"):
        require_clips(report, tmp_path)


def test_require_clips_on_empty_folder(tmp_path):
    report = scan_clips(tmp_path, num_frames=4, target_fps=8)
    with pytest.raises(SoragenError, match="no usable clip.*no video file"):
        require_clips(report, tmp_path)


def test_scan_clips_bad_root(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        scan_clips(tmp_path / "missing", num_frames=4, target_fps=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        scan_clips(tmp_path / "file", num_frames=4, target_fps=8)


def test_summary_wording():
    r = ScanReport(clips=[], skipped=[(Path("a"), "zero-byte file")], uncaptioned=0)
    assert r.summary() == "used 0 clips, skipped 1 (1 unreadable)"
    assert r.skipped_details() == ["a: zero-byte file"]


# --------------------------------------------------------------------------- frame sampling


def test_frames_needed():
    assert frames_needed(16, 8, 8) == 16
    assert frames_needed(16, 10, 30) == 46  # 15 steps of 3, plus the first frame
    assert frames_needed(16, 16, 8) == 9  # slower source: frames repeat
    assert frames_needed(1, 8, 30) == 1


def test_sample_indices_follow_fps_ratio():
    idx = sample_frame_indices(100, 30.0, 16, 10.0, random.Random(0))
    assert len(idx) == 16
    assert all(0 <= i < 100 for i in idx)
    assert np.all(np.diff(idx) == 3)


def test_sample_indices_random_start_deterministic_and_in_range():
    starts = set()
    for seed in range(30):
        idx = sample_frame_indices(60, 24.0, 8, 8.0, random.Random(seed))
        assert len(idx) == 8 and min(idx) >= 0 and max(idx) < 60
        assert idx == sample_frame_indices(60, 24.0, 8, 8.0, random.Random(seed))
        starts.add(idx[0])
    assert len(starts) > 5


def test_sample_indices_exact_fit_and_slow_source():
    assert sample_frame_indices(16, 8, 16, 8, random.Random(1)) == list(range(16))
    idx = sample_frame_indices(8, 8.0, 16, 16.0, random.Random(2))
    assert len(idx) == 16 and max(idx) < 8
    assert len(set(idx)) < 16  # frames repeat
    assert idx == sorted(idx)


def test_sample_indices_fractional_ratio_stays_in_range():
    for seed in range(20):
        rng = random.Random(seed)
        n = frames_needed(12, 8.0, 29.97)
        idx = sample_frame_indices(n, 29.97, 12, 8.0, rng)
        assert max(idx) < n and len(idx) == 12


# --------------------------------------------------------------------------- resizing


@pytest.mark.parametrize(
    "src_hw, out_hw",
    [((48, 64), (32, 32)), ((64, 48), (32, 32)), ((20, 30), (64, 64)), ((32, 32), (32, 32)), ((36, 64), (32, 48))],
)
def test_resize_and_crop_shapes(src_hw, out_hw):
    frames = np.random.default_rng(0).integers(0, 256, (3, *src_hw, 3), dtype=np.uint8)
    out = resize_and_crop(frames, *out_hw)
    assert out.shape == (3, *out_hw, 3)
    assert out.dtype == np.uint8


def _centroid(frame: np.ndarray) -> tuple[float, float]:
    w = frame[..., 0].astype(np.float64)
    yy, xx = np.mgrid[0 : frame.shape[0], 0 : frame.shape[1]]
    return float((yy * w).sum() / w.sum()), float((xx * w).sum() / w.sum())


@pytest.mark.parametrize("src_hw", [(48, 64), (64, 48), (16, 24)])
def test_centred_feature_stays_centred(src_hw):
    h, w = src_hw
    frames = np.zeros((1, h, w, 3), dtype=np.uint8)
    frames[0, h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4] = 255
    out = resize_and_crop(frames, 32, 32)
    cy, cx = _centroid(out[0])
    assert abs(cy - 15.5) < 1.0 and abs(cx - 15.5) < 1.0


def test_crop_only_keeps_pixels():
    frames = np.arange(2 * 32 * 40 * 3, dtype=np.uint32).reshape(2, 32, 40, 3).astype(np.uint8)
    out = resize_and_crop(frames, 32, 32)
    np.testing.assert_array_equal(out, frames[:, :, 4:36])


def test_describe_resize():
    assert describe_resize(720, 1280, 64, 64) == "resized 1280x720 -> 114x64, centre-cropped to 64x64"
    assert describe_resize(64, 64, 64, 64) == "kept 64x64 as is"
    assert describe_resize(128, 128, 64, 64) == "resized 128x128 -> 64x64"
    assert describe_resize(32, 40, 32, 32) == "centre-cropped 40x32 to 32x32"
    assert describe_resize(16, 16, 32, 32) == "resized 16x16 -> 32x32"
    p = plan_resize(720, 1280, 64, 64)
    assert (p.resized_h, p.resized_w, p.top, p.left) == (64, 114, 0, 25)


# --------------------------------------------------------------------------- loading and hashing


def test_load_clip_shape_and_dtype(tmp_path):
    path = make_clip(tmp_path / "c.mp4", t=12, h=48, w=64, fps=12)
    report = scan_clips(tmp_path, num_frames=4, target_fps=6)
    assert [c.path for c in report.clips] == [path]
    clip = report.clips[0]
    out = load_clip(clip, num_frames=4, target_fps=6, height=32, width=32, rng=random.Random(0))
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    # blue channel encodes time: later sampled frames are bluer
    blues = out[..., 2].mean(axis=(1, 2))
    assert np.all(np.diff(blues) > 0)


def test_load_clip_when_probe_overcounts(tmp_path, good_mp4):
    from soragen.io.video import probe_video

    info = probe_video(good_mp4)
    lying = Clip(path=good_mp4, caption="", info=dataclasses.replace(info, frames=info.frames + 20))
    out = load_clip(lying, num_frames=4, target_fps=8, height=16, width=16, rng=random.Random(3))
    assert out.shape == (4, 16, 16, 3)


def test_file_hash_changes_with_a_byte(tmp_path):
    p = tmp_path / "f.bin"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) // 2, dtype=np.uint8).tobytes())
    p.write_bytes(bytes(data))
    h1 = file_hash(p)
    assert len(h1) == 64 and h1 == file_hash(p)
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert file_hash(p) != h1
    with pytest.raises(SoragenError):
        file_hash(tmp_path / "missing.bin")
