"""FVQ -> plain VQ export: the baked tokenizer gives the same indices and reconstructions."""

import jax
import numpy as np
import pytest
from flax import nnx

from fvq_jax.models.vqgan import count_params
from fvq_jax.quantizers import vqbridge
from fvq_jax.quantizers.ema import EMAQuantizer
from fvq_jax.quantizers.factory import QUANTIZER_TYPES, build_quantizer
from fvq_jax.quantizers.multiscale import MultiScaleQuantizer
from fvq_jax.quantizers.residual import ResidualQuantizer
from fvq_jax.quantizers.vq import VectorQuantizer
from fvq_jax.quantizers.export import bake, bake_codebook
from tests.nearest_codes import assert_same_codes, assert_same_quantizer_codes
from tests.quantizers import tiny_model

VARIANTS = {
    "vq-bridge": dict(type="vq", projector="XS/2"),
    "vq-lin5-l2": dict(type="vq", projector="lin/5", l2_norm=True),
    "residual-bridge": dict(type="residual", projector="XS/2"),
    "multiscale-bridge": dict(type="multiscale", projector="XS/2"),
    "ema-l2": dict(type="ema", projector="none", l2_norm=True),
}


def test_factory_builds_each_type():
    classes = {"vq": VectorQuantizer, "residual": ResidualQuantizer, "multiscale": MultiScaleQuantizer,
               "ema": EMAQuantizer}
    assert set(classes) == set(QUANTIZER_TYPES)
    for fields in VARIANTS.values():
        q = nnx.eval_shape(lambda: build_quantizer(tiny_model.quantizer_config(**fields), rngs=nnx.Rngs(0)))
        assert type(q) is classes[fields["type"]]
        assert q.projector_name == fields["projector"] and q.l2_norm == fields.get("l2_norm", False)
    assert nnx.eval_shape(lambda: build_quantizer(tiny_model.quantizer_config(type="residual"),
                                                  rngs=nnx.Rngs(0))).depth == 3
    assert nnx.eval_shape(lambda: build_quantizer(tiny_model.quantizer_config(type="multiscale"),
                                                  rngs=nnx.Rngs(0))).scales == tiny_model.TINY_SCALES


def _model(fields):
    model = tiny_model.tiny_vqgan(**fields)
    if fields["projector"] in vqbridge.BRIDGE_PRESETS:
        tiny_model.randomize_bridge_head(model)
    # The raw codes start within 1/K of zero: spread them where nothing else would (EMA), and for the
    # Linear projectors, whose torch-default bias would otherwise make every output code alike.
    if fields["type"] == "ema" or fields["projector"] in ("lin/1", "lin/5"):
        model.quantizer.embedding[...] = jax.random.normal(jax.random.key(3), model.quantizer.embedding.shape)
    return model


@pytest.mark.parametrize("name", list(VARIANTS))
def test_baked_tokenizer_is_equivalent(name):
    fields = VARIANTS[name]
    model = _model(fields)
    images = tiny_model.smooth_images(seed=5)
    recon, indices = tiny_model.reconstruct(model, images)
    codebook = np.asarray(model.quantizer.codebook())

    baked = bake(model)
    q = baked.quantizer
    assert type(q) is type(model.quantizer)
    assert q.projector_name == "none" and isinstance(q.projector, vqbridge.Identity) and count_params(q.projector) == 0
    assert type(q.embedding) is type(model.quantizer.embedding)  # Param stays Param, EMA state stays EMA state
    np.testing.assert_array_equal(np.asarray(q.embedding[...]), codebook)
    # The source is untouched, and the rest of the tokenizer is shared, not copied.
    assert model.quantizer.projector_name == fields["projector"]
    assert baked.encoder.conv_in.kernel[...] is model.encoder.conv_in.kernel[...]

    baked_recon, baked_indices = tiny_model.reconstruct(baked, images)
    # Equal indices except near-ties (the two paths round differently on some CPUs, see nearest_codes).
    z = nnx.jit(lambda m, x: m.quant_conv(m.encoder(x)))(model, images)
    assert_same_quantizer_codes(model.quantizer, z, baked_indices, indices)
    assert len(np.unique(np.asarray(indices))) > 1
    err = float(np.abs(np.asarray(baked_recon) - np.asarray(recon)).max())
    decode_err = float(np.abs(np.asarray(tiny_model.decode_codes(baked, indices)) - np.asarray(recon)).max())
    print(f"{name}: max |recon diff| {err:.2e}, max |baked decode_codes - recon| {decode_err:.2e}")
    assert err < 1e-5 and decode_err < 1e-5


def test_bake_codebook_on_its_own():
    q = tiny_model.tiny_vqgan(type="vq", projector="lin/1").quantizer
    baked = bake_codebook(q)
    z = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 0.02
    assert_same_codes(baked(z)["indices"], q(z)["indices"], z, q.codebook())
    assert len(jax.tree.leaves(nnx.state(baked, nnx.Param))) == 1  # only the raw codebook is left
    with pytest.raises(TypeError, match="takes a VectorQuantizer"):
        bake_codebook(q.projector)
