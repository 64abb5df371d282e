"""export_vq: the exported, bridge-free tokenizer loaded fresh from disk gives the bridged one's
indices and reconstructions; no projector is left; every quantizer type round-trips; CLI errors."""

import io
import json
import pathlib
import re
from contextlib import redirect_stdout

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.value_range import to_model_range
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.models.vqgan import count_params
from fvq_jax.quantizers import vqbridge
from fvq_jax.quantizers.export import bake
from fvq_jax.tools import export_vq
from fvq_jax.models.load import load_tokenizer, saved_config
from tests.nearest_codes import assert_same_codes, assert_same_quantizer_codes
from tests.train.tiny import tiny_config


@nnx.jit
def reconstruct(model, images):
    recon, aux = model(images)
    return recon, aux["indices"], model.decode_codes(aux["indices"])


def load_tokenizer_model(path):
    return load_tokenizer(path).model


encode_features = nnx.jit(lambda model, images: model.quant_conv(model.encoder(images)))


quantize = nnx.jit(lambda quantizer, z: quantizer(z)["indices"])


def flat_state(model) -> dict:
    return {"/".join(map(str, path)): np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run exported through the CLI entry point: (workdir, out_dir, printed text)."""
    workdir, _ = tiny_run
    out = tmp_path_factory.mktemp("export") / "vq"
    text = io.StringIO()
    with redirect_stdout(text):
        export_vq.main(["--workdir", workdir, "--out", str(out)])
    return workdir, out, text.getvalue()


@pytest.fixture(scope="module")
def bridged(tiny_run):
    """The run's latest EMA generator, with its VQBridge."""
    return load_tokenizer(tiny_run[0], use_ema=True).model


def eval_images(workdir):
    data = saved_config(workdir).data
    return to_model_range(np.concatenate([b["image"] for b in data_pipeline.eval_batches(data, batch_size=8,
                                                                                          num_images=16)]))


def test_exported_tokenizer_equals_the_bridged_one(exported, bridged):
    workdir, out, _ = exported
    loaded = load_tokenizer_model(out)
    images = eval_images(workdir)
    recon, indices, _ = reconstruct(bridged, images)
    loaded_recon, loaded_indices, loaded_decoded = reconstruct(loaded, images)
    # Equal indices except near-ties: two steps after the bridge's all-equal start, codes are close.
    assert_same_codes(loaded_indices, indices, encode_features(bridged, images), bridged.quantizer.codebook())
    err = float(np.abs(np.asarray(loaded_recon) - np.asarray(recon)).max())
    decode_err = float(np.abs(np.asarray(loaded_decoded) - np.asarray(recon)).max())
    print(f"trained run: {len(np.unique(np.asarray(indices)))} codes used, max |recon diff| {err:.2e}, "
          f"max |decode_codes diff| {decode_err:.2e}")
    assert err < 1e-5 and decode_err < 1e-5
    # The searched codebook is stored as is; codes near every entry find the same index.
    codebook = np.asarray(bridged.quantizer.codebook())
    np.testing.assert_array_equal(np.asarray(loaded.quantizer.embedding[...]), codebook)
    z = codebook[np.arange(64)].reshape(4, 4, 4, 8) + 1e-4 * np.random.default_rng(0).normal(size=(4, 4, 4, 8))
    assert_same_codes(quantize(loaded.quantizer, z), quantize(bridged.quantizer, z), z, codebook)


def test_export_has_no_projector_and_says_so(exported, bridged):
    workdir, out, text = exported
    loaded = load_tokenizer_model(out)
    assert isinstance(loaded.quantizer.projector, vqbridge.Identity)
    assert not [path for path in flat_state(loaded) if "projector" in path]
    projector_params = count_params(bridged.quantizer.projector)
    assert projector_params > 0 and count_params(loaded) == count_params(bridged) - projector_params
    # Everything else (usage window included) is the bridged model's EMA weights and state.
    for path, value in flat_state(bake(bridged)).items():
        np.testing.assert_array_equal(flat_state(loaded)[path], value, err_msg=path)
    config = json.loads((out / "config" / "metadata").read_text())
    assert config["quantizer"]["projector"] == "none"
    assert saved_config(out).quantizer.projector == "none"
    assert config["export"] == {"workdir": str(pathlib.Path(workdir).absolute()), "step": 2, "weights": "ema",
                                "baked_projector": "XS/2"}
    assert "quantizer vq: K=64, D=8, projector XS/2" in text and f"({projector_params:,} params)" in text
    assert f"{count_params(loaded):,} params" in text


def test_no_ema_exports_the_raw_weights(exported, tmp_path):
    workdir, _, _ = exported
    export_vq.main(["--workdir", workdir, "--out", str(tmp_path / "raw"), "--step", "1", "--no-ema"])
    raw, ema = load_tokenizer(workdir, step=1, use_ema=False).model, load_tokenizer(workdir, step=1).model
    loaded = load_tokenizer_model(tmp_path / "raw")
    record = saved_config(tmp_path / "raw").export
    assert (record.step, record.weights, record.baked_projector) == (1, "raw", "XS/2")
    kernel = np.asarray(loaded.encoder.conv_in.kernel[...])
    np.testing.assert_array_equal(kernel, np.asarray(raw.encoder.conv_in.kernel[...]))
    assert not np.array_equal(kernel, np.asarray(ema.encoder.conv_in.kernel[...]))


# The vq type is the trained run above.
VARIANTS = {
    "residual-bridge": dict(type="residual", projector="XS/2", residual_depth=2),
    "multiscale-bridge": dict(type="multiscale", projector="XS/2", scales=(1, 2, 4)),
    "ema-l2": dict(type="ema", projector="none", l2_norm=True),
}


def random_tokenizer(config):
    """The tokenizer `config` describes, every array random (numpy: no per-op compiles)."""
    graph, state = nnx.split(nnx.eval_shape(lambda: build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    return nnx.merge(graph, jax.tree.map(
        lambda x: jnp.asarray((0.1 * rng.standard_normal(x.shape)).astype(x.dtype)), state))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_quantizer_type_round_trips(name, tmp_path):
    config = tiny_config()
    config.quantizer.update(VARIANTS[name], usage_window=256)
    model = random_tokenizer(config)
    written = export_vq.export_tokenizer(model, config, tmp_path / "out", source={})
    assert (written["type"], written["codebook_size"], written["code_dim"]) == (config.quantizer.type, 64, 8)
    loaded = load_tokenizer_model(tmp_path / "out")
    assert type(loaded.quantizer) is type(model.quantizer)
    assert type(loaded.quantizer.embedding) is type(model.quantizer.embedding)  # Param, or EMA state
    expected = flat_state(bake(model))
    assert flat_state(loaded).keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(flat_state(loaded)[path], value, err_msg=path)
    z = jax.random.normal(jax.random.key(1), (2, 4, 4, 8)) * np.abs(expected["quantizer/embedding"]).mean()
    indices = np.asarray(quantize(model.quantizer, z))
    assert_same_quantizer_codes(model.quantizer, z, quantize(loaded.quantizer, z), indices)
    assert len(np.unique(indices)) > 4


def test_cli_errors_are_clear(tiny_run, tmp_path, capsys):
    workdir, _ = tiny_run
    cases = [
        (["--out", str(tmp_path / "a")], "the following arguments are required: --workdir"),
        (["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "b")], "no checkpoint under"),
        (["--workdir", workdir, "--out", str(tmp_path / "c"), "--step", "7"],
         r"no checkpoint of step 7 in .*; saved steps: \[1, 2\]"),
        (["--workdir", workdir, "--out", str(tmp_path)], "already exists; choose a new directory"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            export_vq.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m fvq_jax.tools.export_vq") and re.search(message, err), err
