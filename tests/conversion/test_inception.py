"""The torch -> Flax Inception mapping: complete tables, both layouts, the hooks, strictness."""

import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax.conversion import inception as conversion
from fvq_jax.models.inception import ConvBN, parameter_names
from tests.inception_weights import nvlabs_state_dict, require_torch_inception


@pytest.fixture(scope="module")
def tf_state():
    """NVlabs-layout tensors (fid-helper's weights plus a stand-in head) as numpy."""
    torch, network = require_torch_inception()
    return {k: v.numpy() for k, v in nvlabs_state_dict(torch, network).items()}


def to_torchvision(state):
    """The same weights in pytorch-fid's layout (unit batch-norm scale, counters, fc bias)."""
    out = {}
    for layer in conversion.CONV_LAYERS:
        theirs, ours = "layers." + conversion.TF_GRAPH_NAMES[layer], conversion.torchvision_name(layer)
        out[f"{ours}.conv.weight"] = state[f"{theirs}.weight"]
        out[f"{ours}.bn.weight"] = np.ones_like(state[f"{theirs}.beta"])
        out[f"{ours}.bn.bias"] = state[f"{theirs}.beta"]
        out[f"{ours}.bn.running_mean"] = state[f"{theirs}.mean"]
        out[f"{ours}.bn.running_var"] = state[f"{theirs}.var"]
        out[f"{ours}.bn.num_batches_tracked"] = np.array(0)
    out["fc.weight"], out["fc.bias"] = state["output.weight"], state["output.bias"]
    return out


def test_tables_cover_the_network_and_the_file(tf_state):
    ours = set(parameter_names(with_logits=True))
    weights, layout = conversion.convert(tf_state)  # raises on any unconsumed tensor
    assert layout is conversion.TF_GRAPH and set(weights) == ours
    assert len(conversion.CONV_LAYERS) == 94
    shapes = parameter_names(with_logits=True)
    for name, value in weights.items():
        assert value.shape == shapes[name], name
    # One factorised 1x7 conv: OIHW [128, 128, 1, 7] -> HWIO [1, 7, 128, 128].
    np.testing.assert_array_equal(weights["mixed_6b.branch7x7_2.kernel"],
                                  tf_state["layers.mixed_4.tower.conv_1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(weights["logits_kernel"], tf_state["output.weight"].T)


def test_torchvision_layout_gives_the_same_weights(tf_state):
    from_tf, _ = conversion.convert(tf_state)
    from_tv, layout = conversion.convert(to_torchvision(tf_state))
    assert layout is conversion.TORCHVISION and from_tv.keys() == from_tf.keys()
    for name in from_tf:
        np.testing.assert_array_equal(from_tv[name], from_tf[name], err_msg=name)


def test_fold_bn_scale_matches_torch_batch_norm():
    torch, _ = require_torch_inception()
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 3, 3, 3)).astype(np.float32)
    scale, beta = rng.uniform(0.5, 2, 5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    mean, var = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 2, 5).astype(np.float32)
    x = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    t = F.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(w))
    ref = F.relu(F.batch_norm(t, torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(scale),
                              torch.from_numpy(beta), False, 0.1, 1e-3)).permute(0, 2, 3, 1).numpy()
    layer = ConvBN(3, 5, 3)
    kernel, folded_mean = conversion.fold_bn_scale(conversion.conv_kernel(w), mean, scale)
    layer.kernel[...], layer.mean[...] = jnp.asarray(kernel), jnp.asarray(folded_mean)
    layer.beta[...], layer.var[...] = jnp.asarray(beta), jnp.asarray(var)
    np.testing.assert_allclose(layer(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)


def test_foreign_or_incomplete_state_dicts_raise(tf_state):
    with pytest.raises(ValueError, match="not an FID Inception-v3 state dict"):
        conversion.convert({"features.0.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match="unexpected tensors"):
        conversion.convert({**tf_state, "layers.extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="missing 'layers.mixed_10.conv.var'"):
        conversion.convert({k: v for k, v in tf_state.items() if k != "layers.mixed_10.conv.var"})
