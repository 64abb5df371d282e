"""Example sweep: codebook size x VQBridge preset on the local (CPU-sized) config, 4 runs.

  python launch/sweep.py --sweep=configs/sweeps/example.py --workdir_root=/tmp/fvq_example --dry-run

Each dict holds fvq_jax.main flags without the dashes: the config (file:argument) and config field
overrides; launch/sweep.py (local) and launch/xm_launch.py (XManager) add --workdir per run.
"""

CODEBOOK_SIZES = (1024, 4096)
PROJECTORS = ("none", "S/4")  # plain VQ vs the small VQBridge


def get_sweep():
    return [{"config": "configs/tokenizer.py:local",
             "config.quantizer.codebook_size": codebook_size,
             "config.quantizer.projector": projector}
            for codebook_size in CODEBOOK_SIZES for projector in PROJECTORS]


def name(params):
    """k1024_none, k1024_S4, ...: the run's folder under --workdir_root."""
    return f"k{params['config.quantizer.codebook_size']}_{params['config.quantizer.projector'].replace('/', '')}"
