"""Write a small image folder of a second kind of image, from files already on disk: scikit-image's
greyscale textures, microscopy, astronomy and document scans (none of them among the sample photos).

Each image becomes one class. Training sees the left two thirds of each image; the validation split
holds square tiles of the right third, so evaluation measures images the tokenizer never saw:

  python -m fvq_jax.tools.sample_folder --out=workdir/textures
  python -m fvq_jax.main --config=configs/tokenizer.py:local,res=32 \\
      --config.data.source=folder --config.data.folder=workdir/textures --workdir=workdir/fvq_textures

The layout is the image-folder source's: <out>/train/<name>/<name>.png, <out>/validation/<name>/<tile>.png.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

# scikit-image data files (greyscale): textures, a microscopy image, the moon, a photo of coins, document scans.
IMAGES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png", "cell": "cell.png", "moon": "moon.png",
          "coins": "coins.png", "page": "page.png", "text": "text.png"}
MIN_TILE = 64  # validation tiles at least this big (the evaluation resizes them down, never up past it)

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "folder to write (<out>/train, <out>/validation)", required=True)


def skimage_data_dir() -> str:
    import skimage
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def split_image(pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """[H, W(, C)] -> (the left two thirds, square tiles of the right third: two per row of tiles, side
    at least MIN_TILE, one column when the third is narrower than two of them)."""
    width = pixels.shape[1]
    cut = width - width // 3
    train, held = pixels[:, :cut], pixels[:, cut:]
    side = held.shape[1] // 2 if held.shape[1] // 2 >= MIN_TILE else held.shape[1]
    if side < MIN_TILE or held.shape[0] < side:
        raise ValueError(f"image of {pixels.shape[:2]} is too small for {MIN_TILE}-pixel validation tiles")
    tiles = [held[r:r + side, c:c + side] for r in range(0, held.shape[0] - side + 1, side)
             for c in range(0, held.shape[1] - side + 1, side)]
    return train, tiles


def write_folder(out: str, data_dir: str | None = None) -> dict[str, int]:
    """Write the folder; returns {name: validation tiles}. Existing files are overwritten."""
    data_dir = data_dir or skimage_data_dir()
    tiles_per_image = {}
    for name, filename in IMAGES.items():
        path = os.path.join(data_dir, filename)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing: the folder is built from scikit-image's data files "
                                    f"(pip install scikit-image)")
        pixels = np.asarray(Image.open(path).convert("RGB"))
        train, tiles = split_image(pixels)
        for split, images in (("train", {name: train}), ("validation", {f"{name}_{i:02d}": t for i, t in enumerate(tiles)})):
            os.makedirs(os.path.join(out, split, name), exist_ok=True)
            for stem, image in images.items():
                Image.fromarray(image).save(os.path.join(out, split, name, f"{stem}.png"))
        tiles_per_image[name] = len(tiles)
    return tiles_per_image


def main(argv):
    del argv
    tiles = write_folder(FLAGS.out)
    print(f"wrote {FLAGS.out}: {len(tiles)} training images (one class each), "
          f"{sum(tiles.values())} validation tiles ({', '.join(f'{k} {v}' for k, v in tiles.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(app.run(main))
