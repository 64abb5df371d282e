"""configs/tokenizer.py: argument parsing, presets, and errors that name the bad field."""

import pathlib

import pytest

from fvq_jax import config_lib
from fvq_jax.train.tokenizer import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config_module(name):
    return config_lib.load_file(ROOT / "configs" / f"{name}.py")


tokenizer = load_config_module("tokenizer")


def test_default_is_the_local_photo_run():
    config = tokenizer.get_config()
    resolve(config)
    assert config.data.source == "photos"
    assert config.quantizer.projector == "S/4" and config.quantizer.codebook_size == 1024


def test_paper_recipe():
    config = tokenizer.get_config("paper")
    resolve(config)
    assert config.model.ch_mult == (1, 1, 2, 2, 4) and config.model.dec_blocks == 3
    assert (config.quantizer.codebook_size, config.quantizer.code_dim, config.quantizer.projector) == (16384, 256, "L/4")
    assert config.data.image_size == 256 and config.train.global_batch == 128
    assert config.loss.disc_start == 20_000 and config.loss.disc_weight == 0.5
    assert (config.optim.b1, config.optim.b2, config.optim.grad_clip) == (0.9, 0.95, 1.0)


def test_first_class_knobs_from_the_argument():
    config = tokenizer.get_config("paper,codebook=262144,dim=128,bridge=L/8,model=VQ-8,res=128")
    resolve(config)
    assert config.quantizer.codebook_size == 262144 and config.quantizer.code_dim == 128
    assert config.quantizer.projector == "L/8"
    assert config.model.preset == "VQ-8" and config.model.ch_mult == (1, 2, 2, 4)
    assert config.data.image_size == 128


@pytest.mark.parametrize("arg,field,message", [
    ("codebook=1000", "quantizer.codebook_size", "not a perfect square"),
    ("codebook=1296,bridge=L/8", "quantizer.codebook_size", "not divisible by the bridge patch size 8"),
    ("bridge=L/3", "quantizer.projector", "unknown projector"),
    ("dim=0", "quantizer.code_dim", "must be an int > 0"),
    ("quantizer=foo", "quantizer.type", "is not one of"),
    ("res=16", "discriminator.num_layers", "3 stride-2 layers leave no logits for 16x16 images"),
])
def test_bad_values_name_the_field(arg, field, message):
    config = tokenizer.get_config(arg)
    with pytest.raises(config_lib.ConfigError, match=message) as info:
        resolve(config)
    assert info.value.field == field
    assert str(info.value).startswith(f"config field {field}:")


def test_bad_model_fields_name_the_field():
    config = tokenizer.get_config()
    config.model.norm_groups = 7
    with pytest.raises(config_lib.ConfigError, match="model.norm_groups"):
        resolve(config)
    config = tokenizer.get_config()
    config.model.ch_mult = ()
    with pytest.raises(config_lib.ConfigError, match="model.ch_mult"):
        resolve(config)
    with pytest.raises(config_lib.ConfigError, match="model.preset"):
        tokenizer.get_config("model=VQ-12")


def test_bad_arguments_are_reported():
    with pytest.raises(config_lib.ConfigError, match="unknown key 'codebok'"):
        tokenizer.get_config("codebok=1024")
    with pytest.raises(config_lib.ConfigError, match="unknown word 'papr'"):
        tokenizer.get_config("papr")
    with pytest.raises(config_lib.ConfigError, match="expected an integer"):
        tokenizer.get_config("codebook=big")


def test_parse_arg_keeps_brackets_together():
    flags, values = config_lib.parse_arg("a,x=(1,2,3),y=L/4,z=true", flags=("a",),
                                         keys={"x": (1,), "y": "", "z": False})
    assert flags == {"a"} and values == {"x": (1, 2, 3), "y": "L/4", "z": True}


def test_spec_from_config_names_the_dotted_field():
    import dataclasses

    import ml_collections
    import pytest

    from fvq_jax import config_lib

    @dataclasses.dataclass(frozen=True)
    class Block(config_lib.Spec):
        size: int = 1
        name: str = "a"

        def __post_init__(self):
            config_lib.require_number(self.size, "size", integer=True)

    block = ml_collections.ConfigDict(dict(size=3, name="b", other=1.5))
    assert Block.from_config(block, "outer") == Block(3, "b")  # fields the spec does not declare are not its own
    with pytest.raises(config_lib.ConfigError, match=r"config field outer\.size: must be an int > 0.0, got 0") as info:
        Block.from_config(dict(size=0), "outer")
    assert info.value.field == "outer.size"
    with pytest.raises(config_lib.ConfigError) as info:
        Block(size=-1)
    assert info.value.field == "size"
