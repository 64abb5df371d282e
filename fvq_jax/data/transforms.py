"""Image transforms: PIL in, uint8 [S, S, 3] out; randomness only from the `rng` argument.

Images stay uint8 through the input pipeline (4x less host memory and transfer than float32);
`value_range.to_model_range` maps them to [-1, 1] on the device, inside the jitted step.

Random draws, in order (so a resumed or re-run pipeline crops identically):
  random_resize_crop: short side, top, left;  random_zoom_crop: side, top, left;  random_flip: flip.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def _halve(image: Image.Image, short: int) -> Image.Image:
    """Box-filter halvings while the short side is >= 2 * short (cheap and alias-free)."""
    while min(image.size) >= 2 * short:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    return image


def _short_side_shape(image: Image.Image, short: int) -> tuple[int, int]:
    """(height, width) once the short side is `short`, the long side rounded to the nearest pixel."""
    scale = short / min(image.size)
    return round(image.height * scale), round(image.width * scale)


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so that the short side is `size`, the ADM (guided-diffusion) way: box-filter halvings
    while the short side is >= 2 * size, then one bicubic resize."""
    image = _halve(image, size)
    height, width = _short_side_shape(image, size)
    return image.resize((width, height), resample=Image.BICUBIC)


def _resized_crop(image: Image.Image, shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    """image.resize(shape) [top:top + size, left:left + size], computing only the crop's pixels.

    PIL maps output pixel i of `box` to input coordinate box_left + (i + 0.5) * box_width / size and
    clips its filter at the image (not the box) border, so a box with the full resize's scale gives
    that resize's pixels: half the bicubic work of resizing the whole image at ImageNet sizes.
    """
    sy, sx = image.height / shape[0], image.width / shape[1]
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return np.asarray(image.resize((size, size), resample=Image.BICUBIC, box=box))


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """Evaluation crop (ADM's center_crop_arr convention): short side to `size`, central size x size.

    Returns: uint8 [size, size, 3].
    """
    image = _halve(image, size)
    shape = _short_side_shape(image, size)
    return _resized_crop(image, shape, (shape[0] - size) // 2, (shape[1] - size) // 2, size)


# TenCrop's views in torchvision's order: the five of the image, then the same five of its mirror image.
TEN_CROP_VIEWS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
                  "flipped_top_left", "flipped_top_right", "flipped_bottom_left", "flipped_bottom_right",
                  "flipped_center")


def ten_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision's TenCrop(size) of pixels [H, W, C]: TEN_CROP_VIEWS, uint8 [10, size, size, C].

    The corners are flush with the image's edges; the center crop starts at round((H - size) / 2) and
    round((W - size) / 2) (Python's round, half to even, as torchvision's center_crop), so on the
    mirrored image it can sit one pixel off the mirrored center crop of the original.
    """
    height, width = pixels.shape[:2]
    if min(height, width) < size:
        raise ValueError(f"ten_crop({size}) of a {height}x{width} image")

    def five(image: np.ndarray) -> list[np.ndarray]:
        top, left = round((height - size) / 2), round((width - size) / 2)
        corners = [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), (top, left)]
        return [image[y:y + size, x:x + size] for y, x in corners]

    return np.stack(five(pixels) + five(pixels[:, ::-1]))


def max_short_side(size: int, max_resize_ratio: float) -> int:
    """The largest short side of random_resize_crop: ceil(ratio * size), e.g. 320 for 256 and 1.25."""
    return math.ceil(round(size * max_resize_ratio, 6))


def random_resize_crop(image: Image.Image, size: int, max_resize_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """The reference training crop: short side to an integer drawn from [size, ceil(ratio * size)] (ADM
    resize), then a uniformly placed size x size crop.

    Returns: uint8 [size, size, 3].
    """
    short = int(rng.integers(size, max_short_side(size, max_resize_ratio) + 1))
    image = _halve(image, short)
    shape = _short_side_shape(image, short)
    top = int(rng.integers(0, shape[0] - size + 1))
    left = int(rng.integers(0, shape[1] - size + 1))
    return _resized_crop(image, shape, top, left, size)


def random_zoom_crop(image: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A square of log-uniform side in [min(size, short side), short side], uniformly placed, resized to size.

    For a handful of large photos at a small `size`: crops range from whole-photo views to
    pixel-level detail, so a small tokenizer sees varied content rather than the same few thumbnails.
    Returns: uint8 [size, size, 3].
    """
    short = min(image.size)
    low = min(size, short)
    side = int(round(math.exp(rng.uniform(math.log(low), math.log(short)))))
    top = int(rng.integers(0, image.height - side + 1))
    left = int(rng.integers(0, image.width - side + 1))
    square = image.crop((left, top, left + side, top + side))
    return np.asarray(resize_short_side(square, size))


def random_flip(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right with probability 1/2.  pixels: [H, W, C]."""
    return pixels[:, ::-1] if rng.random() < 0.5 else pixels
