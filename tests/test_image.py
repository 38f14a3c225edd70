"""Images a video starts from (generate --image, --last-image): any mode read as 8-bit RGB, sized as
diffusers' Wan image-to-video examples size them, hostile files refused in one line, and a model
that cannot take an image refused before anything loads."""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli, listing
from soragen.core.errors import SoragenError
from soragen.io.image import default_size, fit, read_image


def gradient(height: int = 24, width: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode, suffix", [(m, ".png") for m in ("RGB", "RGBA", "P", "L", "LA")]
                         + [(m, ".jpg") for m in ("RGB", "L", "CMYK")] + [(m, ".webp") for m in ("RGB", "RGBA")])
def test_any_mode_and_format_reads_as_8_bit_rgb(tmp_path, mode, suffix):
    source = Image.fromarray(gradient()).convert(mode)
    path = tmp_path / f"image{suffix}"
    source.save(path, **({"quality": 95} if suffix != ".png" else {}))
    image = read_image(path)
    assert image.dtype == np.uint8 and image.shape == (24, 40, 3)
    if suffix == ".png":  # lossless: exactly what Pillow's own RGB conversion gives
        assert np.array_equal(image, np.asarray(Image.open(path).convert("RGB")))


def test_16_bit_samples_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 32768, 65535] * 6] * 16, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # mode I;16
    image = read_image(path)
    assert image.shape == (16, 18, 3)
    assert image[0, :3, 0].tolist() == [0, 128, 255]  # clipped, 32768 would read as 255


def test_the_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed turned a quarter
    Image.fromarray(gradient(24, 40)).save(path, exif=exif, quality=95)
    assert read_image(path).shape == (40, 24, 3)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG of 16x16 pixels whose header says `width` x `height` (a decompression bomb's header)."""
    raw = bytearray()
    Image.fromarray(gradient(16, 16)).save(buffer := __import__("io").BytesIO(), format="PNG")
    raw[:] = buffer.getvalue()
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    return bytes(raw)


def hostile(tmp_path, kind: str):
    path = tmp_path / ("image.png" if kind != "bmp" else "image.bmp")
    if kind == "truncated":
        Image.fromarray(gradient()).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "text":
        path.write_text("not an image")
    elif kind == "one pixel":
        Image.fromarray(gradient(1, 1)).save(path)
    elif kind == "bomb":
        path.write_bytes(png_claiming(60000, 60000))
    elif kind == "large":  # under Pillow's own limit, over ours
        path.write_bytes(png_claiming(9000, 9000))
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "bmp":
        Image.fromarray(gradient()).save(path)
    return path  # "missing": never written


@pytest.mark.parametrize("kind, needles", [
    ("truncated", ["image.png", "not a readable image"]),
    ("text", ["image.png", "not a readable image"]),
    ("one pixel", ["1x1", "at least 16"]),
    ("bomb", ["claims", "megapixels"]),
    ("large", ["9000x9000", "megapixels"]),
    ("fifo", ["FIFO", "not a regular file"]),
    ("missing", ["image.png", "missing"]),
    ("bmp", ["image.bmp", "png, jpg, jpeg, webp"]),
])
def test_a_hostile_image_is_one_line_naming_it(tmp_path, kind, needles):
    path = hostile(tmp_path, kind)
    with pytest.raises(SoragenError) as err:
        read_image(path, "--image")
    message = str(err.value)
    assert message.startswith("--image") and "\n" not in message
    assert all(n.lower() in message.lower() for n in needles), message


def test_the_default_size_is_the_models_area_at_the_images_aspect_as_diffusers_sizes_it():
    # diffusers' WanImageToVideoPipeline example: round(sqrt(area * aspect)) // mod * mod
    for hw, area, mod in [((720, 1280), 480 * 832, 16), ((1024, 768), 480 * 832, 16), ((500, 500), 64 * 64, 16)]:
        aspect = hw[0] / hw[1]
        expected = (round(np.sqrt(area * aspect)) // mod * mod, round(np.sqrt(area / aspect)) // mod * mod)
        assert default_size(hw, area, mod) == expected
        height, width = expected
        assert height % mod == 0 and width % mod == 0 and abs(height * width - area) / area < 0.1
    assert default_size((10, 5000), 64 * 64, 16) == (16, 1424)  # never below one multiple


def test_fit_covers_the_size_and_keeps_the_centre():
    image = np.zeros((100, 300, 3), np.uint8)
    image[40:60, 140:160] = 255  # a white square in the middle
    out = fit(image, 64, 64)
    assert out.shape == (64, 64, 3)
    centre = out[27:37, 27:37].mean()  # the square lands on rows and columns 25.6 .. 38.4
    assert centre > 200 and out[:8].mean() < 20 and out[:, :8].mean() < 20
    assert fit(image, 50, 150).shape == (50, 150, 3)  # the same aspect: a plain resize
    assert math.isclose(fit(image, 50, 150)[20:30, 70:80].mean(), 255, abs_tol=30)


def test_generate_refuses_an_image_on_a_text_to_video_model_before_loading(tiny_model, tmp_path, capfd):
    path = tmp_path / "first.png"
    Image.fromarray(gradient()).save(path)
    out = tmp_path / "out"
    out.mkdir()
    rc = cli("generate", "a red ball", "--model", tiny_model, "--image", path, "--out", out / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--image", str(tiny_model), "soragen", "cannot take an image")
    rc = cli("generate", "a red ball", "--model", tiny_model, "--last-image", path, "--out", out / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 2, rc, "--last-image needs --image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    rc = cli("generate", "a red ball", "--model", tiny_model, "--image", tmp_path / "broken.png", "--out", out / "x.mp4")
    assert_one_line_error(capfd.readouterr(), 1, rc, "--image", "broken.png", "not a readable image")
    assert listing(out) == []
