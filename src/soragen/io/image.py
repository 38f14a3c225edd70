"""Still images a video starts (or ends) from: `generate --image` and `--last-image`.

An image from elsewhere is data: it is read from a regular file of bounded size, its pixel count is
checked from the header before any pixel is decoded (a PNG can claim 60000 x 60000 in a few hundred
bytes), and every failure is one SoragenError naming the file. Any mode Pillow reads is taken (RGBA,
palette, 16-bit, CMYK): turned by its EXIF orientation and made 8-bit RGB as diffusers' `load_image`
does, 16-bit samples scaled rather than clipped.

Sizes follow diffusers' Wan image-to-video examples: the video's size defaults to the model's pixel
area at the image's aspect ratio, each side rounded down to the size multiple; the image is then
scaled to cover that size and its centre cropped to it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from soragen.core.errors import SoragenError, UsageError

MAX_BYTES = 256 << 20
MAX_PIXELS = 8192 * 8192  # as many as a video frame may have (soragen.io.video)
MIN_SIDE = 16
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_image_count(image: bool, last_image: bool, inputs: int, from_image: bool, model: str) -> None:
    """UsageError unless --image (and --last-image) are what the model takes: at most `inputs`
    images, and at least as many where it makes videos `from_image` alone (an image-to-video model).
    One wording for generate, the pipeline and the web page."""
    if last_image and not image:
        raise UsageError("--last-image needs --image too: a video that ends at an image starts from one")
    given = int(image) + int(last_image)
    if given > inputs:
        raise UsageError(f"--image: the model {model} cannot take an image; it makes videos from text alone"
                         if inputs == 0 else f"--last-image: the model {model} cannot take a last image")
    if from_image and given < inputs:
        raise UsageError(f"the model {model} makes a video from " + ("an image: give --image" if inputs == 1 else
                         "a first and a last image: give --image and --last-image"))


def read_image(path: Path, what: str = "--image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image at `path`; SoragenError naming `what` and the file otherwise."""
    from soragen.core.jsonfile import read_bytes
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise SoragenError(f"{what} {path}: soragen reads {', '.join(s.lstrip('.') for s in SUFFIXES)} images, "
                           f"not {path.suffix or 'a file without a suffix'}")
    try:
        data = read_bytes(path, MAX_BYTES)  # a regular file of bounded size
    except SoragenError as err:
        raise SoragenError(f"{what} {err}") from None
    return decode_image(data, f"{what} {path}")


def decode_image(data: bytes, what: str = "the image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image's bytes (an upload to `soragen serve`, or a file read_image
    read), decoded in memory under the limits above; SoragenError starting with `what` otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    if len(data) > MAX_BYTES:
        raise SoragenError(f"{what} is {len(data)} bytes, more than soragen reads ({MAX_BYTES >> 20} MB)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > MAX_PIXELS:
                raise SoragenError(f"{what} claims {width}x{height} pixels, more than soragen decodes "
                                   f"({MAX_PIXELS // 10**6} megapixels): not an image to start a video from")
            if min(width, height) < MIN_SIDE:
                raise SoragenError(f"{what} is {width}x{height} pixels; an image to start a video from needs "
                                   f"at least {MIN_SIDE} a side")
            image.load()
            return _rgb(ImageOps.exif_transpose(image))
    except SoragenError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, above ours: its header claims still more
        raise SoragenError(f"{what} claims more pixels than soragen decodes ({MAX_PIXELS // 10**6} "
                           f"megapixels): not an image to start a video from") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SoragenError(f"{what} is not a readable image: {(str(err).splitlines() or [''])[0]}") from None


def _rgb(image) -> np.ndarray:
    """8-bit RGB of a Pillow image in any mode; 16- and 32-bit samples scaled to 0..255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def default_size(image_hw: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """(height, width) of a video of `area` pixels at the image's aspect ratio, each side rounded
    down to `multiple` (at least one multiple), as diffusers' Wan image-to-video examples size it."""
    aspect = image_hw[0] / image_hw[1]
    height = round(math.sqrt(area * aspect)) // multiple * multiple
    width = round(math.sqrt(area / aspect)) // multiple * multiple
    return max(height, multiple), max(width, multiple)


def fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image scaled (bicubic) to cover height x width, its centre cropped to it."""
    from PIL import Image
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))
    scaled = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    top, left = (size[1] - height) // 2, (size[0] - width) // 2
    return scaled[top:top + height, left:left + width]
