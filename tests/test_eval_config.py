"""configs/eval_tokenizer.py: overrides left None take the run's values; the paper protocol flag."""

import pytest

from fvq_jax import config_lib
from fvq_jax.data.spec import DataSpec
from fvq_jax.evaluation.tokenizer_eval import METRICS, EvalSpec, resolve
from tests.test_configs import load_config_module

eval_tokenizer = load_config_module("eval_tokenizer")
tokenizer = load_config_module("tokenizer")


def test_default_evaluates_like_the_run():
    config = eval_tokenizer.get_config()
    assert config.task == "eval_tokenizer"
    spec = resolve(config)
    assert (spec.step, spec.use_ema) == (0, True)
    assert all(v is None for v in config.data.to_dict().values())
    run = tokenizer.get_config("res=32")  # the local photo run, at 32 x 32
    data, evaluation = spec.resolve_run(run)
    assert data == DataSpec.from_config(run.data, "data")
    assert evaluation == EvalSpec.from_config(run.eval, "eval")


def test_imagenet_protocol_overrides_only_the_eval_data():
    data, evaluation = resolve(eval_tokenizer.get_config("imagenet")).resolve_run(tokenizer.get_config())
    d = data
    assert (d.source, d.tfds_name, d.eval_split, d.image_size) == ("tfds", "imagenet2012", "validation", 256)
    assert (d.train_crop, d.num_workers) == ("zoom", 0)  # the rest stays the run's
    assert evaluation.num_images == 50_000 and tuple(evaluation.metrics) == METRICS
    assert evaluation.batch_size == 16  # the local run's eval batch


def test_argument_keys():
    config = eval_tokenizer.get_config("step=120,ema=false,res=128,images=100,batch=32,data=folder,split=val")
    assert (config.eval.step, config.eval.use_ema, config.eval.num_images, config.eval.batch_size) == (
        120, False, 100, 32)
    assert (config.data.image_size, config.data.source, config.data.eval_split) == (128, "folder", "val")
    with pytest.raises(config_lib.ConfigError, match="unknown key 'codebook'"):
        eval_tokenizer.get_config("codebook=4")
    with pytest.raises(config_lib.ConfigError, match="expected an integer"):
        eval_tokenizer.get_config("step=last")


def test_bad_values_name_the_field():
    config = eval_tokenizer.get_config()
    config.eval.step = -1
    with pytest.raises(config_lib.ConfigError, match=r"config field eval.step: must be an int >= 0"):
        resolve(config)
    config = eval_tokenizer.get_config()
    config.eval.metrics = ("psnr", "fid")
    spec = resolve(config)  # the overrides are judged with the run's blocks
    with pytest.raises(config_lib.ConfigError, match=r"config field eval.metrics: unknown \['fid'\]"):
        spec.resolve_run(tokenizer.get_config())
