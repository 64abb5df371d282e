"""Scoring a samples directory written by hand: against itself (FID 0, precision = recall = 1), against
shifted statistics (FID = |shift|^2), against the built-in photos' training views, and errors naming the path."""

import json

import numpy as np
import pytest

from fvq_jax import config_lib, tasks
from fvq_jax.evaluation import scoring
from fvq_jax.evaluation.inception_metrics import metrics_from_images
from fvq_jax.models.inception import load_inception
from tests.conftest import ROOT
from tests.inception_weights import export_with_head

SAMPLING = {"sampling": {"cfg_scale": 2.0, "seed": 0}, "gpt": {"step": 40}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(export_with_head(tmp_path_factory.mktemp("inception")))


def score_config(weights, arg=""):
    config = config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg)
    config.score.update(inception=weights, batch_size=5, is_splits=2, chunk=4)
    return config


def write_samples(directory, images, labels, sizes):
    """The sampling job's layout: batch files of `sizes` images each, and sampling.json."""
    directory.mkdir(parents=True, exist_ok=True)
    start = 0
    for b, size in enumerate(sizes):
        np.savez(directory / f"batch_{b:05d}_p000.npz", arr_0=images[start:start + size],
                 arr_1=labels[start:start + size])
        start += size
    (directory / "sampling.json").write_text(json.dumps(SAMPLING))
    return directory


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(12) % 4
    return write_samples(tmp_path_factory.mktemp("samples") / "s", images, labels, (5, 7)), images, labels


def test_samples_against_themselves(weights, samples, tmp_path):
    directory, images, labels = samples
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=images, arr_1=labels)
    assert tasks.run(score_config(weights, f"ref={reference}"), str(directory)) == 0
    written = json.loads((directory / "scores.json").read_text())
    assert abs(written["gfid"]) < 1e-3
    assert (written["precision"], written["recall"], written["class_consistency"]) == (1.0, 1.0, 1.0)
    assert written["chance"] == 0.25 and written["num_samples"] == 12 and written["sampling"] == SAMPLING
    # The Inception Score of the same logits, computed directly.
    model = load_inception(weights)
    direct = metrics_from_images([images], model, batch_size=12)
    assert written["inception_score"] == pytest.approx(direct.inception_score(splits=2)[0], rel=1e-5)


def test_shifted_statistics_give_the_squared_shift(weights, samples, tmp_path):
    directory, images, _ = samples
    stats = metrics_from_images([images], load_inception(weights), batch_size=5).feature_stats("")
    shift = np.full_like(stats.mu, 0.1)  # FID = |mu1 - mu2|^2 = 2048 x 0.01 when the covariances are equal
    reference = tmp_path / "shifted.npz"
    np.savez(reference, mu=stats.mu + shift, sigma=stats.sigma)
    result = scoring.score_samples(score_config(weights, f"ref={reference}"), directory)
    assert result["gfid"] == pytest.approx(20.48, abs=1e-3)
    assert "precision" not in result and "class_consistency" not in result  # statistics only: no points


def test_photo_views_against_the_same_views(weights, tmp_path):
    config = score_config(weights, "images=10,res=16")
    images, labels = scoring.dataset_images(config.reference, image_size=16, num_images=10, batch_size=5)
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert images.shape == (10, 16, 16, 3) and set(labels) <= set(range(9))  # the nine training photos
    directory = write_samples(tmp_path / "photos", images, labels, (10,))
    result = scoring.score_samples(config, directory)
    assert abs(result["gfid"]) < 1e-3 and result["class_consistency"] == 1.0
    assert result["classes"] == len(set(labels)) and result["reference"]["num_images"] == 10


def test_errors_name_the_path(weights, tmp_path):
    config = score_config(weights, f"ref={tmp_path / 'none.npz'}")
    with pytest.raises(FileNotFoundError, match=f"no samples directory at {tmp_path / 'missing'}"):
        scoring.score_samples(config, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no sample batches .* in {tmp_path / 'empty'}"):
        scoring.score_samples(config, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "batch_00000_p000.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad' / 'batch_00000_p000.npz'} holds no images"):
        scoring.score_samples(config, tmp_path / "bad")
    with pytest.raises(config_lib.ConfigError, match=f"reference.npz: no file at {tmp_path / 'none.npz'}"):
        scoring.score_samples(config, samples_dir(tmp_path))


def samples_dir(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    return write_samples(tmp_path / "ok", images, np.zeros(3, int), (3,))


@pytest.mark.parametrize("arg, field", [("crop=random", "reference.crop"), ("data=lmdb", "reference.source"),
                                        ("batch=0", "score.batch_size")])
def test_config_errors_name_the_field(arg, field):
    with pytest.raises(config_lib.ConfigError, match=f"config field {field}"):
        tasks.check_config(config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg))
