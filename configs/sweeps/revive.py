"""Every code alive at small scale (issue 14): VQBridge as published against the remedy, the position revive
(quantizer.revive='copy') with the dead-code pull (quantizer.restart='pull').

At the small CPU scale of ablation_small.py, VQBridge L/4 with learning annealing stops at 74-79%
(K = 1,024), 55-61% (4,096) and 32-39% (16,384) windowed usage. These runs are ablation_small's
`fvq` runs (same scale, photos at 32x32, batch 8, LR schedule 'lin', no GAN phase) for 1,000 steps:
  fvq          VQBridge as published;
  fvq-revive   + every 25 steps, in-patch positions unused in the latest 25 steps get the head rows
               of the most used position plus 1% noise (the first round);
  fvq-pull     + the revive and, in every step, codes unused in the whole usage window pulled toward
               their nearest token of the batch (the remedy);
  (textures)   the same on the second kind of image, tools/sample_folder's greyscale textures,
               microscopy and scans: python -m fvq_jax.tools.sample_folder --out=$FVQ_TEXTURES first
               (default workdir/textures).

  JAX_COMPILATION_CACHE_DIR=/tmp/fvq_jit_cache \\
      python launch/sweep.py --sweep=configs/sweeps/revive.py --workdir_root=/tmp/fvq_revive [--only=REGEX]
  python -m fvq_jax.tools.sweep_report --sweep_root=/tmp/fvq_revive --out=configs/sweeps/results/revive.md
"""

import os
import pathlib

from fvq_jax import config_lib

# The same small scale as ablation_small.py (sweep files load by path, not as a package).
ablation_small = config_lib.load_file(pathlib.Path(__file__).with_name("ablation_small.py"), "ablation_small")

# (method, K, seed, steps[, data]), in the order they run (a 200-step check of the revive first).
RUNS = (
    ("fvq-revive", 1024, 0, 200),
    ("fvq-revive", 1024, 0, 1000), ("fvq-revive", 4096, 0, 1000), ("fvq-revive", 1024, 1, 1000),
    ("fvq-revive", 16384, 0, 1000),
    ("fvq", 4096, 0, 1000), ("fvq", 16384, 0, 1000), ("fvq", 1024, 0, 1000),
    ("fvq-pull", 4096, 0, 1000), ("fvq-pull", 1024, 0, 1000), ("fvq-pull", 16384, 0, 1000),
    ("fvq-pull", 1024, 1, 1000), ("fvq-pull", 4096, 1, 1000), ("fvq-pull", 16384, 1, 1000),
    ("fvq-pull-only", 4096, 0, 1000), ("fvq-pull-w4", 16384, 0, 1000), ("fvq-claim", 16384, 0, 1000),
    ("fvq-claim", 16384, 1, 1000), ("fvq-claim", 4096, 0, 1000), ("fvq-claim", 4096, 1, 1000),
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
METHODS["fvq-pull-w4"] = dict(METHODS["fvq-pull"], **{"config.quantizer.restart_weight": 4.0})
METHODS["fvq-claim"] = dict(METHODS["fvq-revive"], **{"config.quantizer.restart": "claim",
                                                      "config.quantizer.restart_weight": 1.0})


def get_sweep():
    base = ablation_small.fvq_base()  # the small CPU scale, no GAN phase, L/4, 'lin'
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
    if restart == "claim":
        return "fvq-claim"
    if restart == "pull":
        if params.get("config.quantizer.revive") != "copy":
            return "fvq-pull-only"
        return "fvq-pull" if params.get("config.quantizer.restart_weight", 1.0) == 1.0 else "fvq-pull-w4"
    if restart == "split":  # the rejected candidate of revive.md, measured at commit d824952
        return "fvq-split"
    return "fvq-revive" if params.get("config.quantizer.revive") == "copy" else "fvq"


def name(params):
    """e.g. pull_k4096_s1 (1,000 steps), revive_k1024_s0_200, fvq_k4096_s0_textures."""
    steps = params["config.train.num_steps"]
    prefix = {"fvq-claim": "claim", "fvq-pull-only": "pullonly", "fvq-pull": "pull", "fvq-pull-w4": "pullw4", "fvq-split": "restart", "fvq-revive": "revive",
              "fvq": "fvq"}[_method(params)]
    return (f"{prefix}_k{params['config.quantizer.codebook_size']}_s{params['config.seed']}"
            + ("" if steps == 1000 else f"_{steps}")
            + ("_textures" if params.get("config.data.source") == "folder" else ""))
