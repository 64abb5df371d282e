"""The `data` block of a config, resolved once: which images, at what size, read and cropped how."""

from __future__ import annotations

import dataclasses

from fvq_jax import config_lib

SOURCES = ("tfds", "folder", "photos")
TRAIN_CROPS = ("short_side", "zoom")


@dataclasses.dataclass(frozen=True)
class DataSpec(config_lib.Spec):
    """A checked `data` block (configs/tokenizer.py describes each field); `DataSpec.from_config(config.data,
    "data")` names a bad field as `data.<field>`."""

    source: str  # tfds | folder | photos
    tfds_name: str
    tfds_data_dir: str
    folder: str  # <folder>/<split>/<class>/*
    train_split: str
    eval_split: str
    image_size: int
    train_crop: str  # short_side | zoom
    max_resize_ratio: float
    flip: bool
    num_workers: int
    read_threads: int
    prefetch_buffer: int

    def __post_init__(self):
        config_lib.require_choice(self.source, "source", SOURCES)
        config_lib.require(self.source != "folder" or bool(self.folder), "folder",
                           "must be set when data.source='folder'")
        config_lib.require_choice(self.train_crop, "train_crop", TRAIN_CROPS)
        config_lib.require_number(self.image_size, "image_size", integer=True)
        config_lib.require_number(self.max_resize_ratio, "max_resize_ratio", minimum=1.0, strict=False)
        config_lib.require(isinstance(self.flip, bool), "flip", f"must be true or false, got {self.flip!r}")
        config_lib.require_number(self.num_workers, "num_workers", strict=False, integer=True)
        config_lib.require_number(self.read_threads, "read_threads", strict=False, integer=True)
        config_lib.require_number(self.prefetch_buffer, "prefetch_buffer", integer=True)

    @property
    def name(self) -> str:
        """The dataset's name as reports give it: the TFDS name, the folder, or 'photos'."""
        return {"tfds": self.tfds_name, "folder": self.folder}.get(self.source, self.source)
