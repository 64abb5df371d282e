"""Import a PyTorch tokenizer (the FVQ release, its baked VQGAN, LlamaGen's VQ) or a LlamaGen class-conditional GPT
as an export directory.

  python -m fvq_jax.tools.import_torch --src fvq.safetensors --kind tokenizer --out OUT_DIR
  python -m fvq_jax.tools.import_torch --src vq_ds16_c2i.pt --kind tokenizer --format llamagen --out VQ_DIR
  python -m fvq_jax.tools.import_torch --src c2i_L_256.pt --kind gpt --grid 16 --tokenizer VQ_DIR --out GPT_DIR

Reads --src lazily (.safetensors memory-mapped; a torch pickle with torch.load(mmap=True, weights_only=True)),
converts it one array at a time by the table in `fvq_jax.conversion.tokenizer` or `fvq_jax.conversion.gpt`, and
writes OUT_DIR as `fvq_jax.tools.export_vq` does: arrays {"params": ..., "state": ...} and a config that rebuilds
the model, with an `import` record (source file and sha256, format, weights entry, keys left out).
`fvq_jax.models.load.load_tokenizer(OUT_DIR)` / `load_gpt(OUT_DIR)` restore it. Any missing, unexpected or
mis-shaped key stops the import, all of them listed, and so does any tensor holding NaN or Inf (every one named;
nothing is written).

Tokenizers: the shapes give the architecture (K, D, ch, ch_mult, z_channels, blocks, bridge preset); what they
cannot tell has flags: --format (default: fvq when the file has VQBridge keys, else vqgan), --norm-groups
(default: the reference's 32) and --l2-norm true|false (default: l2-normalised codes for llamagen only). An
FVQ-format source keeps its VQBridge (raw codebook + bridge, as in the file).

GPTs: the shapes give dim, depth, K, the classes and the FFN width. --grid (required) is the token grid side of the
tokenizer the GPT was trained on (16 for 256px images with VQ-16, 24 for 384px); --n-head defaults to the head
count of the preset with the same dim and depth (GPT-B, -L, -XL, -XXL, -3B) and is required otherwise. The config
names that preset (else "custom" with every size) and the reference's dropouts (0.1), rope base and norm epsilon.
--tokenizer names the tokenizer (an export or a run) whose codes the GPT predicts: recorded as codes.tokenizer, for
the sampler to decode with. The export is float32 ("fp32"), whatever the file's dtype.

Files written by export_torch record what shapes cannot tell (format, l2_norm, norm_groups; n_head, grid), read
back unless a flag says otherwise. --weights picks the entry of a nested checkpoint; by default where the
reference's loader looks: "ema", else "model", else "state_dict" for tokenizers; "model", else "module", else
"state_dict" for GPTs (LlamaGen's sampler, which ignores an "ema" entry); else the top level.
"""

from __future__ import annotations

import argparse
import os
import pathlib

import jax
from etils import epath

from fvq_jax import checkpointing
from fvq_jax.conversion import gpt, tokenizer, torch_files
from fvq_jax.conversion.table import NonFiniteWeights, StateDict, StateDictMismatch
from fvq_jax import files
from fvq_jax.models.load import load_tokenizer, tokenizer_record

KINDS = ("tokenizer", "gpt")


def _write(src, out, state: StateDict, config, arrays: dict, *, kind: str, format: str,
           ignored: list[str]) -> dict:
    """Save the export directory `out` with the import record; returns the record and what was written."""
    config["import"] = dict(source=str(pathlib.Path(src).absolute()), sha256=files.sha256(src), kind=kind,
                            format=format, weights=state.entry or "top", ignored=ignored)
    checkpointing.save_export(out, arrays, config.to_dict())
    leaves = jax.tree.leaves(arrays["params"])
    return dict(config["import"].to_dict(), out=str(epath.Path(out).absolute()),
                params=sum(x.size for x in leaves), params_bytes=sum(x.nbytes for x in leaves))


def import_tokenizer(src, out, *, format: str | None = None, weights: str = "auto", norm_groups: int | None = None,
                     l2_norm: bool | None = None) -> dict:
    """Convert the tokenizer state dict in `src` and write the export directory `out`; returns what was written."""
    state = torch_files.open_state_dict(src, weights=weights, prefer=torch_files.TOKENIZER_ENTRIES)
    spec = tokenizer.infer_spec(state, format=format, norm_groups=norm_groups, l2_norm=l2_norm)
    config = tokenizer.model_config(spec)
    params = tokenizer.import_params(state, spec)
    written = _write(src, out, state, config, {"params": params, "state": tokenizer.initial_state(config)},
                     kind="tokenizer", format=spec.format,
                     ignored=[k for k in state if k == tokenizer.USAGE_BUFFER])
    return dict(written, description=f"tokenizer, {spec.describe()}")


