"""Import a PyTorch tokenizer (the FVQ release, its baked VQGAN, LlamaGen's VQ) as an export directory.

  python -m fvq_jax.tools.import_torch --src fvq.safetensors --kind tokenizer --out OUT_DIR
  python -m fvq_jax.tools.import_torch --src vq_ds16_c2i.pt --kind tokenizer --format llamagen --out OUT_DIR

Reads --src lazily (.safetensors memory-mapped; a torch pickle with torch.load(mmap=True, weights_only=True)),
converts it one array at a time by the table in `fvq_jax.conversion.tokenizer`, and writes OUT_DIR as
`fvq_jax.tools.export_vq` does: arrays {"params": ..., "state": ...} and a config that rebuilds the model, with
an `import` record (source file and sha256, format, weights entry, keys left out). `fvq_jax.models.load.load_tokenizer(OUT_DIR)`
returns the VQGAN. An FVQ-format source keeps its VQBridge (raw codebook + bridge, as in the file).

The shapes give the architecture (K, D, ch, ch_mult, z_channels, blocks, bridge preset); what they cannot tell
has flags: --format (default: fvq when the file has VQBridge keys, else vqgan), --norm-groups (default: the
reference's 32) and --l2-norm / --no-l2-norm (default: l2-normalised codes for llamagen only). Files written by
export_torch record these, and they are read back unless a flag says otherwise. --weights picks the entry of a
nested checkpoint (default: the reference's choice, "ema", else "model", else "state_dict").
Any missing, unexpected or mis-shaped key stops the import, all of them listed.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import jax
from etils import epath

from fvq_jax import checkpointing
from fvq_jax.conversion import tokenizer, torch_files
from fvq_jax.conversion.table import StateDictMismatch
from fvq_jax.models.inception import file_sha256

KINDS = ("tokenizer", "gpt")


class NotAvailable(RuntimeError):
    """A kind of model whose conversion is not written yet."""


def import_tokenizer(src, out, *, format: str | None = None, weights: str = "auto", norm_groups: int | None = None,
                     l2_norm: bool | None = None) -> dict:
    """Convert the tokenizer state dict in `src` and write the export directory `out`; returns what was written."""
    state = torch_files.open_state_dict(src, weights=weights)
    spec = tokenizer.infer_spec(state, format=format, norm_groups=norm_groups, l2_norm=l2_norm)
    config = tokenizer.model_config(spec)
    params = tokenizer.import_params(state, spec)
    config["import"] = dict(
        source=str(pathlib.Path(src).absolute()), sha256=file_sha256(src), kind="tokenizer", format=spec.format,
        weights=state.entry or "top", ignored=[k for k in state if k == tokenizer.USAGE_BUFFER])
    checkpointing.save_export(out, {"params": params, "state": tokenizer.initial_state(config)}, config.to_dict())
    leaves = jax.tree.leaves(params)
    return dict(config["import"].to_dict(), out=str(epath.Path(out).absolute()), spec=spec,
                params=sum(x.size for x in leaves), params_bytes=sum(x.nbytes for x in leaves))


def import_gpt(src, out, **_) -> dict:
    """The hook for LlamaGen GPTs: their table (fvq_jax.conversion.gpt) is being written separately."""
    try:
        import fvq_jax.conversion.gpt  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "fvq_jax.conversion.gpt":  # the module is there and fails: show its own error
            raise
        raise NotAvailable("--kind gpt is not available yet: the LlamaGen GPT table (fvq_jax.conversion.gpt) "
                           "does not exist in this version; only --kind tokenizer converts") from None
    raise NotAvailable("--kind gpt: fvq_jax.conversion.gpt exists but import_torch does not call it yet "
                       "(wire it in import_gpt)")


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fvq_jax.tools.import_torch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="the torch state dict: .safetensors, or a .pt/.pth checkpoint")
    parser.add_argument("--kind", required=True, choices=KINDS, help="what the file holds")
    parser.add_argument("--out", required=True, help="the export directory to create (must not exist)")
    parser.add_argument("--format", choices=("auto",) + tokenizer.FORMATS, default="auto",
                        help="tokenizer format (default: fvq if the file has VQBridge keys, else vqgan)")
    parser.add_argument("--weights", choices=("auto", "top") + torch_files.WEIGHT_ENTRIES, default="auto",
                        help="entry of a nested .pt checkpoint (default: ema, else model, else state_dict, else top)")
    parser.add_argument("--norm-groups", type=int, help="GroupNorm groups (default: the reference's 32)")
    parser.add_argument("--l2-norm", type=_bool, metavar="true|false",
                        help="l2-normalised codes (default: true for --format llamagen, else false)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new directory")
    importer = import_tokenizer if args.kind == "tokenizer" else import_gpt
    try:
        written = importer(args.src, args.out, format=args.format, weights=args.weights, norm_groups=args.norm_groups,
                           l2_norm=args.l2_norm)
    except (FileNotFoundError, ValueError, NotAvailable) as e:  # StateDictMismatch, ConfigError, ... are ValueErrors
        parser.error(f"{args.src}: {e}" if isinstance(e, StateDictMismatch) else str(e))
    spec = written["spec"]
    entry = "" if written["weights"] == "top" else f"[{written['weights']!r}]"
    print(f"imported {written['source']}{entry} to {written['out']}\n"
          f"tokenizer, {spec.describe()}\n"
          f"{written['params']:,} params ({written['params_bytes'] / 2 ** 20:.2f} MiB)"
          + (f"; not converted: {', '.join(written['ignored'])} (usage statistics, no weights)"
             if written["ignored"] else ""))


if __name__ == "__main__":
    main()
