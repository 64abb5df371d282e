"""Crops and flip against numpy / PIL references written out here."""

import math

import numpy as np
import pytest
from PIL import Image

from fvq_jax.data import transforms


def noise_image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_box_halving_is_a_2x2_mean():
    # 32x48 at S=16: one exact halving (min side 32 >= 2 * 16), no bicubic change, centre 16x16.
    image = noise_image(32, 48)
    pixels = np.asarray(image).astype(np.float64)
    pixels = np.floor(pixels.reshape(16, 2, 24, 2, 3).mean(axis=(1, 3)) + 0.5)
    expected = pixels[:, 4:20]  # 16 x 24 -> left offset (24 - 16) // 2
    out = transforms.center_crop(image, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_allclose(out, expected, atol=1)  # PIL's fixed-point box filter rounds within 1


@pytest.mark.parametrize("height,width,size", [(45, 70, 32), (70, 45, 32), (100, 150, 64)])
def test_center_crop_geometry_on_a_ramp(height, width, size):
    # Bicubic resizing keeps a linear ramp linear, so every output pixel is known in closed form:
    # output pixel centre j maps to input coordinate (left + j + 0.5) / scale - 0.5.
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = np.stack([2.0 * xs, 2.0 * ys, xs + ys], axis=-1)
    out = transforms.center_crop(Image.fromarray(ramp.astype(np.uint8)), size).astype(np.float64)
    scale = size / min(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    jj, ii = np.meshgrid(np.arange(size), np.arange(size))
    x_in = (left + jj + 0.5) * width / new_w - 0.5
    y_in = (top + ii + 0.5) * height / new_h - 0.5
    expected = np.stack([2.0 * x_in, 2.0 * y_in, x_in + y_in], axis=-1)
    inner = (slice(3, -3), slice(3, -3))  # away from the clamped borders
    np.testing.assert_allclose(out[inner], expected[inner], atol=1.01)


def reference_ten_crop(image: Image.Image, size: int) -> list[np.ndarray]:
    """torchvision's TenCrop on a PIL image, written out with PIL: F.crop is Image.crop((left, top, right, bottom)),
    the center's top-left is int(round((side - size) / 2.0)), the second five come from the mirrored image."""
    def five(im):
        w, h = im.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        boxes = [(0, 0), (w - size, 0), (0, h - size), (w - size, h - size), (left, top)]
        return [np.asarray(im.crop((x, y, x + size, y + size))) for x, y in boxes]

    return five(image) + five(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


# 17 - 16 = 1 and 19 - 16 = 3: the center offsets 0.5 and 1.5 round half to even (0 and 2), as torchvision's;
# 281 = int(1.1 * 256), the reference's ten-crop of ImageNet.
@pytest.mark.parametrize("height,width,size", [(17, 17, 16), (19, 19, 16), (19, 23, 16), (30, 21, 16), (281, 281, 256)])
def test_ten_crop_matches_torchvision_geometry(height, width, size):
    image = noise_image(height, width, seed=height + width)
    out = transforms.ten_crop(np.asarray(image), size)
    assert out.shape == (10, size, size, 3) and out.dtype == np.uint8
    assert len(transforms.TEN_CROP_VIEWS) == 10
    for view, (got, want) in enumerate(zip(out, reference_ten_crop(image, size))):
        np.testing.assert_array_equal(got, want, err_msg=transforms.TEN_CROP_VIEWS[view])
    # The mirrored half is the flip augmentation: a mirrored corner of the mirror image is the opposite
    # corner of the image (so flipping all ten again would only repeat them).
    mirror = out[:, :, ::-1]
    for corner, opposite in ((0, 6), (1, 5), (2, 8), (3, 7)):
        np.testing.assert_array_equal(mirror[opposite], out[corner])
    with pytest.raises(ValueError, match="ten_crop"):
        transforms.ten_crop(np.asarray(image), max(height, width) + 1)


def reference_random_crop(image, size, ratio, rng):
    """ADM-style random crop written directly with PIL: draws short side, top, left in that order."""
    short = rng.integers(size, math.ceil(round(size * ratio, 6)) + 1)
    while min(image.size) >= 2 * short:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), Image.BOX)
    factor = short / min(image.size)
    image = image.resize((round(image.size[0] * factor), round(image.size[1] * factor)), Image.BICUBIC)
    arr = np.array(image)
    top = rng.integers(0, arr.shape[0] - size + 1)
    left = rng.integers(0, arr.shape[1] - size + 1)
    return arr[top:top + size, left:left + size], short


def assert_nearly_equal(out, expected):
    """Equal but for rare off-by-one roundings: the crop is resized through a PIL box, whose float
    coordinates differ from the whole-image resize's in the last bits."""
    assert out.shape == expected.shape and out.dtype == np.uint8
    difference = np.abs(out.astype(int) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_random_resize_crop_matches_reference_and_covers_the_short_side_range():
    image = noise_image(75, 100, seed=3)
    shorts = set()
    for seed in range(60):
        out = transforms.random_resize_crop(image, 16, 1.25, np.random.default_rng(seed))
        expected, short = reference_random_crop(image, 16, 1.25, np.random.default_rng(seed))
        assert_nearly_equal(out, expected)
        shorts.add(int(short))
    assert shorts == set(range(16, 21))  # [S, 1.25 S]: every value drawn, nothing outside
    assert transforms.max_short_side(256, 1.25) == 320 and transforms.max_short_side(100, 1.1) == 110


def test_random_resize_crop_halves_large_images_first():
    image = noise_image(300, 400, seed=4)  # short side 300 >= 2 * 20: box halving happens
    for seed in range(5):
        out = transforms.random_resize_crop(image, 16, 1.25, np.random.default_rng(seed))
        assert_nearly_equal(out, reference_random_crop(image, 16, 1.25, np.random.default_rng(seed))[0])


def test_random_zoom_crop_matches_reference():
    image = noise_image(90, 120, seed=5)
    sides = []
    for seed in range(30):
        out = transforms.random_zoom_crop(image, 16, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        side = int(round(math.exp(rng.uniform(math.log(16), math.log(90)))))
        top, left = rng.integers(0, 90 - side + 1), rng.integers(0, 120 - side + 1)
        square = image.crop((left, top, left + side, top + side))
        while min(square.size) >= 32:
            square = square.resize((square.size[0] // 2, square.size[1] // 2), Image.BOX)
        expected = np.asarray(square.resize((16, 16), Image.BICUBIC))
        np.testing.assert_array_equal(out, expected)
        sides.append(side)
    assert min(sides) < 30 and max(sides) > 60  # both close-ups and wide views


def test_random_flip_is_a_fair_mirror():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    flips = 0
    for seed in range(400):
        out = transforms.random_flip(pixels, np.random.default_rng(seed))
        flipped = np.random.default_rng(seed).random() < 0.5
        np.testing.assert_array_equal(out, pixels[:, ::-1] if flipped else pixels)
        flips += flipped
    assert 160 < flips < 240

