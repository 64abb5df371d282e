"""Which factors decide how many codes and in-patch positions of VQBridge stay alive at small scale (issue 14).

VQBridge as published (L/4, learning annealing 'lin', no remedy) at K = 1,024 for 200 steps, the
ablation_small scale (photos 32x32, batch 8, base LR 1e-3, warmup 10, D = 32), one factor changed
per run:
  base         the scale as it is
  batch32      4x the tokens per step (batch 32, LR scaled with it as the config does: x batch / 8)
  lr1e-4       base LR 1e-4 (10x lower; the paper's 1e-4 x batch / 128 would be 6e-6 here)
  warmup50     50 warmup steps instead of 10
  dim8, dim64  code width D = 8 / 64
  patch2       L/2 (4 in-patch positions instead of 16)

  JAX_COMPILATION_CACHE_DIR=/tmp/fvq_jit_cache \\
      python launch/sweep.py --sweep=configs/sweeps/factors.py --workdir_root=/tmp/fvq_factors
  python -m fvq_jax.tools.sweep_report --sweep_root=/tmp/fvq_factors --out=configs/sweeps/results/factors.md
"""

import pathlib

from fvq_jax import config_lib

ablation_small = config_lib.load_file(pathlib.Path(__file__).with_name("ablation_small.py"), "ablation_small")

FACTORS = {
    "base": {},
    "batch32": {"config": "configs/tokenizer.py:local,res=32,batch=32,steps=200"},
    "lr1e-4": {"config.optim.base_lr": 1e-4},
    "warmup50": {"config.optim.warmup_steps": 50},
    "dim8": {"config.quantizer.code_dim": 8},
    "dim64": {"config.quantizer.code_dim": 64},
    "patch2": {"config.quantizer.projector": "L/2"},
}


def get_sweep():
    base = dict(ablation_small.fvq_base(), **{"config.quantizer.codebook_size": 1024})
    return [dict(base, **overrides) for overrides in FACTORS.values()]


def method_of(params) -> str:
    """The factor a run changes: the first of FACTORS whose overrides it carries ("base" carries none)."""
    for factor, overrides in FACTORS.items():
        if overrides and all(params.get(key) == value for key, value in overrides.items()):
            return factor
    return "base"


def name(params) -> str:
    return f"factor_{method_of(params)}"
