"""FVQ's claim at small scale: VQBridge + learning annealing keeps the codebook alive, plain VQ does not.

Methods: plain VQ (projector none), EMA VQ (EMA-updated codebook), lin/1 (one Linear projector,
SimVQ-like) and VQBridge (L/4), each with a constant LR and with learning annealing ('lin'), at
K in {1024, 4096, 16384}: 24 runs. Four more runs probe why VQBridge stops short of 100% here:
the same VQBridge with a small random (instead of zero) head init, with annealing, at each K; and
VQBridge with annealing at K = 1024 trained 5x longer (1,000 steps).

Everything else is the local config at 32x32 (8x8 tokens of D = 32), batch 8, and no GAN
phase (the adversarial loss does not touch the codebook; the comparison is about the quantizer).

  JAX_COMPILATION_CACHE_DIR=/tmp/fvq_jit_cache \
      python launch/sweep.py --sweep=configs/sweeps/ablation_small.py --workdir_root=/tmp/fvq_ablation
  python -m fvq_jax.tools.sweep_report --sweep_root=/tmp/fvq_ablation \\
      --out=configs/sweeps/results/ablation_small.md

ABLATION_SCALE=gpu selects the larger setting for an accelerator: 64x64 images (16x16 tokens),
D = 256, batch 64, 5,000 steps.
"""

import os

CODEBOOK_SIZES = (1024, 4096, 16384)
SCHEDULES = ("const", "lin")
METHODS = {  # name -> quantizer overrides
    "vq": {"config.quantizer.type": "vq", "config.quantizer.projector": "none"},
    "ema": {"config.quantizer.type": "ema", "config.quantizer.projector": "none"},
    "lin1": {"config.quantizer.type": "vq", "config.quantizer.projector": "lin/1"},
    "fvq": {"config.quantizer.type": "vq", "config.quantizer.projector": "L/4"},
}
PROBES = {  # extra runs with learning annealing: name -> (overrides, codebook sizes)
    "fvq-randhead": ({"config.quantizer.type": "vq", "config.quantizer.projector": "L/4",
                      "config.quantizer.bridge_head_init_std": 0.02}, CODEBOOK_SIZES),
    "fvq-long": ({"config.quantizer.type": "vq", "config.quantizer.projector": "L/4",
                  "config.train.num_steps": 1000}, (1024,)),
}

SCALES = {
    "cpu": {"config": "configs/tokenizer.py:local,res=32,batch=8,steps=200",
            "config.optim.warmup_steps": 10, "config.train.log_every": 10},
    "gpu": {"config": "configs/tokenizer.py:local,res=64,batch=64,steps=5000,dim=256",
            "config.optim.warmup_steps": 250, "config.train.log_every": 50, "config.model.ch": 64},
}


def _base():
    scale = os.environ.get("ABLATION_SCALE", "cpu")
    if scale not in SCALES:
        raise ValueError(f"ABLATION_SCALE must be one of {sorted(SCALES)}, got {scale!r}")
    return dict(SCALES[scale], **{
        "config.loss.disc_start": 10 ** 9,  # no GAN phase
        "config.train.checkpoint_every": 10 ** 9,  # only the final checkpoint
        "config.train.image_every": 0,
        "config.seed": 0,
    })


def fvq_base() -> dict:
    """`_base()` with VQBridge L/4 and learning annealing: the `fvq` runs that revive.py and factors.py vary."""
    return dict(_base(), **METHODS["fvq"], **{"config.optim.schedule": "lin"})


def get_sweep():
    runs = []
    for k in CODEBOOK_SIZES:
        for schedule in SCHEDULES:
            for method, overrides in METHODS.items():
                runs.append(dict(_base(), **overrides, **{"config.quantizer.codebook_size": k,
                                                          "config.optim.schedule": schedule}))
        for method, (overrides, sizes) in PROBES.items():
            if k in sizes:
                runs.append(dict(_base(), **overrides, **{"config.quantizer.codebook_size": k,
                                                          "config.optim.schedule": "lin"}))
    return runs


def method_of(params) -> str:
    """The method name of a run's parameters (PROBES / METHODS keys): the first whose overrides
    the run carries, probes (which extend a method's overrides) before methods."""
    for method, overrides in [(m, o) for m, (o, _) in PROBES.items()] + list(METHODS.items()):
        if all(params.get(key) == value for key, value in overrides.items()):
            return method
    raise ValueError(f"no method matches {params}")


def name(params):
    """e.g. fvq_lin_k4096."""
    return f"{method_of(params)}_{params['config.optim.schedule']}_k{params['config.quantizer.codebook_size']}"
