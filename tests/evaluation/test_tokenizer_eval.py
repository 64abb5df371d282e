"""The eval entry (configs/eval_tokenizer.py -> evaluate_checkpoint) on a tiny trained photo run:
metrics.json against the trainer's in-process evaluation and against scikit-image / numpy on
the same reconstructions, the protocol record, the PNG reports, overrides and errors."""

import json
import pathlib

import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fvq_jax.config_lib import ConfigError
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.value_range import to_model_range
from fvq_jax.evaluation import tokenizer_eval
from fvq_jax.models.load import load_tokenizer
from tests.test_configs import load_config_module

eval_config = load_config_module("eval_tokenizer").get_config


@nnx.jit
def reconstruct(model, images_u8):
    recon, aux = model(to_model_range(images_u8))
    return recon, aux["indices"]


@pytest.fixture(scope="module")
def latest_eval(tiny_run):
    """`python -m fvq_jax.main --config=configs/eval_tokenizer.py --workdir=RUN`, in process."""
    workdir, final = tiny_run
    return workdir, final, tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(eval_config()), workdir)


def test_metrics_json_equals_the_in_process_evaluation(latest_eval):
    workdir, final, results = latest_eval
    saved = json.loads((pathlib.Path(workdir) / "eval" / "step_2" / "metrics.json").read_text())
    # The trainer's final evaluation ran on the same state (step 2, EMA weights) and split.
    for key in ("psnr", "ssim", "lpips", "mse", "usage", "used_codes", "eval_perplexity", "num_images"):
        assert saved[key] == results[key]
        assert saved[key] == pytest.approx(final[key], rel=1e-6, abs=1e-9), key
    assert saved["protocol"] == {"dataset": "photos", "split": "validation", "image_size": 16, "num_images": 16,
                                 "crop": "held-out fixed crops", "weights": "ema", "step": 2}


def test_metrics_match_references_on_the_same_reconstructions(latest_eval):
    workdir, _, results = latest_eval
    loaded = load_tokenizer(workdir, use_ema=True)
    model = loaded.model
    images, recons, indices = [], [], []
    for batch in data_pipeline.eval_batches(loaded.config.data, batch_size=8, num_images=16):
        assert batch["mask"].all()
        recon, idx = reconstruct(model, batch["image"])
        images.append(batch["image"])
        recons.append(np.asarray(recon))
        indices.append(np.asarray(idx))
    images, recons, indices = np.concatenate(images), np.concatenate(recons), np.concatenate(indices)
    rounded = np.round((np.clip(recons.astype(np.float64), -1, 1) + 1) * 127.5).astype(np.uint8)
    psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(images, rounded)])
    ssim = np.mean([structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=255,
                                          channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False) for a, b in zip(images, rounded)])
    counts = np.bincount(indices.ravel(), minlength=64)
    p = counts[counts > 0] / counts.sum()
    assert len(images) == results["num_images"] == 16
    assert results["psnr"] == pytest.approx(psnr, rel=1e-5)
    assert results["ssim"] == pytest.approx(ssim, rel=1e-4, abs=1e-5)
    assert results["used_codes"] == np.count_nonzero(counts) and results["usage"] == np.count_nonzero(counts) / 64
    assert results["eval_perplexity"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-9)
    # XS/2 over the 8 x 8 code grid: code n sits at in-patch position ((n // 8) % 2, (n % 8) % 2).
    positions = {((n // 8) % 2, (n % 8) % 2) for n in np.flatnonzero(counts)}
    assert results["bridge_positions"] == 4 and results["bridge_positions_used"] == len(positions)

    out = pathlib.Path(workdir) / "eval" / "step_2"
    grid = np.asarray(Image.open(out / "reconstructions.png"))
    assert grid.shape == (2 * 16 + 3 * 2, 8 * 16 + 9 * 2, 3)  # 8 pairs of 16 x 16, 2-pixel padding
    np.testing.assert_array_equal(grid[2:18, 2:18], images[0])  # first input, top left
    assert np.abs(grid[20:36, 2:18].astype(int) - rounded[0]).max() <= 1  # its reconstruction below
    assert Image.open(out / "code_usage.png").size == (600, 350)


def test_step_weights_and_image_count_overrides(tiny_run):
    workdir, _ = tiny_run
    config = eval_config("step=1,ema=false,images=8")
    config.eval.metrics = ("psnr", "usage")
    results = tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(config), workdir)
    saved = json.loads((pathlib.Path(workdir) / "eval" / "step_1" / "metrics.json").read_text())
    assert saved["protocol"] == {"dataset": "photos", "split": "validation", "image_size": 16, "num_images": 8,
                                 "crop": "held-out fixed crops", "weights": "raw", "step": 1}
    assert saved["num_images"] == 8 and saved["psnr"] == results["psnr"] and "lpips" not in saved
    # Raw step-1 weights on the first 8 images: the reference is the restored raw generator.
    loaded = load_tokenizer(workdir, step=1, use_ema=False)
    assert (loaded.step, loaded.weights) == (1, "raw")
    batch = next(iter(data_pipeline.eval_batches(loaded.config.data, batch_size=8, num_images=8)))
    recon, _ = reconstruct(loaded.model, batch["image"])
    rounded = np.round((np.clip(np.asarray(recon, np.float64), -1, 1) + 1) * 127.5).astype(np.uint8)
    psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(batch["image"], rounded)])
    assert results["psnr"] == pytest.approx(psnr, rel=1e-5)


def test_errors_are_clear_and_early(tiny_run, tmp_path):
    workdir, _ = tiny_run
    with pytest.raises(FileNotFoundError, match="no checkpoint under .*: train first, or check --workdir"):
        tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(eval_config()), str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 3 in .*; saved steps: \[1, 2\]"):
        tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(eval_config("step=3")), workdir)
    config = eval_config()
    config.eval.metrics = ("psnr", "fid")
    with pytest.raises(ConfigError, match=r"eval.metrics: unknown \['fid'\]") as info:
        tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(config), workdir)
    assert info.value.field == "eval.metrics"
    with pytest.raises(ConfigError, match="data.source") as info:
        tokenizer_eval.evaluate_checkpoint(tokenizer_eval.resolve(eval_config("data=imagenet")), workdir)
    assert info.value.field == "data.source"


def test_the_grid_picks_across_classes_while_the_batches_stream():
    """A class-sorted split streamed in batches with padding: the grid holds the first 8 images in round-robin
    order over the classes (by a sort of the whole split), not the first 8 images (all of class 0)."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], [9, 2, 5])  # class-sorted, as an image folder lists its files
    images = rng.integers(0, 256, (len(labels), 4, 4, 3), dtype=np.uint8)
    picker = tokenizer_eval.GridPicker()
    for start in range(0, len(labels) + 4, 6):  # batches of 6, the last one padded (mask False)
        rows = np.arange(start, start + 6)
        valid = rows < len(labels)
        rows = np.where(valid, rows, 0)
        batch = {"image": images[rows], "label": labels[rows], "mask": valid}
        picker.add(batch, to_model_range(images[rows]) * 0.5)
    rank = np.array([np.sum(labels[:i] == labels[i]) for i in range(len(labels))])
    expected = np.lexsort((labels, rank))[:8]  # rank first, then label
    inputs, recons = picker.pairs()
    np.testing.assert_array_equal(inputs, images[expected])
    np.testing.assert_allclose(recons, to_model_range(images[expected]) * 0.5)
    assert [int(labels[i]) for i in expected] == [0, 1, 2, 0, 1, 2, 0, 2]
