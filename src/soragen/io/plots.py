"""Small pictures drawn with Pillow: the training loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw


def loss_curve_png(metrics: Path, out: Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Plot loss per step from metrics.jsonl (log scale, raw and smoothed); None if there is nothing."""
    points = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        record = json.loads(line)
        if record.get("loss") is not None and record["loss"] > 0:
            points.append((record["step"], math.log10(record["loss"])))
    if len(points) < 2:
        return None
    W, H, margin = size[0], size[1], 48
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [p[0] for p in points]
    values = [p[1] for p in points]
    x0, x1, y0, y1 = min(steps), max(steps), min(values), max(values)
    y1 = y1 if y1 > y0 else y0 + 1

    def xy(step, value):
        return (margin + (step - x0) / max(x1 - x0, 1) * (W - 2 * margin),
                H - margin - (value - y0) / (y1 - y0) * (H - 2 * margin))

    draw.rectangle([margin, margin, W - margin, H - margin], outline="black")
    draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
    smooth, ema = [], values[0]
    for s, v in points:
        ema = 0.95 * ema + 0.05 * v
        smooth.append(xy(s, ema))
    draw.line(smooth, fill=(20, 60, 170), width=2)
    draw.text((margin, 12), f"training loss (log10), steps {x0}-{x1}, last {10 ** values[-1]:.4f}", fill="black")
    for value in (y0, y1):
        draw.text((4, xy(x0, value)[1] - 6), f"{10 ** value:.3g}", fill="black")
    draw.text((margin, H - margin + 8), str(x0), fill="black")
    draw.text((W - margin - 30, H - margin + 8), str(x1), fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
