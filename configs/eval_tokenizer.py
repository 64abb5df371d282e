"""Evaluation of a trained tokenizer run.

  python -m fvq_jax.main --config=configs/eval_tokenizer.py --workdir=RUN_DIR
      the run's own evaluation (for the default photo run: the held-out photo crops at the
      resolution it trained at) on its latest checkpoint, with the EMA weights if it kept them;
  python -m fvq_jax.main --config=configs/eval_tokenizer.py:imagenet --workdir=RUN_DIR
      the paper protocol: ImageNet validation, all 50,000 images, 256x256 ADM center crop, rFID;
  python -m fvq_jax.main --config=configs/eval_tokenizer.py:step=120,ema=false,res=128 --workdir=RUN_DIR

Writes RUN_DIR/eval/step_N/{metrics.json, reconstructions.png, code_usage.png}; metrics.json
records the protocol (data, split, resolution, image count, crop, weights, step).

The `data` and `eval` blocks hold overrides: a field left None takes the value saved in the
run's checkpoint (its training config's `data` and `eval` blocks), so with no argument the
checkpoint is evaluated exactly as the run's final evaluation would. `eval.step` (0 = latest)
and `eval.use_ema` are the eval-only fields. Any field can also be set with --config.<field>=<value>.
"""

import ml_collections
from ml_collections import config_dict

from fvq_jax import config_lib, sharding

FLAGS = ("imagenet",)
# Short argument keys -> (config field, a value of the field's type).
KEYS = {
    "step": ("eval.step", 0),
    "ema": ("eval.use_ema", True),
    "images": ("eval.num_images", 0),
    "batch": ("eval.batch_size", 64),
    "stats": ("eval.reference_stats", ""),
    "data": ("data.source", "photos"),
    "split": ("data.eval_split", "validation"),
    "res": ("data.image_size", 256),
}

# Fields of the run's data block that the evaluation reads; None = the run's value.
DATA_FIELDS = {"source": str, "tfds_name": str, "tfds_data_dir": str, "folder": str, "eval_split": str,
               "image_size": int, "num_workers": int, "read_threads": int, "prefetch_buffer": int}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS, flags=FLAGS)


def base_config(flags: set[str]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "eval_tokenizer"
    config.data = {name: config_dict.placeholder(kind) for name, kind in DATA_FIELDS.items()}
    config.eval = dict(
        step=0,  # checkpoint step; 0 = the latest
        use_ema=True,  # the EMA weights when the run kept them, else the raw ones
        batch_size=config_dict.placeholder(int),  # global
        num_images=config_dict.placeholder(int),  # 0 = the whole eval split
        metrics=config_dict.placeholder(tuple),  # of psnr, ssim, lpips, usage, rfid
        reference_stats=config_dict.placeholder(str),  # .npz of the real images' Inception statistics; '' = cached
    )
    if "imagenet" in flags:
        config.data.update(source="tfds", tfds_name="imagenet2012", eval_split="validation", image_size=256)
        config.eval.update(num_images=50_000, metrics=("psnr", "ssim", "lpips", "usage", "rfid"))
    # The devices present now, whatever mesh the run trained on.
    config.mesh = sharding.default_mesh_config()
    return config
