"""The extraction config (configs/extract_codes.py), resolved once: `ExtractionSpec`, then its data block.

Two steps, because the data block can only be judged against the tokenizer: `ExtractionSpec.from_config`
checks every field of the extraction itself (what `tasks.resolve` runs, needing no tokenizer, data or
devices); `ExtractionSpec.resolve_data` merges the tokenizer's saved `data` block with the config's overrides
and checks the result once, as a `DataSpec` (fvq_jax/data/spec.py). Nothing below checks a field again.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fvq_jax import config_lib
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.transforms import TEN_CROP_VIEWS
from fvq_jax.sharding import MeshSpec

AUGMENTS = ("tencrop", "center", "random")
# batch_size 0 picks the images per batch from the views they make: about AUTO_VIEWS in all on accelerators (64
# ten-crop images, the reference's batch), about AUTO_VIEWS_PER_CPU per device on CPUs, whose encoder runs fastest
# on batches whose activations stay in its caches (the CPU time per view is lowest at 40-80 views, and under load
# the wall time of 640 views per batch is twice that of 10: fvq_jax/benchmarks/extraction.py).
AUTO_VIEWS = 640
AUTO_VIEWS_PER_CPU = 64

# The data fields an extraction needs from the tokenizer's saved block or the config, by source and by augment;
# any other field, when neither gives it, takes FALLBACKS: a value this extraction never reads (a folder's
# tfds_name, ten-crop's train_crop) or how to read rather than what (threads, worker processes).
NEEDED = ("source", "split", "image_size")
NEEDED_BY_SOURCE = {"tfds": ("tfds_name",), "folder": ("folder",), "photos": ("train_split", "eval_split")}
NEEDED_BY_AUGMENT = {"random": ("train_crop", "max_resize_ratio", "flip")}
FALLBACKS = dict(tfds_name="", tfds_data_dir="", folder="", train_split="", eval_split="", train_crop="short_side",
                 max_resize_ratio=1.0, flip=False, num_workers=0, read_threads=4, prefetch_buffer=2)


def default_augment(source: str) -> str:
    """augment=None: random views of the nine built-in photos, the reference's ten-crop of any dataset."""
    return "random" if source == "photos" else "tencrop"


@dataclasses.dataclass(frozen=True)
class ExtractionSpec(config_lib.Spec):
    """configs/extract_codes.py's fields (described there), checked, and its mesh; `data` holds the data overrides
    (None = the tokenizer's value), judged by `resolve_data`."""

    tokenizer: str  # a training run or an export directory
    mesh: MeshSpec
    step: int = 0  # 0 = the newest checkpoint
    use_ema: bool = True
    augment: str | None = None  # tencrop | center | random; None: default_augment(data.source)
    crop_range: float = 1.1
    crops_per_image: int = 128
    seed: int = 0
    batch_size: int = 0  # images per batch, all processes together; 0 = auto (AUTO_VIEWS, AUTO_VIEWS_PER_CPU)
    num_images: int = 0  # the first N images of the split; 0 = all
    shard_size: int = 10_000
    progress_every: float = 10.0  # seconds between progress lines
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        config_lib.require(isinstance(self.tokenizer, str) and bool(self.tokenizer), "tokenizer",
                           "must name a training run or an export directory, e.g. tokenizer=workdir/fvq_photos")
        config_lib.require_number(self.step, "step", strict=False, integer=True)
        config_lib.require(isinstance(self.use_ema, bool), "use_ema", f"must be true or false, got {self.use_ema!r}")
        config_lib.require(self.augment is None or self.augment in AUGMENTS, "augment",
                           f"{self.augment!r} is not one of {list(AUGMENTS)} (or None)")
        config_lib.require_number(self.crop_range, "crop_range", minimum=1.0, strict=False)
        config_lib.require_number(self.crops_per_image, "crops_per_image", integer=True)
        config_lib.require_number(self.seed, "seed", strict=False, integer=True)
        config_lib.require_number(self.batch_size, "batch_size", strict=False, integer=True)
        config_lib.require_number(self.num_images, "num_images", strict=False, integer=True)
        config_lib.require_number(self.shard_size, "shard_size", integer=True)
        config_lib.require_number(self.progress_every, "progress_every", strict=False)

    def resolve_data(self, saved: Mapping[str, Any]) -> tuple[DataSpec, str, str]:
        """(the data block, the split, the augment) of this extraction: the tokenizer's saved `data` block
        `saved` overridden by the fields set here, `split` defaulting to its train_split; ConfigError naming a
        needed field that neither gives (an imported tokenizer records none) or a bad value."""
        given = {**saved, **{k: v for k, v in self.data.items() if v is not None}}
        given.setdefault("split", saved.get("train_split"))
        source = given.get("source")
        augment = self.augment or default_augment(source)
        for name in NEEDED + NEEDED_BY_SOURCE.get(source, ()) + NEEDED_BY_AUGMENT.get(augment, ()):
            config_lib.require(given.get(name) is not None, f"data.{name}",
                               f"{self.tokenizer} records no data.{name} (an imported tokenizer?): set it")
        resolved = {**FALLBACKS, **{k: v for k, v in given.items() if v is not None}}
        return DataSpec.from_config(resolved, "data"), given["split"], augment

    def views_per_image(self, augment: str) -> int:
        """The code grids each image gives (A): 10 for ten-crop, 1 for the center crop, crops_per_image."""
        return {"tencrop": len(TEN_CROP_VIEWS), "center": 1, "random": self.crops_per_image}[augment]

    def images_per_batch(self, views: int, multiple: int, cpu_devices: int = 0) -> int:
        """batch_size, or (0) the largest multiple of `multiple` whose `views` each make at most AUTO_VIEWS views
        (AUTO_VIEWS_PER_CPU per device when the devices are `cpu_devices` CPUs), at least `multiple`."""
        if self.batch_size:
            return self.batch_size
        target = AUTO_VIEWS_PER_CPU * cpu_devices if cpu_devices else AUTO_VIEWS
        return max(1, target // views // multiple) * multiple
