"""The views extraction encodes: one source record -> its A crops, uint8 [A, S, S, 3] (a grain transform).

  tencrop  the reference (LlamaGen's extract_codes_c2i --ten-crop): the ADM center crop to
           int(crop_range * S) (281 for S = 256), then torchvision's TenCrop(S), A = 10 in the order of
           transforms.TEN_CROP_VIEWS: the four corners and the center, then the same five of the mirrored
           crop. The mirrored half is the flip augmentation: mirroring all ten again would only repeat them
           (a mirrored corner of the crop is the opposite corner of the mirrored crop, pixel for pixel);
  center   the ADM center crop at S, A = 1;
  random   `crops_per_image` training views (data.train_crop and data.flip, as the tokenizer trained),
           view k of source image i drawn from numpy's default_rng([seed, i, k]), A = crops_per_image.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from fvq_jax.data.pipeline import TrainExample
from fvq_jax.data.sources import Record
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.transforms import center_crop, ten_crop
from fvq_jax.data.unreadable import Unreadable, read_image


PADDING: Record = {"padding": True}  # a record that fills the last batches; never written


@dataclasses.dataclass(frozen=True)
class Views(grain.transforms.Map):
    """record -> {'views': uint8 [A, S, S, 3], 'label', 'index', 'mask', 'skipped'}. PADDING (index -1) and
    unreadable records give zeros with mask False; an unreadable one names itself in 'skipped'."""
    augment: str
    image_size: int
    num_views: int
    crop_range: float = 1.1
    seed: int = 0
    train_view: TrainExample | None = None  # random: the training transform

    def views(self, image: Image.Image, index: int) -> np.ndarray:
        size = self.image_size
        if self.augment == "center":
            return center_crop(image, size)[None]
        if self.augment == "tencrop":
            return ten_crop(center_crop(image, int(self.crop_range * size)), size)
        return np.stack([self.train_view.view(image, np.random.default_rng([self.seed, index, k]))
                         for k in range(self.num_views)])

    def map(self, record: Record) -> dict[str, Any]:
        image = None if "padding" in record else read_image(record)
        valid = image is not None and not isinstance(image, Unreadable)
        blank = np.zeros((self.num_views, self.image_size, self.image_size, 3), np.uint8)
        return {
            "views": self.views(image, record["index"]) if valid else blank,
            "label": np.int32(record["label"] if valid else 0),
            "index": np.int32(record.get("index", -1)),
            "mask": np.bool_(valid),
            "skipped": image.entry() if isinstance(image, Unreadable) else "",
        }


def make_views(data: DataSpec, augment: str, num_views: int, crop_range: float, seed: int) -> Views:
    train_view = None
    if augment == "random":
        train_view = TrainExample(data.image_size, data.train_crop, data.max_resize_ratio, data.flip)
    return Views(augment, data.image_size, num_views, crop_range, seed, train_view)
