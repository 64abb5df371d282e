"""tools/sample_folder: the second image source (scikit-image's greyscale textures, microscopy, scans) and the
digits folder (scikit-learn's digits)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fvq_jax.data.sources import FolderSource, load_image
from fvq_jax.tools import sample_folder
from tests.conftest import ROOT, subprocess_env


def test_split_keeps_validation_pixels_out_of_training():
    pixels = np.arange(200 * 300).reshape(200, 300).astype(np.int64)
    train, tiles = sample_folder.split_image(pixels)
    np.testing.assert_array_equal(train, pixels[:, :200])
    # The third is 100 wide: two 50-pixel tiles would be under MIN_TILE, so one column of 100-pixel tiles.
    assert len(tiles) == 2
    np.testing.assert_array_equal(tiles[1], pixels[100:200, 200:300])


def test_split_tiles_are_the_right_third():
    pixels = np.random.default_rng(0).integers(0, 255, (300, 390, 3), np.uint8)
    train, tiles = sample_folder.split_image(pixels)
    assert train.shape == (300, 260, 3)
    side = 65
    assert len(tiles) == 2 * (300 // side) and all(t.shape == (side, side, 3) for t in tiles)
    np.testing.assert_array_equal(tiles[0], pixels[:side, 260:260 + side])
    np.testing.assert_array_equal(tiles[3], pixels[side:2 * side, 260 + side:260 + 2 * side])
    with pytest.raises(ValueError, match="too small"):
        sample_folder.split_image(pixels[:50, :150])


def test_folder_reads_back_through_the_image_folder_source(tmp_path):
    tiles = sample_folder.write_folder(str(tmp_path))
    train, validation = FolderSource(str(tmp_path), "train"), FolderSource(str(tmp_path), "validation")
    assert train.classes == sorted(sample_folder.IMAGES) == validation.classes
    assert len(train) == len(sample_folder.IMAGES) and len(validation) == sum(tiles.values()) >= 60
    image = load_image(validation[0])
    assert image.mode == "RGB" and min(image.size) >= sample_folder.MIN_TILE


def test_the_command_writes_the_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fvq_jax.tools.sample_folder", f"--out={tmp_path}"], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    validation = FolderSource(str(tmp_path), "validation")
    assert (f"wrote {tmp_path}: {len(sample_folder.IMAGES)} training images (one class each), {len(validation)} "
            "validation tiles") in result.stdout


def test_digits_folder_through_main(tmp_path):
    """`python -m fvq_jax.tools.sample_folder --kind=digits`: scikit-learn's digits as 32x32 colour images, one
    class per digit, every tenth digit held out for validation."""
    out = tmp_path / "digits"
    result = subprocess.run([sys.executable, "-m", "fvq_jax.tools.sample_folder", "--kind=digits", "--variants=2",
                             f"--out={out}"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    digits = load_digits()
    held_out = np.arange(len(digits.target)) % 10 == 9
    assert f"wrote {out}: {2 * (~held_out).sum()} training and {2 * held_out.sum()} validation images" in result.stdout
    for split, indices in (("train", np.flatnonzero(~held_out)), ("validation", np.flatnonzero(held_out))):
        source = FolderSource(str(out), split)
        assert source.classes == [str(d) for d in range(10)]
        records = [source[i] for i in range(len(source))]
        index = [int(os.path.basename(r["name"]).split("_")[0]) for r in records]
        assert sorted(index) == sorted(np.repeat(indices, 2))  # each digit twice, in its own split only
        assert [r["label"] for r in records] == [int(digits.target[i]) for i in index]
    first = [np.asarray(load_image(FolderSource(str(out), "train")[i])) for i in range(2)]  # digit 0, variants 0, 1
    for pixels, variant in zip(first, range(2)):
        assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
        np.testing.assert_array_equal(pixels, sample_folder.draw_digit(digits.images[0], np.random.default_rng(
            [0, 0, variant])))  # the seed and position alone decide an image (PNG is lossless)
        value = pixels.max(axis=-1).astype(int)  # HSV value: ink and paper are one light and one dark
        assert np.abs(value - value[0, 0]).max() >= 0.35 * 255
    assert not np.array_equal(first[0], first[1])  # variants differ
