"""Export a tokenizer (FVQ, baked VQGAN or LlamaGen format) or a class-conditional GPT (LlamaGen's) as a PyTorch
state dict with the reference's keys.

  python -m fvq_jax.tools.export_torch --workdir RUN_DIR --out fvq.safetensors         # raw codebook + VQBridge
  python -m fvq_jax.tools.export_torch --workdir RUN_DIR --out vq.pt --format vqgan     # the bridge baked in
  python -m fvq_jax.tools.export_torch --workdir EXPORT_DIR --out vq.safetensors        # an export directory
  python -m fvq_jax.tools.export_torch --workdir GPT_DIR --out gpt.pt                   # a GPT run or export

--workdir is a training run (its latest checkpoint unless --step; the EMA weights when it kept them, unless
--no-ema) or an export directory; its saved config's task says what it holds. GPTs are written in the layout of
LlamaGen's `Transformer` (`fvq_jax.conversion.gpt`), with n_head and grid as metadata (the reference file has
neither). Tokenizer formats (`fvq_jax.conversion.tokenizer`): fvq (the default with a VQBridge projector),
vqgan (the default otherwise; any projector's output baked into the codebook), llamagen (baked, l2-normalised
codes, plus LlamaGen's `quantize.codebook_used` buffer so its VQModel loads the file strictly). Residual and
multi-scale quantizers have no reference format and are refused.

The output is one unsharded file, .safetensors or a torch pickle (.pt: {"model": state_dict, "fvq_jax":
metadata}, the layout LlamaGen's loaders read); each array is gathered to the host in turn. Both carry what the
shapes cannot tell as metadata (a tokenizer's format, l2_norm and norm_groups; a GPT's n_head and grid), which
import_torch reads back. A tokenizer the reference's code does not build as it stands (GroupNorm groups other
than 32; decoder blocks other than encoder blocks + 1, as in the local config) is written with a note saying so:
its keys load, the reference code must be changed to match.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from etils import epath

from fvq_jax.conversion import gpt, tokenizer, torch_files
from fvq_jax.models.load import is_run, load_model

SUFFIXES = torch_files.SAFETENSORS_SUFFIXES + torch_files.TORCH_SUFFIXES


def export(workdir, out, *, format: str | None = None, step: int | None = None, use_ema: bool = True) -> dict:
    """Write the tokenizer or GPT in `workdir` to the state-dict file `out`; returns what was written: the source,
    `description` and `notes` (where the reference's code must change to build the model)."""
    def check(config):
        if config.get("task", "tokenizer") == "gpt" and format is not None:
            raise ValueError(f"--format {format}: tokenizer formats; {workdir} holds a GPT (written in LlamaGen's "
                             f"layout)")

    loaded = load_model(workdir, task=None, step=step, use_ema=use_ema, check=check)
    task = loaded.config.get("task", "tokenizer")
    source = dict(workdir=str(epath.Path(workdir).absolute()))
    if task == "gpt":
        config = loaded.model.config
        torch_files.save_state_dict(out, gpt.to_state_dict(loaded.model),
                                    metadata=dict(gpt.metadata(config), source=source["workdir"]))
        written = dict(description=f"gpt (LlamaGen layout): {gpt.describe(config)}", notes=[])
    else:
        projector = loaded.model.quantizer.projector_name
        spec, items = tokenizer.to_state_dict(loaded.model, format)
        torch_files.save_state_dict(out, items, metadata=dict(spec.metadata(), projector=projector,
                                                              source=source["workdir"]))
        baked = f" (projector {projector} baked into the codebook)" if spec.projector != projector else ""
        written = dict(description=spec.describe() + baked, notes=spec.reference_notes())
    if is_run(workdir):
        source.update(step=loaded.step, weights=loaded.weights)
    return dict(source, **written, out=str(pathlib.Path(out).absolute()), bytes=os.path.getsize(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.export_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run's directory, or an export directory")
    parser.add_argument("--out", required=True, help=f"the file to write ({', '.join(SUFFIXES)}; must not exist)")
    parser.add_argument("--format", choices=tokenizer.FORMATS,
                        help="a tokenizer's: fvq (default with a VQBridge), vqgan (default otherwise) or llamagen")
    parser.add_argument("--step", type=int, help="checkpoint step of a training run (default: the latest)")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                        help="a training run's raw weights even when it kept an EMA")
    args = parser.parse_args(argv)
    if not args.out.endswith(SUFFIXES):
        parser.error(f"--out {args.out}: write one of {', '.join(SUFFIXES)}")
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new file")
    try:
        written = export(args.workdir, args.out, format=args.format, step=args.step, use_ema=args.use_ema)
    except (FileNotFoundError, ValueError) as e:  # tokenizer.Unsupported is a ValueError
        parser.error(str(e))
    origin = f"step {written['step']} ({written['weights']} weights) of " if "step" in written else ""
    print(f"exported {origin}{written['workdir']} to {written['out']} ({written['bytes'] / 2 ** 20:.2f} MiB)\n"
          f"{written['description']}")
    for note in written["notes"]:
        print(f"note: {note}; adapt the reference code to this before loading the file")


if __name__ == "__main__":
    main()
