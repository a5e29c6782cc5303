"""Generated training images for tests and the demo (no data is downloaded)."""
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, sizes, captions=True, seed=0, prefix="img") -> list[Path]:
    """Random RGB PNGs (with .txt captions) of the given (width, height) sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        # smooth colour fields, so a VAE gives distinct but learnable latents
        base = rng.random(3)
        gy, gx = np.mgrid[0:h, 0:w]
        img = np.stack([(base[c] + 0.5 * np.sin(gx / (5 + 3 * c + i) + gy / (7 + i))) % 1.0 for c in range(3)], -1)
        path = folder / f"{prefix}{i}.png"
        Image.fromarray((img * 255).astype(np.uint8)).save(path)
        if captions:
            (folder / f"{prefix}{i}.txt").write_text(f"a photo of pattern {i}")
        paths.append(path)
    return paths
