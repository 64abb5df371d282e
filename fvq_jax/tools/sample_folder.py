"""Write a small labelled image folder from data that installs with pip (no download), in the image-folder
source's layout <out>/train/<class>/*.png, <out>/validation/<class>/*.png.

--kind=textures (default): a second kind of image, scikit-image's greyscale textures, microscopy, astronomy and
document scans (none of them among the sample photos). Each image becomes one class. Training sees the left two
thirds of each image; the validation split holds square tiles of the right third, so evaluation measures images
the tokenizer never saw:

  python -m fvq_jax.tools.sample_folder --out=workdir/textures
  python -m fvq_jax.main --config=configs/tokenizer.py:local,res=32 \\
      --config.data.source=folder --config.data.folder=workdir/textures --workdir=workdir/fvq_textures

--kind=digits: a dataset-sized folder of 10 classes, scikit-learn's 1,797 handwritten digits (8 x 8, 17 grey
levels) drawn as 32 x 32 colour images, `--variants` per digit (default 4: 6,472 training and 716 validation
images): each variant scaled, rotated and shifted a little and drawn in its own ink and paper colours (one light
and one dark), all drawn from numpy's default_rng([seed, digit index, variant]). Classes "0" ... "9" (label =
digit); every tenth digit of the set (index % 10 == 9) is held out for validation, so no validation image is a
variant of a training one. `--per_class=N` keeps only the first N digits of each class in each split (a few
images per class, for smoke runs and tests):

  python -m fvq_jax.tools.sample_folder --kind=digits --out=workdir/digits
"""

from __future__ import annotations

import colorsys
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image

# scikit-image data files (greyscale): textures, a microscopy image, the moon, a photo of coins, document scans.
IMAGES = {"brick": "brick.png", "grass": "grass.png", "gravel": "gravel.png", "cell": "cell.png", "moon": "moon.png",
          "coins": "coins.png", "page": "page.png", "text": "text.png"}
MIN_TILE = 64  # validation tiles at least this big (the evaluation resizes them down, never up past it)

DIGIT_SIZE = 32  # pixels of a digit image
HELD_OUT = 10  # every HELD_OUT-th digit (index % HELD_OUT == HELD_OUT - 1) is a validation digit

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "folder to write (<out>/train, <out>/validation); required")
flags.DEFINE_enum("kind", "textures", ["textures", "digits"], "which images (see the module docstring)")
flags.DEFINE_integer("variants", 4, "digits: images drawn from each of the 1,797 digits")
flags.DEFINE_integer("seed", 0, "digits: seed of the variants' placement and colours")
flags.DEFINE_integer("per_class", 0, "digits: at most this many digits of each class in each split; 0 = all")


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


def draw_digit(levels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One variant of a digit: levels [8, 8] in 0 ... 16 (scikit-learn's digits) -> uint8 [32, 32, 3].

    Draws, in order: scale, angle, shift (x, y), which of ink and paper is light, the two hues, the two
    saturations, the two values.
    """
    scale, angle = rng.uniform(0.8, 1.15), rng.uniform(-15.0, 15.0)
    shift = rng.integers(-3, 4, 2)
    side = round(0.75 * DIGIT_SIZE * scale)
    ink = Image.fromarray(np.round(levels * (255 / 16)).astype(np.uint8), "L").resize((side, side), Image.BICUBIC)
    ink = ink.rotate(angle, resample=Image.BICUBIC, expand=True)
    canvas = Image.new("L", (DIGIT_SIZE, DIGIT_SIZE), 0)
    canvas.paste(ink, ((DIGIT_SIZE - ink.width) // 2 + int(shift[0]), (DIGIT_SIZE - ink.height) // 2 + int(shift[1])))
    alpha = np.asarray(canvas, np.float32)[..., None] / 255
    light_paper = rng.random() < 0.5
    hues, saturations = rng.uniform(0.0, 1.0, 2), (rng.uniform(0.2, 0.8), rng.uniform(0.5, 1.0))
    light, dark = rng.uniform(0.75, 1.0), rng.uniform(0.05, 0.35)  # one light and one dark: the digit stays legible
    paper = np.array(colorsys.hsv_to_rgb(hues[0], saturations[0], light if light_paper else dark))
    ink_colour = np.array(colorsys.hsv_to_rgb(hues[1], saturations[1], dark if light_paper else light))
    return np.round(255 * (paper * (1 - alpha) + ink_colour * alpha)).astype(np.uint8)


def write_digits(out: str, variants: int, seed: int = 0, per_class: int = 0) -> dict[str, int]:
    """Write the digits folder (see the module docstring): `variants` images of each digit, of the first
    `per_class` digits of each class in each split (0: all); returns {split: images written}."""
    from sklearn.datasets import load_digits  # ships its data: no download

    digits = load_digits()
    counts = {"train": 0, "validation": 0}
    for label in range(10):
        for split in counts:
            os.makedirs(os.path.join(out, split, str(label)), exist_ok=True)
    taken = np.zeros((2, 10), int)  # digits written per split (train, validation) and class
    for index, (levels, label) in enumerate(zip(digits.images, digits.target)):
        held_out = index % HELD_OUT == HELD_OUT - 1
        if per_class and taken[int(held_out), label] == per_class:
            continue
        taken[int(held_out), label] += 1
        split = "validation" if held_out else "train"
        for variant in range(variants):
            pixels = draw_digit(levels, np.random.default_rng([seed, index, variant]))
            Image.fromarray(pixels).save(os.path.join(out, split, str(label), f"{index:04d}_{variant}.png"))
            counts[split] += 1
    return counts


def main(argv):
    del argv
    if FLAGS.kind == "digits":
        counts = write_digits(FLAGS.out, FLAGS.variants, FLAGS.seed, FLAGS.per_class)
        print(f"wrote {FLAGS.out}: {counts['train']} training and {counts['validation']} validation images of "
              f"10 digits, {DIGIT_SIZE}x{DIGIT_SIZE}")
        return 0
    tiles = write_folder(FLAGS.out)
    print(f"wrote {FLAGS.out}: {len(tiles)} training images (one class each), "
          f"{sum(tiles.values())} validation tiles ({', '.join(f'{k} {v}' for k, v in tiles.items())})")
    return 0


if __name__ == "__main__":
    flags.mark_flag_as_required("out")  # here, not at import: the extraction benchmark imports write_digits
    sys.exit(app.run(main))
