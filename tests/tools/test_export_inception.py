"""Export tool round trip, checksum record, default location, and the loader's errors."""

import hashlib

import jax
import numpy as np
import pytest
from flax import nnx

from fvq_jax import files
from fvq_jax.models import inception
from fvq_jax.tools import export_inception
from tests.inception_weights import require_torch_inception


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """fid-helper's network exported through the CLI entry point."""
    require_torch_inception()
    out = tmp_path_factory.mktemp("export") / "inception.npz"
    export_inception.main(["--out", str(out)])
    return out


def test_round_trip(exported):
    torch, network = require_torch_inception()
    sha = hashlib.sha256(exported.read_bytes()).hexdigest()
    assert inception.checksum_path(exported).read_text() == f"{sha}  {exported.name}\n"
    model = inception.load_inception(exported)
    assert model.weights_sha256 == sha and not model.with_logits
    assert "default_1.pt" in model.weights_source
    assert jax.tree.leaves(nnx.state(model, nnx.Param)) == []  # frozen weights, nothing to train
    state = torch.jit.load(str(network), map_location="cpu").state_dict()
    torch_kernel = state["net.layers.mixed_10.tower_1_mixed_conv_1.weight"].numpy()  # OIHW [384, 384, 3, 1]
    np.testing.assert_array_equal(model.mixed_7c.branch3x3dbl_3b.kernel[...], torch_kernel.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(model.conv_1a_3x3.var[...], state["net.layers.conv.var"].numpy())


def test_default_location_follows_env(exported, monkeypatch):
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(exported))
    assert inception.default_weights_path() == exported
    assert inception.load_inception().weights_sha256 == files.sha256(exported)
    monkeypatch.delenv(inception.WEIGHTS_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/some/cache")
    assert str(inception.default_weights_path()) == "/some/cache/fvq_jax/inception_fid.npz"


def test_missing_weights_say_how_to_export(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        inception.load_inception(tmp_path / "nowhere.npz")
    message = str(info.value)
    assert "python -m fvq_jax.tools.export_inception" in message
    assert "pip install 'fvq_jax[torch]'" in message


def test_changed_file_is_refused(exported, tmp_path):
    copy = tmp_path / "copy.npz"
    copy.write_bytes(exported.read_bytes())
    inception.checksum_path(copy).write_text("0" * 64 + "  copy.npz\n")
    with pytest.raises(ValueError, match="changed since it was exported"):
        inception.load_inception(copy)


def test_other_npz_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, w=np.zeros(3))
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        inception.load_inception(path)
