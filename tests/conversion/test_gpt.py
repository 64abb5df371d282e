"""LlamaGen GPT state dict <-> our parameters: the config read from the shapes, the reference's outputs reproduced,
exact round trips, strictness; the scanned layout converts like the looped one, and checkpoints and exports
written in the looped layout before scanning existed load in either."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import checkpointing, sharding
from fvq_jax.conversion import gpt as conversion
from fvq_jax.conversion.table import StateDict, StateDictMismatch, WrongKind, flatten
from fvq_jax.models.gpt import GPTConfig, stack_layers
from fvq_jax.models.load import load_gpt
from fvq_jax.sampling.sampler import SamplingConfig, sample_keys, sample_tokens, sample_tokens_naive
from fvq_jax.tools import export_torch
from fvq_jax.train.state import TrainState
from tests import reference_tokenizers as ref
from tests.models.tiny_gpt import fixture, fixture_gpt, fixture_state_dict, forward, param_arrays


@pytest.fixture(scope="module")
def data():
    return fixture()


@pytest.fixture(scope="module")
def model():
    return fixture_gpt()


@pytest.fixture(scope="module")
def scanned():
    return fixture_gpt(scan_layers=True)


def _logits(model, data):
    return np.asarray(forward(model, jnp.asarray(data["in/tokens"][:, :-1]), jnp.asarray(data["in/labels"])))


def test_infer_config():
    state = fixture_state_dict()
    config = conversion.infer_config(state, grid=4, class_dropout=0.0)
    # (dim 64, n_layer 2) is the GPT-tiny preset: its 4 heads.
    assert (config.dim, config.n_layer, config.n_head, config.head_dim) == (64, 2, 4, 16)
    assert (config.vocab_size, config.num_classes, config.grid, config.ffn_dim) == (256, 10, 4, 256)
    assert config.class_dropout == 0.0 and config.token_dropout == config.resid_dropout == config.ffn_dropout == 0.1
    assert (config.rope_base, config.norm_eps, config.preset, config.scan_layers) == (10000.0, 1e-5, "GPT-tiny", False)
    assert conversion.infer_config(state, grid=4, n_head=8).n_head == 8
    assert conversion.infer_config(state, grid=4, n_head=8).preset == "custom"
    # What a file we exported records is read back; an argument wins.
    recorded = StateDict(StateDict.of(state).shapes, state.__getitem__, metadata={"n_head": "2", "grid": "4"})
    assert (conversion.infer_config(recorded).n_head, conversion.infer_config(recorded, n_head=8).n_head) == (2, 8)

    with pytest.raises(ValueError, match=r"n_head=5 does not divide .*dim=64.*\[1, 2, 4, 8, 16, 32, 64\]"):
        conversion.infer_config(state, n_head=5, grid=4)
    with pytest.raises(ValueError, match=r"token grid is not stored .*give grid \(import_torch --grid\)"):
        conversion.infer_config(state)
    deeper = dict(state, **{k.replace("layers.1.", "layers.2."): v for k, v in state.items() if "layers.1." in k})
    with pytest.raises(ValueError, match=r"dim=64, n_layer=3 match no preset .*GPT-tiny \(64/2/4\).*--n-head"):
        conversion.infer_config(deeper, grid=4)
    assert conversion.infer_config(deeper, grid=4, n_head=4).n_layer == 3
    with pytest.raises(WrongKind, match=r"this is a VQ tokenizer state dict \(it has encoder.conv_in.weight, "
                                        r"quantize.embedding.weight\), not a LlamaGen GPT: convert it as kind "
                                        r"'tokenizer'"):
        conversion.infer_config(ref.load("vqgan").state_dict, grid=4)


def test_model_config_rebuilds_the_config():
    for config in (conversion.infer_config(fixture_state_dict(), grid=4),
                   conversion.infer_config(fixture_state_dict(), grid=4, n_head=8, scan_layers=True)):
        block = conversion.model_config(config)
        assert (block.task, block.precision) == ("gpt", "fp32")
        assert GPTConfig.from_config(block.model, "model") == config


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
    theirs = dict(conversion.to_state_dict(model))
    assert list(theirs) == [row.torch for row in conversion.table(model.config)]
    assert sorted(theirs) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(theirs[key], value, err_msg=key)
        assert theirs[key].flags.c_contiguous and theirs[key].dtype == np.float32
    ours = param_arrays(model)
    back = flatten(conversion.import_params(theirs, model.config))
    assert sorted(back) == sorted(ours)
    for path, value in ours.items():
        np.testing.assert_array_equal(back[path], value, err_msg=path)


def test_hooks_put_each_head_where_the_reference_reads_it(model):
    """q, k, v of head h are rows [s*dim + h*hd, s*dim + (h+1)*hd) of wqkv; wo reads head h from columns
    [h*hd, (h+1)*hd)."""
    state = fixture_state_dict()
    params = param_arrays(model)
    dim, hd = 64, 16
    wqkv, wo = state["layers.1.attention.wqkv.weight"], state["layers.1.attention.wo.weight"]
    for s in range(3):
        for h in range(4):
            rows = wqkv[s * dim + h * hd: s * dim + (h + 1) * hd]
            np.testing.assert_array_equal(params["layers/1/attention/wqkv/kernel"][:, s, h], rows.T)
    for h in range(4):
        np.testing.assert_array_equal(params["layers/1/attention/wo/kernel"][h], wo[:, h * hd:(h + 1) * hd].T)
    np.testing.assert_array_equal(params["output/kernel"], state["output.weight"].T)
    np.testing.assert_array_equal(params["cls_embedding/embedding"], state["cls_embedding.embedding_table.weight"])


def test_every_problem_is_listed(model):
    state = dict(fixture_state_dict())
    del state["layers.0.ffn_norm.weight"]
    del state["norm.weight"]
    state["layers.0.attention.wqkv.bias"] = np.zeros(192, np.float32)
    state["layers.1.feed_forward.w2.weight"] = np.zeros((64, 255), np.float32)
    with pytest.raises(StateDictMismatch) as error:
        conversion.import_params(state, model.config)
    message = str(error.value)
    for expected in ("LlamaGen GPT, dim=64 n_layer=2 n_head=4 ffn_dim=256 vocab_size=256 num_classes=10 grid=4: "
                     "the state dict does not match",
                     "missing (2): layers.0.ffn_norm.weight, norm.weight",
                     "unexpected (1): layers.0.attention.wqkv.bias",
                     "wrong shape (1): layers.1.feed_forward.w2.weight [64, 255] (expected [64, 256])"):
        assert expected in message, message


def test_bf16_model_from_the_same_weights(data):
    model = fixture_gpt(dtype=jnp.bfloat16)
    logits = np.asarray(forward(model, jnp.asarray(data["in/tokens"][:, :-1]), jnp.asarray(data["in/labels"])))
    want = data["out/logits"]
    assert np.abs(logits - want).max() < 0.05 * np.abs(want).max()


def test_scanned_gpt_converts_like_the_looped_one(data, model, scanned):
    """The reference's weights in the stacked layout: the same torch file both ways, the reference's logits and
    greedy CFG samples."""
    assert scanned.config.scan_layers and scanned.layers.attention.wqkv.kernel[...].shape == (2, 64, 3, 4, 16)
    state = fixture_state_dict()
    theirs = conversion.to_state_dict(scanned)
    assert [key for key, _ in theirs] == [row.torch for row in conversion.table(model.config)]
    for key, value in conversion.to_state_dict(scanned):
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    stacked = flatten(conversion.import_params(state, scanned.config))
    looped = flatten(stack_layers(conversion.import_params(state, model.config)))
    assert sorted(stacked) == sorted(looped)
    for path, value in looped.items():
        np.testing.assert_array_equal(stacked[path], value, err_msg=path)
    np.testing.assert_allclose(_logits(scanned, data), _logits(model, data), rtol=1e-6, atol=1e-6)
    labels = jnp.asarray(data["in/sample_labels"])
    for sampler in (sample_tokens, sample_tokens_naive):
        tokens = sampler(scanned, labels, sample_keys(0, 0, 3), SamplingConfig(top_k=1, cfg_scale=2.5))
        np.testing.assert_array_equal(np.asarray(tokens), data["out/greedy_cfg2.5"])


# The model block as export configs and GPT runs saved it before scanned layers and remat policies existed.
OLD_BLOCK = dict(preset="GPT-tiny", dim=None, n_layer=None, n_head=None, ffn_dim=None, vocab_size=256,
                 num_classes=10, grid=4, token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, class_dropout=0.1,
                 rope_base=10000.0, norm_eps=1e-5, remat=False)


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def test_looped_checkpoints_and_exports_written_before_scanning_load(tmp_path, data, model):
    """An export and a run checkpoint holding `layers/<i>/...` and an old config load as they were saved, or as a
    scanned GPT (load_gpt(scan_layers=True), e.g. to fine-tune with a scanned config); the same logits."""
    old = dict(task="gpt", precision="fp32", model=OLD_BLOCK, mesh=sharding.default_mesh_config())
    checkpointing.save_export(tmp_path / "export", {"params": _params(model), "state": {}}, old)
    run = checkpointing.Checkpointer(tmp_path / "run" / "checkpoints", async_save=False)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    run.save(7, TrainState(step=jnp.int32(7), params=params, model_state=rest, opt_state={}, ema_params=None),
             config=dict(old, optim=dict(ema_decay=0.0)))
    want = _logits(model, data)
    for path in (tmp_path / "export", tmp_path / "run"):
        loaded = load_gpt(path)
        assert not loaded.model.config.scan_layers and loaded.model.config.remat == "none"
        np.testing.assert_array_equal(_logits(loaded.model, data), want)
        converted = load_gpt(path, scan_layers=True).model
        assert converted.config.scan_layers and converted.layers.ffn_norm.scale[...].shape == (2, 64)
        np.testing.assert_allclose(_logits(converted, data), want, rtol=1e-6, atol=1e-6)


def _safetensors(path) -> tuple[dict, bytes]:
    """(the header as JSON, the data bytes) of a .safetensors file: its header's metadata map is written in
    no fixed order."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


