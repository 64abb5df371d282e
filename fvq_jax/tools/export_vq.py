"""Export a trained FVQ tokenizer as a plain VQ tokenizer: no codebook projector at inference.

  python -m fvq_jax.tools.export_vq --workdir=RUN_DIR --out=OUT_DIR [--step N] [--no-ema]

Restores the run in RUN_DIR (latest step unless --step; its EMA weights when it kept them, unless
--no-ema), bakes the projector's output into the raw codebook (`fvq_jax.quantizers.export.bake`,
for every quantizer type: vq, residual, multiscale, ema) and writes OUT_DIR, one checkpoint of
  arrays  {"params": ..., "state": ...}: the baked VQGAN's parameters and its non-parameter state
          (usage window, EMA-codebook statistics) as plain nested dicts;
  config  the run's training config with quantizer.projector = "none" (so the module rebuilt from
          it has no projector), plus an `export` record: source run, step, weights, the projector
          that was baked in.
The discriminator and the optimizer state are never read. `fvq_jax.models.load.load_tokenizer(OUT_DIR)`
rebuilds the VQGAN from the config and restores the arrays on the current devices.
"""

from __future__ import annotations

import argparse
import os

import jax
import ml_collections
from etils import epath
from flax import nnx

from fvq_jax import checkpointing
from fvq_jax.models.load import load_tokenizer
from fvq_jax.models.vqgan import VQGAN, count_params
from fvq_jax.quantizers.export import bake


def _arrays(model: VQGAN) -> dict:
    """{"params": ..., "state": ...} of `model` as plain nested dicts."""
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)}


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def export_tokenizer(model: VQGAN, config: ml_collections.ConfigDict, out_dir, *, source: dict) -> dict:
    """Bake `model` (built from `config`) and write it to `out_dir`; returns what was written.

    source: where the weights came from (run directory, step, weights), recorded in the config.
    """
    baked = bake(model)
    exported = ml_collections.ConfigDict(config.to_dict())
    projector = config.quantizer.projector
    exported.quantizer.projector = "none"
    exported.export = dict(source, baked_projector=projector)
    arrays = _arrays(baked)
    checkpointing.save_export(out_dir, arrays, exported.to_dict())
    return {
        "out": str(epath.Path(out_dir).absolute()),
        "type": config.quantizer.type,
        "codebook_size": int(baked.quantizer.embedding.shape[0]),
        "code_dim": int(baked.quantizer.embedding.shape[1]),
        "baked_projector": projector,
        "projector_params": count_params(model.quantizer.projector),
        "params": count_params(baked),
        "params_bytes": _nbytes(arrays["params"]),
        "state_bytes": _nbytes(arrays["state"]),
    }


def export_run(workdir, out_dir, *, step: int | None = None, use_ema: bool = True) -> dict:
    """`export_tokenizer` of the run in `workdir` at `step` (default: latest)."""
    loaded = load_tokenizer(workdir, step=step, use_ema=use_ema)
    source = dict(workdir=str(epath.Path(workdir).absolute()), step=loaded.step, weights=loaded.weights)
    return dict(export_tokenizer(loaded.model, loaded.config, out_dir, source=source), **source)


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.export_vq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the training run's directory (holds checkpoints/)")
    parser.add_argument("--out", required=True, help="the export directory to create (must not exist)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="export the raw weights even when the run kept an EMA")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new directory")
    try:
        written = export_run(args.workdir, args.out, step=args.step, use_ema=args.use_ema)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(f"exported step {written['step']} of {written['workdir']} ({written['weights']} weights) "
          f"to {written['out']}\n"
          f"quantizer {written['type']}: K={written['codebook_size']}, D={written['code_dim']}, projector "
          f"{written['baked_projector']} ({written['projector_params']:,} params) baked into the codebook\n"
          f"{written['params']:,} params ({_mib(written['params_bytes'])}), other state "
          f"{_mib(written['state_bytes'])}")


if __name__ == "__main__":
    main()
