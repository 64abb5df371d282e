"""Scoring a samples directory written by hand: against itself (FID 0, precision = recall = 1) and against the
built-in photos' training views; the scores of a shifted set against numpy; errors naming the path or field.

Each FID of 2048-d statistics costs two 2048 x 2048 eigendecompositions (~10-20 s on a 2-core CPU): few tests
run the Inception end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fvq_jax import config_lib, tasks
from fvq_jax.evaluation import scoring
from fvq_jax.evaluation.feature_stats import RunningStats
from fvq_jax.evaluation.inception_metrics import metrics_from_images
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import load_inception
from fvq_jax.models.load import load_tokenizer
from tests.conftest import ROOT
from tests.evaluation.test_neighbours import brute_force_precision_recall
from tests.inception_weights import export_with_head

SAMPLING = {"sampling": {"cfg_scale": 2.0, "seed": 0}, "gpt": {"step": 40}}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return str(export_with_head(tmp_path_factory.mktemp("inception")))


def score_config(weights, arg=""):
    config = config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg)
    config.score.update(inception=weights, batch_size=3, is_splits=2, chunk=4)
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
    """Six 16 x 16 images of three classes in files of 2 and 4 (the Inception batches of 3 straddle them)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    return write_samples(tmp_path_factory.mktemp("samples") / "s", images, labels, (2, 4)), images, labels


@pytest.fixture(scope="module")
def direct(weights, samples):
    """The samples' Inception outputs, computed in one batch."""
    return metrics_from_images([samples[1]], load_inception(weights), batch_size=6)


def test_samples_against_themselves(weights, samples, direct, tmp_path):
    directory, images, labels = samples
    reference = tmp_path / "reference.npz"
    np.savez(reference, arr_0=images, arr_1=labels)
    assert tasks.run(score_config(weights, f"ref={reference}"), str(directory)) == 0
    written = json.loads((directory / "scores.json").read_text())
    assert abs(written["gfid"]) < 1e-3
    assert (written["precision"], written["recall"], written["class_consistency"]) == (1.0, 1.0, 1.0)
    assert written["chance"] == pytest.approx(1 / 3) and written["num_samples"] == 6
    assert written["sampling"] == SAMPLING
    assert written["inception_score"] == pytest.approx(direct.inception_score(splits=2)[0], rel=1e-5)


def test_scores_of_a_shifted_set_match_numpy():
    # Features of 8 dimensions stand in for Inception's: a translated copy has the same covariance, so
    # FID = |shift|^2; precision / recall and class consistency against brute force.
    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 8)).astype(np.float32)
    labels = np.arange(40) % 4
    shift = np.full(8, 0.5, np.float32)
    samples, reference = image_set(features, labels), image_set(features + shift, labels)
    logits = rng.normal(size=(40, 10))
    result = scoring.scores(samples, logits, reference, nearest_k=3, chunk=7, is_splits=4)
    assert result["gfid"] == pytest.approx(8 * 0.25, rel=1e-6)
    precision, recall = brute_force_precision_recall(features + shift, features, 3)
    assert (result["precision"], result["recall"]) == pytest.approx((precision, recall), abs=1e-12)
    nearest = np.argmin(np.sum((features[:, None] - (features + shift)[None]) ** 2, -1), axis=1)
    assert result["class_consistency"] == pytest.approx(np.mean(labels[nearest] == labels), abs=1e-12)
    assert result["inception_score"] == inception_score(logits, 4)[0] and result["chance"] == 0.25


def image_set(features, labels):
    stats = RunningStats(features.shape[1])
    stats.update(features)
    return scoring.ImageSet(stats.result(""), features, labels, "")


def test_photo_views_against_the_same_views(weights, tmp_path):
    config = score_config(weights, "images=6,res=16")
    batches = list(scoring.dataset_batches(config.reference, image_size=16, num_images=6, batch_size=4))
    images, labels = (np.concatenate(parts) for parts in zip(*batches))
    assert images.shape == (6, 16, 16, 3) and set(labels) <= set(range(9))  # the nine training photos
    directory = write_samples(tmp_path / "photos", images, labels, (6,))
    result = scoring.score_samples(config, directory)
    assert abs(result["gfid"]) < 1e-3 and result["class_consistency"] == 1.0
    assert result["classes"] == len(set(labels)) and result["reference"]["num_images"] == 6


def test_errors_name_the_path(weights, tmp_path):
    config = score_config(weights)
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
        scoring.score_samples(score_config(weights, f"ref={tmp_path / 'none.npz'}"), tmp_path / "bad")


@pytest.mark.parametrize("arg, field", [("crop=random", "reference.crop"), ("data=lmdb", "reference.source"),
                                        ("batch=0", "score.batch_size"), ("ref=a.npz,reconstruct=true",
                                                                          "reference.reconstruct")])
def test_config_errors_name_the_field(arg, field):
    with pytest.raises(config_lib.ConfigError, match=f"config field {field}"):
        tasks.check_config(config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg))


def test_reference_statistics_take_precedence_over_its_images(weights, tmp_path):
    # ADM's files hold both: FID uses mu / sigma (as ADM's evaluator), precision / recall the images' features.
    images = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "adm.npz"
    np.savez(path, arr_0=images, mu=np.ones(2048), sigma=np.eye(2048))
    reference = scoring.npz_reference(path, load_inception(weights), batch_size=5)
    assert reference.count == 5 and reference.features.shape == (5, 2048) and reference.labels is None
    np.testing.assert_array_equal(reference.stats.mu, np.ones(2048))


def test_reconstructed_reference_goes_through_the_samples_tokenizer(weights, tiny_run, tmp_path):
    # Samples = the tiny tokenizer's reconstructions of the reference views: they score as the reference itself
    # once the reference goes through the tokenizer that sampling.json names.
    config = score_config(weights, "images=6,res=16,reconstruct=true")
    batches = list(scoring.dataset_batches(config.reference, image_size=16, num_images=6, batch_size=3))
    views, labels = (np.concatenate(parts) for parts in zip(*batches))
    model = load_tokenizer(tiny_run[0], step=2, use_ema=True).model
    decoded = nnx.jit(lambda m, x: m.decode_codes(m.encode(x)[1]))(model, jnp.asarray(views, jnp.float32) / 127.5 - 1)
    samples = np.round((np.clip(np.asarray(decoded), -1, 1) + 1) * 127.5).astype(np.uint8)
    directory = write_samples(tmp_path / "recon", samples, labels, (6,))
    (directory / "sampling.json").write_text(json.dumps({"tokenizer": dict(path=tiny_run[0], step=2, weights="ema")}))
    result = scoring.score_samples(config, directory)
    assert abs(result["gfid"]) < 1e-3 and (result["precision"], result["recall"]) == (1.0, 1.0)
    assert "through the tokenizer" in result["reference"]["description"]
    (directory / "sampling.json").unlink()
    with pytest.raises(config_lib.ConfigError, match="reference.reconstruct: needs the samples' tokenizer"):
        scoring.score_samples(config, directory)