def decoding_tokenizer(path, vocab_size: int) -> dict:
    """The codes.tokenizer record {path, step, weights} of the tokenizer at `path` (an export, or a run: its newest
    step, EMA weights if it kept them), checked to load and to have the GPT's `vocab_size` codes."""
    loaded = load_tokenizer(path)
    codes = loaded.config.quantizer.codebook_size
    if codes != vocab_size:
        raise ValueError(f"--tokenizer {path} has {codes} codes and the GPT predicts {vocab_size}: give the tokenizer "
                         f"the GPT was trained on")
    return tokenizer_record(loaded)


def import_gpt(src, out, *, grid: int | None = None, n_head: int | None = None, tokenizer_path=None,
               weights: str = "auto") -> dict:
    """Convert the LlamaGen GPT state dict in `src` and write the export directory `out` (codes.tokenizer: the
    tokenizer at `tokenizer_path`, when given); returns what was written."""
    state = torch_files.open_state_dict(src, weights=weights, prefer=torch_files.GPT_ENTRIES)
    gpt_config = gpt.infer_config(state, grid=grid, n_head=n_head)
    config = gpt.model_config(gpt_config)
    if tokenizer_path is not None:
        config.codes = dict(tokenizer=decoding_tokenizer(tokenizer_path, gpt_config.vocab_size))
    params = gpt.import_params(state, gpt_config)
    # The GPT holds parameters only: no other state.
    written = _write(src, out, state, config, {"params": params, "state": {}}, kind="gpt", format="llamagen",
                     ignored=[])
    decoder = f"; codes decoded by {config.codes.tokenizer.path}" if tokenizer_path is not None else ""
    return dict(written, description=f"gpt, preset {config.model.preset}: {gpt.describe(gpt_config)}{decoder}")


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
    parser.add_argument("--weights", choices=("auto", "top") + torch_files.WEIGHT_ENTRIES, default="auto",
                        help="entry of a nested .pt checkpoint (default: where the reference's loader looks)")
    tokenizer_flags = parser.add_argument_group("--kind tokenizer")
    tokenizer_flags.add_argument("--format", choices=("auto",) + tokenizer.FORMATS, default="auto",
                                 help="tokenizer format (default: fvq if the file has VQBridge keys, else vqgan)")
    tokenizer_flags.add_argument("--norm-groups", type=int, help="GroupNorm groups (default: the reference's 32)")
    tokenizer_flags.add_argument("--l2-norm", type=_bool, metavar="true|false",
                                 help="l2-normalised codes (default: true for --format llamagen, else false)")
    gpt_flags = parser.add_argument_group("--kind gpt")
    gpt_flags.add_argument("--grid", type=int, help="token grid side of the GPT's tokenizer (16: 256px with VQ-16)")
    gpt_flags.add_argument("--n-head", type=int, help="attention heads (default: the preset of the same dim and depth)")
    gpt_flags.add_argument("--tokenizer", help="the tokenizer (export or run) that decodes the GPT's codes")
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} already exists; choose a new directory")
    flags = {"tokenizer": [("--format", args.format != "auto"), ("--norm-groups", args.norm_groups is not None),
                           ("--l2-norm", args.l2_norm is not None)],
             "gpt": [("--grid", args.grid is not None), ("--n-head", args.n_head is not None),
                     ("--tokenizer", args.tokenizer is not None)]}
    for kind, given in flags.items():
        misplaced = [flag for flag, used in given if used]
        if kind != args.kind and misplaced:
            parser.error(f"{', '.join(misplaced)}: for --kind {kind}, and this is --kind {args.kind}")
    try:
        if args.kind == "tokenizer":
            written = import_tokenizer(args.src, args.out, format=args.format, weights=args.weights,
                                       norm_groups=args.norm_groups, l2_norm=args.l2_norm)
        else:
            written = import_gpt(args.src, args.out, grid=args.grid, n_head=args.n_head, tokenizer_path=args.tokenizer,
                                 weights=args.weights)
    except (FileNotFoundError, ValueError) as e:  # StateDictMismatch, WrongKind, ConfigError, ... are ValueErrors
        parser.error(f"{args.src}: {e}" if isinstance(e, (StateDictMismatch, NonFiniteWeights)) else str(e))
    entry = "" if written["weights"] == "top" else f"[{written['weights']!r}]"
    print(f"imported {written['source']}{entry} to {written['out']}\n{written['description']}\n"
          f"{written['params']:,} params ({written['params_bytes'] / 2 ** 20:.2f} MiB)"
          + (f"; not converted: {', '.join(written['ignored'])} (usage statistics, no weights)"
             if written["ignored"] else ""))


if __name__ == "__main__":
    main()
