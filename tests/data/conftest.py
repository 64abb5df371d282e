"""Shared helpers for the data tests: a small data config and image folders written on the fly."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from fvq_jax import config_lib
from fvq_jax.data.spec import DataSpec

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tokenizer_config(arg: str = ""):
    """configs/tokenizer.py's get_config(arg)."""
    return config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config(arg)


def local_data_config(**overrides) -> DataSpec:
    """The default config's `data` block (sample photos), with overrides, resolved."""
    data = tokenizer_config().data
    data.update(overrides)
    return DataSpec.from_config(data, "data")


def write_jpegs(split_dir: pathlib.Path, per_class: list[int], size=(40, 30), seed=0) -> list[np.ndarray]:
    """class_<c>/img_<i>.jpg with per_class[c] noisy gradient images; returns the decoded pixels in sorted order."""
    rng = np.random.default_rng(seed)
    width, height = size
    decoded = []
    for c, count in enumerate(per_class):
        folder = split_dir / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            ramp = np.linspace(0, 200, width)[None, :, None] + np.linspace(0, 50, height)[:, None, None]
            pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
            path = folder / f"img_{i:03d}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            decoded.append(np.asarray(Image.open(path).convert("RGB")))
    return decoded


@pytest.fixture
def image_folder(tmp_path):
    """<tmp>/train with 12 classes x 1 image, <tmp>/validation with 3 classes x 3 images."""
    write_jpegs(tmp_path / "train", [1] * 12)
    write_jpegs(tmp_path / "validation", [3, 3, 3], seed=1)
    return tmp_path
