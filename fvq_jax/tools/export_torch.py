"""Export a tokenizer as a PyTorch state dict with the reference's keys (FVQ, baked VQGAN or LlamaGen format).

  python -m fvq_jax.tools.export_torch --workdir RUN_DIR --out fvq.safetensors         # raw codebook + VQBridge
  python -m fvq_jax.tools.export_torch --workdir RUN_DIR --out vq.pt --format vqgan     # the bridge baked in
  python -m fvq_jax.tools.export_torch --workdir EXPORT_DIR --out vq.safetensors        # an export directory

--workdir is a training run (its latest checkpoint unless --step; the EMA weights when it kept them, unless
--no-ema) or an export directory. Formats (`fvq_jax.conversion.tokenizer`): fvq (the default with a VQBridge
projector), vqgan (the default otherwise; any projector's output baked into the codebook), llamagen (baked,
l2-normalised codes, plus LlamaGen's `quantize.codebook_used` buffer so its VQModel loads the file strictly).
Residual and multi-scale quantizers have no reference format and are refused.

The output is one unsharded file, .safetensors or a torch pickle (.pt: {"model": state_dict, "fvq_jax":
metadata}, the layout LlamaGen's loaders read); each array is gathered to the host in turn. Both carry
format, l2_norm and norm_groups as metadata, which import_torch reads back. A tokenizer the reference's code
does not build as it stands (GroupNorm groups other than 32; decoder blocks other than encoder blocks + 1, as in
the local config) is written with a note saying so: its keys load, the reference code must be changed to match.
"""

from __future__ import annotations

import argparse
import os
import pathlib

from etils import epath

from fvq_jax.conversion import tokenizer, torch_files
from fvq_jax.models.load import is_run, load_tokenizer

SUFFIXES = torch_files.SAFETENSORS_SUFFIXES + torch_files.TORCH_SUFFIXES


def export(workdir, out, *, format: str | None = None, step: int | None = None, use_ema: bool = True) -> dict:
    """Write the tokenizer in `workdir` to the state-dict file `out`; returns what was written."""
    loaded = load_tokenizer(workdir, step=step, use_ema=use_ema)
    model = loaded.model
    source = dict(workdir=str(epath.Path(workdir).absolute()))
    if is_run(workdir):
        source.update(step=loaded.step, weights=loaded.weights)
    projector = model.quantizer.projector_name
    spec, items = tokenizer.to_state_dict(model, format)
    torch_files.save_state_dict(out, items, metadata=dict(spec.metadata(), projector=projector,
                                                          source=source["workdir"]))
    return dict(source, out=str(pathlib.Path(out).absolute()), spec=spec, projector=projector,
                bytes=os.path.getsize(out))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.export_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a training run's directory, or an export directory")
    parser.add_argument("--out", required=True, help=f"the file to write ({', '.join(SUFFIXES)}; must not exist)")
    parser.add_argument("--format", choices=tokenizer.FORMATS,
                        help="fvq (default with a VQBridge), vqgan (default otherwise) or llamagen")
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
    spec = written["spec"]
    origin = f"step {written['step']} ({written['weights']} weights) of " if "step" in written else ""
    baked = spec.projector != written["projector"]
    print(f"exported {origin}{written['workdir']} to {written['out']} ({written['bytes'] / 2 ** 20:.2f} MiB)\n"
          f"{spec.describe()}" + (f" (projector {written['projector']} baked into the codebook)" if baked else ""))
    for note in spec.reference_notes():
        print(f"note: {note}; adapt the reference code to this before loading the file")


if __name__ == "__main__":
    main()
