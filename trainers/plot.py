"""Loss curve as an image (PIL only): raw loss, an exponential moving average, the validation loss (dots, when
there is one), labelled axes."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .state import LossHistory

VALIDATION_COLOUR = (230, 110, 0)


def smooth(values, weight: float = 0.9) -> list[float]:
    out, avg = [], None
    for i, v in enumerate(values):
        avg = v if avg is None else weight * avg + (1 - weight) * v
        out.append(avg)
    return out


def render_loss(history: LossHistory, width: int = 768, height: int = 432, smoothing: float = 0.9) -> np.ndarray:
    """(height, width, 3) uint8 image of the loss history."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 70, 20, 30, 50
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text((width // 2 - 40, 8), "Training loss", fill=(0, 0, 0), font=font)
    draw.text((width // 2 - 10, height - 20), "step", fill=(0, 0, 0), font=font)
    draw.text((8, y0 - 20), "loss", fill=(0, 0, 0), font=font)
    steps, losses = list(history.steps), list(history.losses)
    validation = [(s, v) for s, v in zip(history.val_steps, history.val_losses) if math.isfinite(v)]
    if not steps:
        draw.text((x0 + 20, (y0 + y1) // 2), "no steps yet", fill=(120, 120, 120), font=font)
        return np.asarray(img)
    shown = [v for v in losses if math.isfinite(v)] + [v for _, v in validation]
    lo, hi = (min(shown), max(shown)) if shown else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    s_lo, s_hi = steps[0], max(steps[-1], steps[0] + 1)

    def point(step, value):
        return (x0 + (step - s_lo) / (s_hi - s_lo) * (x1 - x0), y1 - (value - lo) / (hi - lo) * (y1 - y0))

    for i in range(5):   # tick labels
        value = lo + (hi - lo) * i / 4
        y = y1 - (y1 - y0) * i / 4
        draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
        draw.text((4, y - 6), f"{value:.4g}", fill=(0, 0, 0), font=font)
        step = s_lo + (s_hi - s_lo) * i / 4
        x = x0 + (x1 - x0) * i / 4
        draw.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
        draw.text((x - 10, y1 + 8), f"{step:.0f}", fill=(0, 0, 0), font=font)
    if len(steps) > 1:
        draw.line([point(s, v) for s, v in zip(steps, losses)], fill=(150, 180, 230), width=1)
        draw.line([point(s, v) for s, v in zip(steps, smooth(losses, smoothing))], fill=(20, 60, 200), width=2)
    else:
        x, y = point(steps[0], losses[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 60, 200))
    for step, value in validation:
        x, y = point(step, value)
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=VALIDATION_COLOUR)
    draw.text((x1 - 150, y0 + 6), "raw", fill=(150, 180, 230), font=font)
    draw.text((x1 - 110, y0 + 6), f"smoothed ({smoothing:g})", fill=(20, 60, 200), font=font)
    if validation:
        draw.ellipse((x1 - 150, y0 + 25, x1 - 144, y0 + 31), fill=VALIDATION_COLOUR)
        draw.text((x1 - 138, y0 + 22), "validation", fill=VALIDATION_COLOUR, font=font)
    return np.asarray(img)
