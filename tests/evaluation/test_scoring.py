"""Scoring a samples directory written by hand: against itself (FID 0, precision = recall = 1) and against the
built-in photos' training views; the scores of a shifted set against numpy; the reference features cached
beside the reference and read back; errors naming the path or field.

Each FID of 2048-d statistics costs two 2048 x 2048 eigendecompositions (~10-20 s on a 2-core CPU): few tests
run the Inception end to end."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

from fvq_jax import config_lib, tasks
from fvq_jax.evaluation import feature_cache, scoring
from fvq_jax.evaluation.feature_stats import ImageSet, RunningStats, load_image_set, save_image_set
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


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """The user cache (where the photos' reference features go) in the test's own folder."""
    monkeypatch.setenv(feature_cache.CACHE_ENV, str(tmp_path / "user_cache"))
    return tmp_path / "user_cache" / "reference_features"


def score_config(weights, arg=""):
    config = config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg)
    config.score.update(inception=weights, batch_size=3, is_splits=2, chunk=4)
    return config


def score(config, samples_dir) -> dict:
    """The score task as `tasks.run` runs it: the config resolved once, then the Scorer."""
    return scoring.Scorer(*scoring.resolve(config))(samples_dir)


def reference_views(config, *, size=16, batch_size=3):
    """The images and labels the reference of `config` (a dataset) takes for samples of `size` pixels."""
    _, spec = scoring.resolve(config)
    batches = scoring.dataset_batches(spec.dataset(size), crop=spec.crop, seed=spec.seed, num_images=spec.num_images,
                                      batch_size=batch_size)
    return tuple(np.concatenate(parts) for parts in zip(*batches))


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
    logits = rng.normal(size=(40, 10))
    samples, reference = image_set(features, labels, logits), image_set(features + shift, labels)
    result = scoring.scores(samples, reference, nearest_k=3, chunk=7, is_splits=4)
    assert result["gfid"] == pytest.approx(8 * 0.25, rel=1e-6)
    precision, recall = brute_force_precision_recall(features + shift, features, 3)
    assert (result["precision"], result["recall"]) == pytest.approx((precision, recall), abs=1e-12)
    nearest = np.argmin(np.sum((features[:, None] - (features + shift)[None]) ** 2, -1), axis=1)
    assert result["class_consistency"] == pytest.approx(np.mean(labels[nearest] == labels), abs=1e-12)
    assert result["inception_score"] == inception_score(logits, 4)[0] and result["chance"] == 0.25


def image_set(features, labels, logits=None):
    stats = RunningStats(features.shape[1])
    stats.update(features)
    return ImageSet(stats.result(""), features, labels, "", logits)


def test_photo_views_against_the_same_views_then_from_the_cache(weights, tmp_path, user_cache, capsys, monkeypatch):
    config = score_config(weights, "images=6,res=16")
    images, labels = reference_views(config, batch_size=4)
    assert images.shape == (6, 16, 16, 3) and set(labels) <= set(range(9))  # the nine training photos
    directory = write_samples(tmp_path / "photos", images, labels, (4, 2))
    result = score(config, directory)
    assert abs(result["gfid"]) < 1e-3 and result["class_consistency"] == 1.0
    assert result["classes"] == len(set(labels)) and result["reference"]["num_images"] == 6
    first = capsys.readouterr().out
    assert "sample features 6/6 images" in first and "reference features 6/6 images" in first  # progress lines
    [entry] = user_cache.glob("photos-train-train16-n6-*.npz")
    assert f"reference features: cached in {entry}" in first

    # The second score reads both back: no image goes through the Inception, the scores are the same.
    monkeypatch.setattr(scoring, "metrics_from_images", lambda *a, **k: pytest.fail("features were recomputed"))
    again = score(config, directory)
    second = capsys.readouterr().out
    assert f"reference features: cache hit {entry} (6 images; key " in second
    assert '"seed": 0' in second and '"inception_sha256": ' in second
    assert f"sample features: cache hit {directory / scoring.SAMPLES_CACHE} (6 images" in second
    scores = ("gfid", "precision", "recall", "class_consistency", "inception_score")
    assert {k: again[k] for k in scores} == {k: result[k] for k in scores}
    # Samples written again (a batch replaced) are not taken from the cache.
    monkeypatch.undo()
    write_samples(directory, images[::-1], labels[::-1], (4, 2))
    assert score(config, directory)["gfid"] == pytest.approx(result["gfid"], abs=1e-3)
    assert "sample features 6/6 images" in capsys.readouterr().out


def test_a_damaged_or_foreign_cache_entry_is_computed_again(weights, samples, tmp_path, user_cache, caplog):
    directory = samples[0]
    config = score_config(weights, "images=5,res=16,seed=3")
    first = score(config, directory)
    [entry] = user_cache.glob("*.npz")
    features = load_image_set(entry)[0].features

    def rewritten_whole():
        return np.array_equal(load_image_set(entry)[0].features, features)

    entry.write_bytes(entry.read_bytes()[:entry.stat().st_size // 2])  # truncated (a full disk, a copy cut short)
    assert score(config, directory)["gfid"] == pytest.approx(first["gfid"], rel=1e-6)
    assert "cannot be read" in caplog.text and rewritten_whole()
    # An entry under the right name whose stored key differs (a collision, a hand-copied file) is not trusted.
    foreign = image_set(np.arange(10, dtype=np.float32).reshape(5, 2), np.arange(5))
    save_image_set(entry, foreign, key='{"another": "key"}')
    caplog.clear()
    assert score(config, directory)["gfid"] == pytest.approx(first["gfid"], rel=1e-6)
    assert "was made for another key" in caplog.text and rewritten_whole()
    # Another seed: other views, another entry beside the first.
    score(score_config(weights, "images=5,res=16,seed=4"), directory)
    assert len(list(user_cache.glob("*.npz"))) == 2 and not list(user_cache.glob(".*"))  # no temporary left


def test_an_unwritable_cache_costs_a_warning_not_the_score(weights, samples, tmp_path, caplog):
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    config = score_config(weights, f"images=5,res=16,cache={blocked}")
    assert score(config, samples[0])["num_samples"] == 6
    assert "could not write the cache entry" in caplog.text


def test_the_cache_lives_beside_the_reference(tmp_path, user_cache):
    def directory(arg, **fields):
        config = config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg)
        config.reference.update(fields)
        return scoring.resolve(config)[1].cache_directory()

    adm = tmp_path / "adm" / "VIRTUAL.npz"
    adm.parent.mkdir()
    np.savez(adm, mu=np.zeros(2), sigma=np.eye(2))
    assert directory(f"ref={adm}") == adm.parent
    assert directory(f"ref={tmp_path / 'folder'}") == tmp_path / "folder" / ".fvq_cache"
    assert directory("ref=tfds:imagenet2012", tfds_data_dir="/data/tfds") == epath.Path("/data/tfds/.fvq_cache")
    assert directory("ref=tfds:imagenet2012") == directory("ref=photos") == user_cache
    assert directory("cache=/elsewhere") == epath.Path("/elsewhere") and directory("cache=none") is None


def test_errors_name_the_path(weights, tmp_path):
    config = score_config(weights)
    with pytest.raises(FileNotFoundError, match=f"no samples directory at {tmp_path / 'missing'}"):
        score(config, tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no sample batches .* in {tmp_path / 'empty'}"):
        score(config, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    np.savez(tmp_path / "bad" / "batch_00000_p000.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=f"{tmp_path / 'bad' / 'batch_00000_p000.npz'} holds no images"):
        score(config, tmp_path / "bad")
    with pytest.raises(config_lib.ConfigError, match=f"reference.npz: no file at {tmp_path / 'none.npz'}"):
        score(score_config(weights, f"ref={tmp_path / 'none.npz'}"), tmp_path / "bad")


@pytest.mark.parametrize("arg, fields, field", [
    ("crop=random", {}, "reference.crop"), ("", dict(source="lmdb"), "reference.source"),
    ("batch=0", {}, "score.batch_size"), ("ref=a.npz,reconstruct=true", {}, "reference.reconstruct"),
    ("ref=tfds:imagenet2012", dict(train_crop="square"), "reference.train_crop"),
    ("images=-1", {}, "reference.num_images"), ("res=-16", {}, "reference.image_size")])
def test_config_errors_name_the_field(arg, fields, field):
    config = config_lib.load_file(ROOT / "configs" / "score.py").get_config(arg)
    config.reference.update(fields)
    with pytest.raises(config_lib.ConfigError, match=f"config field {field}"):
        tasks.resolve(config)


@pytest.mark.parametrize("ref, fields", [
    ("photos", dict(npz="", source="photos")), ("/refs/VIRTUAL_imagenet256_labeled.npz",
                                                 dict(npz="/refs/VIRTUAL_imagenet256_labeled.npz")),
    ("/data/my_folder", dict(npz="", source="folder", folder="/data/my_folder")),
    ("tfds:imagenet2012", dict(npz="", source="tfds", tfds_name="imagenet2012"))])
def test_one_ref_value_names_any_reference(ref, fields):
    reference = config_lib.load_file(ROOT / "configs" / "score.py").get_config(f"ref={ref},split=validation").reference
    assert {k: reference[k] for k in fields} == fields and reference.split == "validation"


def test_reference_statistics_take_precedence_over_its_images(weights, tmp_path):
    # ADM's files hold both: FID uses mu / sigma (as ADM's evaluator), precision / recall the images' features.
    images = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    path = tmp_path / "adm.npz"
    np.savez(path, arr_0=images, mu=np.ones(2048), sigma=np.eye(2048))
    _, spec = scoring.resolve(score_config(weights, f"ref={path}"))
    reference = scoring.npz_reference(spec, load_inception(weights), batch_size=5)
    assert reference.count == 5 and reference.features.shape == (5, 2048) and reference.labels is None
    np.testing.assert_array_equal(reference.stats.mu, np.ones(2048))


def test_reconstructed_reference_goes_through_the_samples_tokenizer(weights, tiny_run, tmp_path):
    # Samples = the tiny tokenizer's reconstructions of the reference views: they score as the reference itself
    # once the reference goes through the tokenizer that sampling.json names.
    config = score_config(weights, "images=6,res=16,reconstruct=true")
    views, labels = reference_views(config)
    model = load_tokenizer(tiny_run[0], step=2, use_ema=True).model
    decoded = nnx.jit(lambda m, x: m.decode_codes(m.encode(x)[1]))(model, jnp.asarray(views, jnp.float32) / 127.5 - 1)
    samples = np.round((np.clip(np.asarray(decoded), -1, 1) + 1) * 127.5).astype(np.uint8)
    directory = write_samples(tmp_path / "recon", samples, labels, (6,))
    (directory / "sampling.json").write_text(json.dumps({"tokenizer": dict(path=tiny_run[0], step=2, weights="ema")}))
    result = score(config, directory)
    assert abs(result["gfid"]) < 1e-3 and (result["precision"], result["recall"]) == (1.0, 1.0)
    assert "through the tokenizer" in result["reference"]["description"]
    (directory / "sampling.json").unlink()
    with pytest.raises(config_lib.ConfigError, match="reference.reconstruct: needs the samples' tokenizer"):
        score(config, directory)
