"""Shape twins of a shapes-world data set: clip i drawn again from the same rng (same size, path,
stars, colour, background and direction) with another shape, under the same file name.

    python experiments/shape_twins/make_twins.py data/shapes data/shapes-twins --seed 0

--seed must be the one `soragen make-dataset` was given. A prototype, not part of the package.
"""
import argparse
import json
import random
from pathlib import Path

from soragen.shapes import FPS, SHAPES, ClipSpec, _clip_rng, caption_for, render_clip
from soragen.video_io import write_video

parser = argparse.ArgumentParser()
parser.add_argument("src", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
args.out.mkdir(parents=True, exist_ok=True)
rows = []
for i, line in enumerate((args.src / "metadata.jsonl").read_text().splitlines()):
    r = json.loads(line)
    k = SHAPES.index(r["shape"])
    twin = ClipSpec(r["background"], r["color"], SHAPES[(k + 1 + i % 2) % 3], r["direction"])
    clip = render_clip(twin, _clip_rng(args.seed, i))
    text = caption_for(twin, random.Random(10_000 + i))
    write_video(args.out / r["file_name"], clip, FPS)
    (args.out / r["file_name"].replace(".mp4", ".txt")).write_text(text + "\n")
    rows.append(json.dumps({"file_name": r["file_name"], "text": text, **twin.as_dict()}))
(args.out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
print(f"wrote {len(rows)} twins to {args.out}")
