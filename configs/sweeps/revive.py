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

import pathlib

from fvq_jax import config_lib

# The same small scale as ablation_small.py (sweep files load by path, not as a package).
ablation_small = config_lib.load_file(pathlib.Path(__file__).with_name("ablation_small.py"), "ablation_small")

RUNS = (  # (K, seed, steps), in the order they run: every K before a second seed
    (1024, 0, 200),
    (1024, 0, 1000), (4096, 0, 1000), (1024, 1, 1000), (16384, 0, 1000),
)
REVIVE = {"config.quantizer.revive": "copy", "config.quantizer.revive_every": 25,
          "config.quantizer.revive_noise": 0.01}


def get_sweep():
    base = dict(ablation_small.SCALES["cpu"], **{
        "config.loss.disc_start": 10 ** 9,  # no GAN phase, as ablation_small
        "config.train.checkpoint_every": 10 ** 9,
        "config.train.image_every": 0,
        "config.optim.schedule": "lin",
        "config.quantizer.type": "vq",
        "config.quantizer.projector": "L/4",
    })
    return [dict(base, **REVIVE, **{"config.quantizer.codebook_size": k, "config.seed": seed,
                                    "config.train.num_steps": steps})
            for k, seed, steps in RUNS]


def method_of(params) -> str:
    return "fvq-revive" if params.get("config.quantizer.revive") == "copy" else "fvq"


def name(params):
    """e.g. revive_k1024_s0 (1,000 steps) or revive_k1024_s0_200."""
    steps = params["config.train.num_steps"]
    return (f"revive_k{params['config.quantizer.codebook_size']}_s{params['config.seed']}"
            + ("" if steps == 1000 else f"_{steps}"))
