"""Sample images from a trained GPT run (class-conditional, CFG), decoded by its tokenizer.

  python -m fvq_jax.main --config=configs/sample.py --workdir=workdir/gpt_photos
      the default run's samples: 64 per class, CFG 2.0, in workdir/gpt_photos/samples/<name>/;
  python -m fvq_jax.main --config=configs/sample.py:imagenet,cfg=1.75 --workdir=gs://.../gpt_l
      the gFID protocol: 50,000 samples (50 per ImageNet class), temperature 1, no top-k / top-p;
  python -m fvq_jax.main --config=configs/sample.py:n=1000,cfg=1.5,top_k=500,seed=1 --workdir=RUN

Writes RUN/samples/<name>/: batch_BBBBB_pPPP.npz (ADM layout: `arr_0` uint8 [n, H, W, 3], `arr_1` labels,
plus the samples' global `indices` and their `codes`), grid.png (the first samples of every class, up to
`grid_classes` classes: one row each), sampling.json (the sampling settings and the GPT and tokenizer
checkpoints that made them). Each sample's randomness comes from (seed, its global index), so the same seed
gives the same images on 1 or 256 devices and at any batch size. A folder holds one setting: a rerun completes
it (batches are written to a temporary name and renamed; the ones already there are read back first) and a rerun
with other settings is refused, naming them. The default folder name lists every setting that changes the
pixels (step, n, cfg, seed, schedule, interval, temperature, top-k, top-p, raw weights, another tokenizer).

CFG: cfg_scale >= 1, 1 = no guidance (LlamaGen guides only above 1; scales below 1 are refused).
"""

import ml_collections

from fvq_jax import config_lib, sharding

FLAGS = ("imagenet",)
# Short argument keys -> (config field, a value of the field's type).
KEYS = {
    "n": ("sample.num_samples", 0),
    "per_class": ("sample.per_class", 64),
    "batch": ("sample.batch_size", 64),
    "cfg": ("sample.cfg_scale", 2.0),
    "schedule": ("sample.cfg_schedule", "constant"),
    "temperature": ("sample.temperature", 1.0),
    "top_k": ("sample.top_k", 0),
    "top_p": ("sample.top_p", 1.0),
    "seed": ("sample.seed", 0),
    "step": ("sample.step", 0),
    "ema": ("sample.use_ema", True),
    "name": ("sample.name", ""),
    "grid": ("sample.grid_classes", 100),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return config_lib.config_from_arg(arg, base_config, keys=KEYS, flags=FLAGS)


def base_config(flags: set[str]) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.task = "sample"
    config.sample = dict(
        num_samples=0,  # 0: per_class x the model's classes
        per_class=64,
        batch_size=64,  # global: split over every device of every host
        cfg_scale=2.0,
        cfg_schedule="constant",  # constant | linear (from 1 at the first token to cfg_scale at the last)
        cfg_interval=(0.0, 1.0),  # fractions of the positions where guidance is on
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        step=0,  # GPT checkpoint step; 0 = the latest
        use_ema=True,
        tokenizer="",  # '' = the tokenizer that made the run's codes (recorded in its config); else its K and
        # downsampling must be that one's
        name="",  # the output folder under RUN/samples/; '' = derived from the settings
        grid_classes=100,  # grid.png: every class of the GPT (its codes' classes) up to this many ...
        grid_per_class=8,  # ... with this many samples each
    )
    if "imagenet" in flags:
        config.sample.update(num_samples=50_000, per_class=50, batch_size=256, cfg_scale=1.75)
    config.mesh = sharding.default_mesh_config()
    return config
