"""Reviving dead in-patch positions of the VQBridge head (quantizer.revive='copy'), issue 14.

At the small CPU scale of ablation_small.py, VQBridge L/4 with learning annealing stops at 74-79%
(K = 1,024), 55-61% (4,096) and 32-39% (16,384) windowed usage, whole in-patch positions of the
head never selected. These runs are ablation_small's `fvq` / `fvq-long` runs (same scale, data,
LR schedule 'lin', no GAN phase) with the revive on: every 25 steps, positions with no assignment
in the full usage window get the head rows of the most used position plus 1% noise.

A 200-step check at K = 1,024 (`_200` in the name), then 1,000 steps at K = 1,024 (seeds 0 and 1),
4,096 and 16,384 (seed 0):

  JAX_COMPILATION_CACHE_DIR=/tmp/fvq_jit_cache \\
      python launch/sweep.py --sweep=configs/sweeps/revive.py --workdir_root=/tmp/fvq_revive [--only=REGEX]
  python -m fvq_jax.tools.sweep_report --sweep_root=/tmp/fvq_revive --out=configs/sweeps/results/revive.md
"""

import os
import pathlib

from fvq_jax import config_lib

# The same small scale as ablation_small.py (sweep files load by path, not as a package).
ablation_small = config_lib.load_file(pathlib.Path(__file__).with_name("ablation_small.py"), "ablation_small")

# (method, K, seed, steps), in the order they run. fvq-revive: the position revive alone (first round);
# fvq-restart: the revive plus the per-code restart (quantizer.restart='split'); fvq: VQBridge as published.
RUNS = (
    ("fvq-revive", 1024, 0, 200),
    ("fvq-revive", 1024, 0, 1000), ("fvq-revive", 4096, 0, 1000), ("fvq-revive", 1024, 1, 1000),
    ("fvq-revive", 16384, 0, 1000),
    ("fvq", 4096, 0, 1000), ("fvq", 16384, 0, 1000),
    ("fvq-pull", 4096, 0, 1000), ("fvq-pull", 1024, 0, 1000), ("fvq-pull", 16384, 0, 1000),
    ("fvq-pull", 1024, 1, 1000), ("fvq-pull", 4096, 1, 1000), ("fvq-pull", 16384, 1, 1000),
    ("fvq-pull-only", 4096, 0, 1000),
    # The second kind of image (tools/sample_folder: greyscale textures, microscopy, scans), with and without.
    ("fvq", 4096, 0, 1000, "textures"), ("fvq-pull", 4096, 0, 1000, "textures"),
)
# python -m fvq_jax.tools.sample_folder --out=$FVQ_TEXTURES writes it (default workdir/textures, from the repo root).
TEXTURES = {"config.data.source": "folder", "config.data.folder": os.environ.get("FVQ_TEXTURES", "workdir/textures")}
METHODS = {
    "fvq": {},
    "fvq-revive": {"config.quantizer.revive": "copy", "config.quantizer.revive_every": 25,
                   "config.quantizer.revive_noise": 0.01},
}
METHODS["fvq-pull"] = dict(METHODS["fvq-revive"], **{"config.quantizer.restart": "pull",
                                                     "config.quantizer.restart_weight": 1.0})
METHODS["fvq-pull-only"] = {"config.quantizer.restart": "pull", "config.quantizer.restart_weight": 1.0}


def get_sweep():
    base = dict(ablation_small.SCALES["cpu"], **{
        "config.loss.disc_start": 10 ** 9,  # no GAN phase, as ablation_small
        "config.train.checkpoint_every": 10 ** 9,
        "config.train.image_every": 0,
        "config.optim.schedule": "lin",
        "config.quantizer.type": "vq",
        "config.quantizer.projector": "L/4",
    })
    runs = []
    for method, k, seed, steps, *data in RUNS:
        run = dict(base, **METHODS[method], **{"config.quantizer.codebook_size": k, "config.seed": seed,
                                               "config.train.num_steps": steps})
        runs.append(dict(run, **TEXTURES) if data == ["textures"] else run)
    return runs


def method_of(params) -> str:
    """The method's name, with " (textures)" for runs on the second image source."""
    return _method(params) + (" (textures)" if params.get("config.data.source") == "folder" else "")


def _method(params) -> str:
    restart = params.get("config.quantizer.restart")
    if restart == "pull":
        return "fvq-pull" if params.get("config.quantizer.revive") == "copy" else "fvq-pull-only"
    if restart == "split":
        return "fvq-restart"
    return "fvq-revive" if params.get("config.quantizer.revive") == "copy" else "fvq"


def name(params):
    """e.g. revive_k1024_s0 (1,000 steps), revive_k1024_s0_200, restart_k4096_s1, fvq_k4096_s0."""
    steps = params["config.train.num_steps"]
    prefix = {"fvq-pull-only": "pullonly", "fvq-pull": "pull", "fvq-restart": "restart", "fvq-revive": "revive",
              "fvq": "fvq"}[_method(params)]
    return (f"{prefix}_k{params['config.quantizer.codebook_size']}_s{params['config.seed']}"
            + ("" if steps == 1000 else f"_{steps}") + ("_textures" if params.get("config.data.source") == "folder" else ""))