def test_scanned_export_loads_and_writes_the_looped_torch_file(tmp_path, data, model, scanned):
    """A scanned GPT's export loads scanned (or looped), and export_torch writes the files it writes for the looped
    GPT: the .pt byte for byte, the .safetensors up to its header's order (both exported from the same path, which
    the files record)."""
    pytest.importorskip("torch")  # writes the .pt
    export = tmp_path / "export"
    for gpt in (model, scanned):
        config = conversion.model_config(gpt.config).to_dict()
        checkpointing.save_export(export, {"params": _params(gpt), "state": {}}, config)
        assert load_gpt(export).model.config == gpt.config
        looped = load_gpt(export, scan_layers=False).model
        np.testing.assert_allclose(_logits(looped, data), _logits(gpt, data), rtol=1e-6, atol=1e-6)
        (tmp_path / str(gpt.config.scan_layers)).mkdir()
        for suffix in (".pt", ".safetensors"):
            export_torch.export(export, tmp_path / str(gpt.config.scan_layers) / f"gpt{suffix}")
        shutil.rmtree(export)
    assert (tmp_path / "True" / "gpt.pt").read_bytes() == (tmp_path / "False" / "gpt.pt").read_bytes()
    assert _safetensors(tmp_path / "True" / "gpt.safetensors") == _safetensors(tmp_path / "False" / "gpt.safetensors")
