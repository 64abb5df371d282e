"""Read and write torch state dicts one array at a time: `.safetensors` files and torch pickles (.pt).

- `.safetensors`: memory-mapped by `safetensors.safe_open`; a tensor is read when it is looked up.
- torch pickles: `torch.load(mmap=True, weights_only=True)` maps the tensor storage instead of reading it.
  A checkpoint that nests its weights is opened at one entry (LlamaGen's {"model": ..., "ema": ...},
  DeepSpeed's {"module": ...}, Lightning's {"state_dict": ...}); by default where the reference's loader
  for that kind of model looks, else the top level when it is a flat state dict (LlamaGen's FSDP GPTs).
Files we write carry what shapes cannot tell as string metadata (safetensors' header; a .pt's "fvq_jax"
entry beside "model"). torch and safetensors are imported only here, and only when a file needs them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import stat
from typing import Iterable, Mapping

import numpy as np

from fvq_jax.conversion.table import StateDict

# Where the reference's loaders look, in their order: its tokenizer scripts prefer the EMA weights; its GPT
# sampler (autoregressive/sample/sample_c2i.py) reads "model" (then DeepSpeed's "module"), even beside an "ema".
TOKENIZER_ENTRIES = ("ema", "model", "state_dict")
GPT_ENTRIES = ("model", "module", "state_dict")
WEIGHT_ENTRIES = ("ema", "model", "module", "state_dict")  # every entry `weights` may name
METADATA_ENTRY = "fvq_jax"
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class UnreadableFile(ValueError):
    """A file that is not (or no longer, e.g. truncated) a state dict we can read."""


def _cause(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def open_state_dict(path, *, weights: str = "auto", prefer: tuple[str, ...] = TOKENIZER_ENTRIES) -> StateDict:
    """The state dict in `path` (.safetensors or a torch pickle), arrays read on access.

    weights: the entry of a nested torch checkpoint (one of WEIGHT_ENTRIES), "top" for the top level, or
    "auto": the first of `prefer` the file has (TOKENIZER_ENTRIES or GPT_ENTRIES: where the reference's loader
    looks), else the top level. `StateDict.entry` says which.
    UnreadableFile for a file that cannot be read (truncated, not a checkpoint) or lacks the entry.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    if path.suffix in SAFETENSORS_SUFFIXES:
        if weights not in ("auto", "top"):
            raise ValueError(f"{path}: a .safetensors file is one flat state dict; weights={weights!r} applies to "
                             f"torch checkpoints")
        return _open_safetensors(path)
    return _open_torch(path, weights, prefer)


def _open_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="numpy")
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        raise UnreadableFile(f"{path}: not a readable safetensors file ({_cause(e)}); is it complete?") from e
    return StateDict(shapes, handle.get_tensor, metadata=handle.metadata())


def _tensor_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach()
    # numpy has no bfloat16: widen (one tensor at a time); our parameters are float32 anyway.
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _torch_load(path: pathlib.Path):
    import torch

    # LlamaGen's training checkpoints also store their argparse arguments.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except RuntimeError as e:
            if "mmap" not in str(e):  # a file in torch's legacy (pre-zip) format cannot be mapped: read it
                raise
            return torch.load(path, weights_only=True, map_location="cpu")


def _open_torch(path: pathlib.Path, weights: str, prefer: tuple[str, ...]) -> StateDict:
    import torch

    try:
        checkpoint = _torch_load(path)
    except Exception as e:  # truncated zip, not a pickle, a pickle with code in it, ...
        raise UnreadableFile(f"{path}: not a readable torch checkpoint ({_cause(e)}); is it complete?") from e
    if not isinstance(checkpoint, Mapping):
        raise UnreadableFile(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    metadata = checkpoint.get(METADATA_ENTRY)
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, Mapping) else {}
    if weights == "auto":
        entry = next((e for e in prefer if isinstance(checkpoint.get(e), Mapping)), None)
    elif weights == "top":
        entry = None
    elif isinstance(checkpoint.get(weights), Mapping):
        entry = weights
    else:
        raise UnreadableFile(f"{path} has no {weights!r} state dict; its entries: {sorted(map(str, checkpoint))}")
    tensors = checkpoint if entry is None else checkpoint[entry]
    other = sorted(str(k) for k, v in tensors.items() if not isinstance(v, torch.Tensor))
    if other:
        where = (f"entry {entry!r}" if entry else "top level" if weights == "top"
                 else f"top level (no {' or '.join(map(repr, prefer))} entry)")
        raise UnreadableFile(f"{path}: the {where} is not a flat state dict: {other} are not tensors")
    return StateDict({k: tuple(v.shape) for k, v in tensors.items()}, lambda k: _tensor_to_numpy(tensors[k]),
                     metadata=metadata, entry=entry)


def save_state_dict(path, items: Iterable[tuple[str, np.ndarray]], *, metadata: Mapping[str, str]) -> None:
    """Write (key, array) pairs as `path` (.safetensors, or a torch pickle {"model": ..., "fvq_jax": metadata},
    the layout the reference's loaders read): written to a temporary name, then renamed, with the permissions any
    new file gets under the umask (0644 under the usual 022). A failed write leaves no file (nor its temporary)."""
    path = pathlib.Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(f"{path}: write a .safetensors file or a torch checkpoint ({', '.join(TORCH_SUFFIXES)})")
    metadata = {str(k): str(v) for k, v in metadata.items()}
    partial = path.with_name(path.name + ".partial")
    partial.unlink(missing_ok=True)  # a killed earlier write's, whose mode may not be the umask's
    try:
        # An empty file first: the mode it gets is the umask's, which safetensors (it writes its own file with
        # mode 0600 and renames it over ours) would not give.
        partial.touch()
        mode = stat.S_IMODE(partial.stat().st_mode)
        if path.suffix in SAFETENSORS_SUFFIXES:
            from safetensors.numpy import save_file

            # save_file writes an array's memory as it lies: a Fortran-ordered array would come back transposed.
            save_file({k: np.ascontiguousarray(v) for k, v in items}, str(partial), metadata=metadata)
        else:
            import torch

            # torch tensors must own writable memory: arrays gathered from jax are read-only views.
            model = {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in items}
            torch.save({"model": model, METADATA_ENTRY: metadata}, partial)
        os.chmod(partial, mode)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
