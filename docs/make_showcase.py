"""Make docs/showcase.gif: the default model's videos for a few prompts, side by side, captioned.

    python docs/make_showcase.py            # writes docs/showcase.gif and docs/showcase.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from soragen.io.folders import default_model_dir
from soragen.pipeline import Pipeline

PROMPTS = [
    "a red ball moving right in the blue sky",
    "a white box rising at night",
    "a yellow triangle falling over green grass",
    "sora is sky",
]
ZOOM, LABEL_H = 2, 40


def tile(videos: list[np.ndarray], prompts: list[str]) -> list[Image.Image]:
    """One image per frame: the videos side by side, each with its prompt underneath."""
    T, H, W, _ = videos[0].shape
    frames = []
    for t in range(T):
        canvas = Image.new("RGB", (len(videos) * (W * ZOOM + 4) + 4, H * ZOOM + LABEL_H + 8), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (video, prompt) in enumerate(zip(videos, prompts)):
            x = 4 + i * (W * ZOOM + 4)
            canvas.paste(Image.fromarray(video[t]).resize((W * ZOOM, H * ZOOM), Image.NEAREST), (x, 4))
            words, lines = prompt.split(), [""]
            for word in words:  # wrap the prompt to the tile's width
                if len(lines[-1]) + len(word) + 1 > W * ZOOM // 6:
                    lines.append("")
                lines[-1] = (lines[-1] + " " + word).strip()
            draw.multiline_text((x, H * ZOOM + 6), "\n".join(lines[:3]), fill="black", spacing=1)
        frames.append(canvas)
    return frames


def main(out_dir: Path = Path(__file__).parent) -> None:
    pipe = Pipeline.load(default_model_dir() or sys.exit("no default model installed"), device="cpu")
    videos = [pipe.generate(p, seed=i) for i, p in enumerate(PROMPTS)]
    frames = tile(videos, PROMPTS)
    gif = out_dir / "showcase.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=125, loop=0)
    strip = Image.new("RGB", (frames[0].width, frames[0].height * 4), "white")
    for row, t in enumerate(np.linspace(0, len(frames) - 1, 4).round().astype(int)):
        strip.paste(frames[t], (0, row * frames[0].height))
    strip.save(out_dir / "showcase.png")
    print(f"wrote {gif} and {out_dir / 'showcase.png'}")


if __name__ == "__main__":
    main()
