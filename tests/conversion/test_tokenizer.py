"""The torch <-> Flax tokenizer table: parity with the reference's outputs, exact round trips, strictness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax.conversion import tokenizer
from fvq_jax.conversion.table import StateDict, StateDictMismatch, WrongKind, flatten
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.models.vqgan import VQGANArch
from tests import reference_tokenizers as ref
from tests.nearest_codes import distances64

FIXTURE_ARCH = VQGANArch(ch=32, ch_mult=(1, 2), enc_blocks=1, dec_blocks=2, z_channels=32, norm_groups=32)


@pytest.fixture(scope="module", params=ref.NAMES)
def reference(request):
    return request.param, ref.load(request.param)


def test_spec_and_table_match_the_reference_keys(reference):
    name, r = reference
    spec = tokenizer.infer_spec(r.state_dict)
    bridged = name == "fvq"
    assert spec == tokenizer.TokenizerSpec(format=name, arch=FIXTURE_ARCH, codebook_size=256, code_dim=8,
                                           projector="XS/2" if bridged else "none", l2_norm=False)
    rows = tokenizer.table(spec)
    assert sorted(row.torch for row in rows) == sorted(r.state_dict)  # every key once, nothing else
    params = tokenizer.import_params(r.state_dict, spec)
    sd = r.state_dict
    level = params["decoder"]["levels"][1]
    np.testing.assert_array_equal(level["res"][0]["shortcut"]["kernel"],
                                  sd["decoder.conv_blocks.1.res.0.nin_shortcut.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["encoder"]["mid"]["attn"]["norm"]["scale"], sd["encoder.mid.1.norm.weight"])
    np.testing.assert_array_equal(params["encoder"]["levels"][0]["resample"]["conv"]["bias"],
                                  sd["encoder.conv_blocks.0.downsample.conv.bias"])
    if bridged:
        block = params["quantizer"]["projector"]["blocks"][1]
        np.testing.assert_array_equal(block["qkv"]["kernel"], sd["quantize.qbridge.blocks.1.attn.qkv.weight"].T)
        np.testing.assert_array_equal(params["quantizer"]["projector"]["patch_embed"]["kernel"],
                                      sd["quantize.qbridge.x_embedder.proj.weight"].transpose(2, 3, 1, 0))


def test_parity_with_the_reference_outputs(reference):
    name, r = reference
    model = tokenizer.from_torch(r.state_dict)
    ours = ref.forward(model, r.x)
    errors = ref.relative_errors(ours, r.outputs)
    print(f"{name}: max relative error " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) < 1e-4, errors
    # Identical indices: the fixture has no near-ties (the closest second-best code is 1e-4 of the distance
    # scale away, float32 rounding ~1e-7), so any difference would be a conversion error.
    z, codebook = r.outputs["h"].transpose(0, 2, 3, 1), r.outputs["codebook"]
    d = np.sort(distances64(z, codebook), axis=-1)
    scale = (z.reshape(-1, 8) ** 2).sum(-1) + (codebook.astype(np.float64) ** 2).sum(-1).mean()
    assert ((d[:, 1] - d[:, 0]) / scale).min() > 1e-5
    np.testing.assert_array_equal(ours["indices"], r.outputs["indices"])


def test_conversion_reads_each_tensor_once_and_only_then():
    sd = ref.load("fvq").state_dict
    reads = []
    state = StateDict({k: v.shape for k, v in sd.items()}, lambda k: reads.append(k) or sd[k])
    spec = tokenizer.infer_spec(state)
    assert not reads  # the architecture comes from the shapes alone
    tokenizer.import_params(state, spec)
    assert sorted(reads) == sorted(sd)


# ----------------------------------------------------------------------------- round trips

TINY_ARCH = VQGANArch(ch=16, ch_mult=(1, 2), enc_blocks=1, dec_blocks=2, z_channels=16, norm_groups=4)
ROUND_TRIPS = {
    "bridge": tokenizer.TokenizerSpec("fvq", TINY_ARCH, 64, 8, "XS/2", l2_norm=False),
    "none": tokenizer.TokenizerSpec("vqgan", TINY_ARCH, 64, 8, "none", l2_norm=False),
    "l2-norm": tokenizer.TokenizerSpec("llamagen", TINY_ARCH, 64, 8, "none", l2_norm=True),
}


def random_tokenizer(config, **quantizer):
    """The tokenizer `config` describes (quantizer fields changed by `quantizer`), every parameter random."""
    config.quantizer.update(quantizer)
    graph, params, rest = nnx.split(nnx.eval_shape(lambda: build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0))), nnx.Param, ...)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape).astype(x.dtype)), params)
    return nnx.merge(graph, params, tokenizer.initial_state(config))


def flat_params(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_round_trip_is_exact(name):
    spec = ROUND_TRIPS[name]
    model = random_tokenizer(tokenizer.model_config(spec))
    exported_spec, items = tokenizer.to_state_dict(model, None if name == "bridge" else spec.format)
    state = dict(items)
    assert exported_spec == spec
    assert (tokenizer.USAGE_BUFFER in state) == (spec.format == "llamagen")
    back = tokenizer.infer_spec(state, format=None if name == "bridge" else spec.format, norm_groups=4)
    assert back == spec
    loaded = tokenizer.from_torch(state, back)
    expected, got = flat_params(model), flat_params(loaded)
    assert got.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


@pytest.mark.parametrize("quantizer, format, message", [
    (dict(type="residual", projector="XS/2", residual_depth=2), None, "ResidualQuantizer: .* no format"),
    (dict(type="multiscale", projector="XS/2", scales=(1, 2)), "vqgan", "MultiScaleQuantizer: .* no format"),
    (dict(type="ema", projector="none", ema_decay=0.99), None, "EMAQuantizer: .* only type 'vq'"),
    (dict(projector="lin/1"), "fvq", "format fvq stores a VQBridge, and this tokenizer's projector is 'lin/1'"),
    (dict(projector="none"), "llamagen", "format llamagen means l2-normalised codes"),
])
def test_export_refuses_what_the_reference_cannot_hold(quantizer, format, message):
    model = random_tokenizer(tokenizer.model_config(ROUND_TRIPS["bridge"]), **quantizer)
    with pytest.raises(tokenizer.Unsupported, match=message):
        tokenizer.to_state_dict(model, format)


def test_reference_notes_name_what_the_reference_code_does_not_build():
    assert tokenizer.infer_spec(ref.load("fvq").state_dict).reference_notes() == []
    notes = ROUND_TRIPS["bridge"].reference_notes()
    assert len(notes) == 1 and notes[0].startswith("norm_groups=4")


# ----------------------------------------------------------------------------- strictness


def gpt_state_dict():
    """The first keys of a LlamaGen GPT (dim 64, vocab 256, 10 classes)."""
    return {"tok_embeddings.weight": np.zeros((256, 64)), "cls_embedding.embedding_table.weight": np.zeros((11, 64)),
            "layers.0.attention.wqkv.weight": np.zeros((192, 64)), "norm.weight": np.zeros(64)}


def test_bad_state_dicts_fail_clearly():
    sd = ref.load("fvq").state_dict
    spec = tokenizer.infer_spec(sd)
    with pytest.raises(WrongKind, match="LlamaGen GPT state dict .*tok_embeddings.weight.* kind 'gpt'"):
        tokenizer.infer_spec(gpt_state_dict())
    with pytest.raises(WrongKind, match="not a VQ tokenizer state dict: no encoder.conv_in.weight"):
        tokenizer.infer_spec({"quantize.embedding.weight": np.zeros((4, 2))})

    removed = ("decoder.conv_blocks.1.res.1.norm2.bias", "quantize.qbridge.blocks.0.mlp.fc2.weight")
    broken = {k: v for k, v in sd.items() if k not in removed}
    broken.update({"encoder.extra.weight": np.zeros(3), "quantize.qbridge.pos_embed": np.zeros((1, 64, 32))})
    broken["quant_conv.weight"] = np.zeros((8, 16, 1, 1), np.float32)
    broken["decoder.conv_out.bias"] = np.zeros(4, np.float32)
    with pytest.raises(StateDictMismatch) as info:
        tokenizer.import_params(broken, spec)
    message = str(info.value)
    assert info.value.missing == list(removed)
    assert info.value.unexpected == ["encoder.extra.weight", "quantize.qbridge.pos_embed"]
    assert info.value.misshaped == ["quant_conv.weight [8, 16, 1, 1] (expected [8, 32, 1, 1])",
                                    "decoder.conv_out.bias [4] (expected [3])"]
    assert message.startswith("fvq format: ch=32") and all(k in message for k in removed)

    deeper = dict(sd, **{k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items() if "qbridge.blocks.1." in k})
    with pytest.raises(tokenizer.Unsupported, match=r"VQBridge \(width 32, patch 2, depth 3\) is not a preset"):
        tokenizer.infer_spec(deeper)
    with pytest.raises(ValueError, match="format fvq needs the VQBridge keys"):
        tokenizer.infer_spec(ref.load("vqgan").state_dict, format="fvq")
    with pytest.raises(ValueError, match="format vqgan has a baked codebook, but the state dict has VQBridge keys"):
        tokenizer.infer_spec(sd, format="vqgan")


def test_llamagen_usage_buffer_is_accepted_and_not_converted():
    sd = dict(ref.load("vqgan").state_dict, **{tokenizer.USAGE_BUFFER: np.arange(65_536, dtype=np.float32)})
    spec = tokenizer.infer_spec(sd, format="llamagen")
    assert spec.l2_norm and spec.projector == "none"
    params = tokenizer.import_params(sd, spec)
    assert not any("usage" in path for path in flatten(params))
