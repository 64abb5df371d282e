"""The reference PyTorch tokenizers of tests/fixtures/ (see its README): state dicts, inputs, outputs, our
forward laid out like theirs (NCHW), and small helpers of the interop tests."""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fvq_jax.conversion.table import flatten

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
NAMES = ("fvq", "vqgan")


@dataclasses.dataclass(frozen=True)
class Reference:
    state_dict: dict[str, np.ndarray]  # reference key -> array (torch layouts)
    x: np.ndarray  # [B, 3, H, W] NCHW in [-1, 1]
    outputs: dict[str, np.ndarray]  # h, codebook, indices, z_q, vq_loss, commit_loss, rec


def load(name: str) -> Reference:
    """The fixture tokenizer_<name>_tiny.npz, name in NAMES."""
    data = np.load(FIXTURES / f"tokenizer_{name}_tiny.npz")
    return Reference(state_dict={k[len("sd/"):]: data[k] for k in data.files if k.startswith("sd/")},
                     x=data["in/x"], outputs={k[len("out/"):]: data[k] for k in data.files if k.startswith("out/")})


@nnx.jit
def _forward(model, x):
    h = model.quant_conv(model.encoder(x))
    aux = model.quantizer(h)
    return dict(h=h, codebook=model.quantizer.codebook(), indices=aux["indices"], z_q=aux["z_q"],
                vq_loss=aux["codebook_loss"], commit_loss=aux["commitment_loss"], rec=model.decode(aux["z_q"]))


def forward(model, x_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """Our tokenizer's outputs under the fixture's names and layouts (NCHW images and features)."""
    out = {k: np.asarray(v) for k, v in _forward(model, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))).items()}
    for k in ("h", "z_q", "rec"):
        out[k] = out[k].transpose(0, 3, 1, 2)
    return out


def relative_errors(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """max |ours - reference| / max |reference| for every float output."""
    return {k: float(np.abs(ours[k] - v).max() / np.abs(v).max()) for k, v in reference.items() if k != "indices"}


def flat_state(model) -> dict[str, np.ndarray]:
    """Every variable of `model` (parameters and state) as {slash-separated path: numpy array}."""
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model))).items()}


def write_safetensors(state_dict: dict[str, np.ndarray], path):
    """The state dict as a .safetensors file (C order: safetensors writes an array's memory as it lies, and
    the vqgan fixture's codebook is Fortran-ordered)."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    return path
