"""LlamaGen GPT state dict <-> our parameters: the reference's outputs reproduced, exact round trips, strictness."""

import jax.numpy as jnp
import numpy as np
import pytest

from fvq_jax.conversion import gpt as conversion
from fvq_jax.sampling.sampler import SamplingConfig, sample_keys, sample_tokens, sample_tokens_naive
from tests.models.tiny_gpt import fixture, fixture_gpt, fixture_state_dict, forward


@pytest.fixture(scope="module")
def data():
    return fixture()


@pytest.fixture(scope="module")
def model():
    return fixture_gpt()


def test_infer_config():
    config = conversion.infer_config(fixture_state_dict(), n_head=4, grid=4, class_dropout=0.0)
    assert (config.dim, config.n_layer, config.n_head, config.head_dim) == (64, 2, 4, 16)
    assert (config.vocab_size, config.num_classes, config.grid, config.ffn_dim) == (256, 10, 4, 256)
    assert config.class_dropout == 0.0 and config.token_dropout == 0.1
    with pytest.raises(ValueError, match=r"n_head=5 does not divide .*dim=64.*\[1, 2, 4, 8, 16, 32, 64\]"):
        conversion.infer_config(fixture_state_dict(), n_head=5, grid=4)


def test_forward_reproduces_the_reference_logits(data, model):
    logits = np.asarray(forward(model, jnp.asarray(data["in/tokens"][:, :-1]), jnp.asarray(data["in/labels"])))
    want = data["out/logits"]
    assert logits.shape == want.shape == (3, 16, 256)
    rel = np.abs(logits - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel  # measured 3e-7 (jax 0.10.2, x86 CPU)
    np.testing.assert_array_equal(logits.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("scale", [1.0, 2.5])
@pytest.mark.parametrize("sampler", [sample_tokens, sample_tokens_naive])
def test_greedy_cfg_sampling_reproduces_the_reference(data, model, scale, sampler):
    labels = jnp.asarray(data["in/sample_labels"])
    tokens = sampler(model, labels, sample_keys(0, 0, 3), SamplingConfig(top_k=1, cfg_scale=scale))
    np.testing.assert_array_equal(np.asarray(tokens), data[f"out/greedy_cfg{scale}"])


def test_round_trips_are_exact(model):
    state = fixture_state_dict()
    config = model.config
    ours = conversion.model_params(model)
    theirs = conversion.to_torch(ours, config)
    assert set(theirs) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
        assert theirs[key].flags.c_contiguous
    back = conversion.from_torch(theirs, config)
    assert set(back) == set(ours)
    for name, value in ours.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_hooks_put_each_head_where_the_reference_reads_it(model):
    """q, k, v of head h are rows [s*dim + h*hd, s*dim + (h+1)*hd) of wqkv; wo reads head h from columns
    [h*hd, (h+1)*hd)."""
    state = fixture_state_dict()
    params = conversion.model_params(model)
    dim, hd = 64, 16
    wqkv, wo = state["layers.1.attention.wqkv.weight"], state["layers.1.attention.wo.weight"]
    for s in range(3):
        for h in range(4):
            rows = wqkv[s * dim + h * hd: s * dim + (h + 1) * hd]
            np.testing.assert_array_equal(params["layers.1.attention.wqkv.kernel"][:, s, h], rows.T)
    for h in range(4):
        np.testing.assert_array_equal(params["layers.1.attention.wo.kernel"][h], wo[:, h * hd:(h + 1) * hd].T)
    np.testing.assert_array_equal(params["output.kernel"], state["output.weight"].T)
    np.testing.assert_array_equal(params["cls_embedding.embedding"], state["cls_embedding.embedding_table.weight"])


def test_every_problem_is_listed(model):
    state = dict(fixture_state_dict())
    del state["layers.0.ffn_norm.weight"]
    del state["norm.weight"]
    state["layers.0.attention.wqkv.bias"] = np.zeros(192, np.float32)
    state["layers.1.feed_forward.w2.weight"] = np.zeros((64, 255), np.float32)
    with pytest.raises(ValueError) as error:
        conversion.from_torch(state, model.config)
    message = str(error.value)
    for expected in ("missing ['layers.0.ffn_norm.weight', 'norm.weight']",
                     "unexpected ['layers.0.attention.wqkv.bias']",
                     "layers.1.feed_forward.w2.weight: (64, 255), expected (64, 256)"):
        assert expected in message, message
    params = conversion.model_params(model)
    params["output.kernel"] = params["output.kernel"].T
    del params["norm.scale"]
    with pytest.raises(ValueError, match=r"missing \['norm.scale'\].*output.kernel: \(256, 64\), expected \(64, 256\)"):
        conversion.to_torch(params, model.config)
    with pytest.raises(ValueError, match="missing"):
        conversion.load_params(model, params)


def test_bf16_model_from_the_same_weights(data):
    model = fixture_gpt(dtype=jnp.bfloat16)
    logits = np.asarray(forward(model, jnp.asarray(data["in/tokens"][:, :-1]), jnp.asarray(data["in/labels"])))
    want = data["out/logits"]
    assert np.abs(logits - want).max() < 0.05 * np.abs(want).max()
