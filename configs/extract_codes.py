"""Code extraction: a trained tokenizer turns a dataset into token grids, once, for GPT training.

  python -m fvq_jax.main --config=configs/extract_codes.py:tokenizer=workdir/fvq_photos --workdir=workdir/photo_codes
      the default: the tokenizer run's own training data (for the default run: the nine built-in
      photos), 128 random training views of each;
  python -m fvq_jax.main --config=configs/extract_codes.py:imagenet,tokenizer=gs://bucket/fvq16k \
      --config.data.tfds_data_dir=<data_dir> --workdir=/data/fvq16k_codes
      the reference: ImageNet train (1,281,167 images), ten-crop of the 1.1x ADM center crop at 256.

`tokenizer` (a training run or an export directory) is required. The `data` block holds overrides: a
field left None takes the tokenizer's saved value (its training config's `data` block; `split` its
train_split), as configs/eval_tokenizer.py does. `augment` None means `random` for the built-in photos
(nine images: the views make the variety) and `tencrop` (the reference) for any dataset. Fields and the
output are described in fvq_jax/extraction/job.py; any field can be set with --config.<field>=<value>.
The fields are checked once, by fvq_jax/extraction/spec.py (the data block once merged with the tokenizer's).
"""

import ml_collections
from ml_collections import config_dict

from fvq_jax import config_lib, sharding

FLAGS = ("imagenet",)
# Short argument keys -> (config field, a value of the field's type).
KEYS = {
    "tokenizer": ("tokenizer", ""),
    "step": ("step", 0),
    "ema": ("use_ema", True),
    "augment": ("augment", "tencrop"),
    "crops": ("crops_per_image", 128),
    "seed": ("seed", 0),
    "images": ("num_images", 0),
    "batch": ("batch_size", 0),
    "shard": ("shard_size", 10_000),
    "data": ("data.source", "photos"),
    "split": ("data.split", "train"),
    "res": ("data.image_size", 256),
}

# The data fields extraction reads; None = the tokenizer's saved value.
DATA_FIELDS = {"source": str, "tfds_name": str, "tfds_data_dir": str, "folder": str, "split": str, "image_size": int,
               "train_crop": str, "max_resize_ratio": float, "flip": bool, "num_workers": int, "read_threads": int,
               "prefetch_buffer": int}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS, flags=FLAGS)


def base_config(flags: set[str]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "extract_codes"
    config.tokenizer = config_dict.placeholder(str)  # a training run or an export directory; required
    config.step = 0  # checkpoint step of a run; 0 = the latest
    config.use_ema = True  # the EMA weights when the run kept them, else the raw ones
    config.data = {name: config_dict.placeholder(kind) for name, kind in DATA_FIELDS.items()}
    config.augment = config_dict.placeholder(str)  # tencrop | center | random; None: see the docstring
    config.crop_range = 1.1  # tencrop: the ADM center crop's side is int(crop_range * image_size)
    config.crops_per_image = 128  # random: training views per image, each a grid
    config.seed = 0  # random: view k of source image i is drawn from numpy's default_rng([seed, i, k])
    # Images per batch, all processes together (each brings its grids); 0 = auto: about 640 views in all on
    # accelerators (64 ten-crop images), 64 per device on CPUs (6 ten-crop images; fvq_jax/extraction/spec.py).
    config.batch_size = 0
    config.num_images = 0  # the first N images of the split; 0 = all
    config.shard_size = 10_000  # source images per shard file
    config.progress_every = 10.0  # seconds between progress lines
    if "imagenet" in flags:
        config.data.update(source="tfds", tfds_name="imagenet2012", split="train", image_size=256, num_workers=16,
                           read_threads=4, prefetch_buffer=2)
        config.augment = "tencrop"
    # The devices present now, whatever mesh the tokenizer trained on.
    config.mesh = sharding.default_mesh_config()
    return config
