"""Scores of a samples directory (configs/score.py): gFID, Inception Score, precision / recall, class consistency.

The samples are the sampling job's files (fvq_jax/sampling/job.py): batch_*.npz with `arr_0` uint8
[n, H, W, 3] and `arr_1` labels, and sampling.json. Every image goes once through the FID Inception;
its pool features and logits give
  gfid               Fréchet distance to the reference's feature statistics (fid.py);
  inception_score    IS with 10 splits, fewer for fewer than 20 samples (inception_score.py); needs
                     Inception weights with the classifier head, else it is left out with a note;
  precision, recall  k-NN manifolds of the pool features (neighbours.py), when the reference has images;
  class_consistency  how often a sample's nearest reference image has its label, beside `chance`
                     (1 / classes), when the reference has labelled images.
The reference is an ADM-style batch (`mu` / `sigma`, which take precedence for FID as in ADM's evaluator,
and / or `arr_0` images with optional `arr_1` labels), or images of a dataset through the input pipeline
(random training views or center crops), optionally encoded and decoded by the samples' tokenizer first
(`reference.reconstruct`): the scores then measure the GPT against what its tokenizer can show, not the
tokenizer's own losses as well. Small sets bias gFID upwards (the covariance of a few hundred
2048-d features is far from the population's); compare gFIDs only at equal sample and reference counts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.spec import SOURCES, TRAIN_CROPS
from fvq_jax.data.value_range import to_model_range, to_uint8
from fvq_jax.evaluation import neighbours, reports
from fvq_jax.evaluation.feature_stats import FeatureStats, load_images, load_stats
from fvq_jax.evaluation.fid import fid_of_features
from fvq_jax.evaluation.inception_metrics import InceptionMetrics, metrics_from_images
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import InceptionV3, load_inception
from fvq_jax.models.load import load_recorded_tokenizer

SAMPLE_FILES = "batch_*.npz"
SCORES_FILE = "scores.json"
CROPS = ("train", "center")


# ----------------------------------------------------------------------------- config


def check_config(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming the first bad field of the `score` and `reference` blocks."""
    s, r = config.score, config.reference
    for name in ("batch_size", "nearest_k", "chunk", "is_splits"):
        config_lib.require_number(s[name], f"score.{name}", integer=True)
    config_lib.require(isinstance(r.npz, str), "reference.npz", f"must be a path or '', got {r.npz!r}")
    config_lib.require(isinstance(r.reconstruct, bool), "reference.reconstruct",
                       f"must be true or false, got {r.reconstruct!r}")
    if r.npz:
        config_lib.require(not r.reconstruct, "reference.reconstruct", "needs a dataset reference, not reference.npz")
        return
    config_lib.require_choice(r.source, "reference.source", SOURCES)
    config_lib.require_choice(r.crop, "reference.crop", CROPS)
    config_lib.require_choice(r.train_crop, "reference.train_crop", TRAIN_CROPS)
    for name in ("image_size", "num_images", "seed", "num_workers", "read_threads"):
        config_lib.require_number(r[name], f"reference.{name}", strict=False, integer=True)
    config_lib.require_number(r.prefetch_buffer, "reference.prefetch_buffer", integer=True)
    config_lib.require_number(r.max_resize_ratio, "reference.max_resize_ratio", minimum=1.0, strict=False)
    config_lib.require(isinstance(r.flip, bool), "reference.flip", f"must be true or false, got {r.flip!r}")
    config_lib.require(r.source != "folder" or bool(r.folder), "reference.folder",
                       "must be set when reference.source='folder'")


# ----------------------------------------------------------------------------- samples


def sample_files(directory) -> list[Path]:
    """The sampling job's batch files in `directory`, in order; errors name the directory or the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no samples directory at {directory}")
    files = sorted(directory.glob(SAMPLE_FILES))
    if not files:
        raise FileNotFoundError(f"no sample batches ({SAMPLE_FILES}) in {directory}: write them with "
                                "`python -m fvq_jax.main --config=configs/sample.py --workdir=GPT_RUN`")
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{path} holds no images ('arr_0'); keys: {data.files}")
    return files


def sample_labels(files: list[Path]) -> np.ndarray | None:
    """The samples' labels (`arr_1` of every file, in order), or None when a file has none."""
    labels = []
    for path in files:
        with np.load(path, allow_pickle=False) as data:
            if "arr_1" not in data.files:
                return None
            labels.append(data["arr_1"])
    return np.concatenate(labels)


@dataclasses.dataclass
class ImageSet:
    """What the scores need of a set of images. stats: pool-feature statistics; features: float32 [N, 2048];
    labels: [N]; the last two None when unknown (a reference given as statistics only, unlabelled images)."""

    stats: FeatureStats
    features: np.ndarray | None
    labels: np.ndarray | None
    description: str

    @property
    def count(self) -> int:
        """Images in the set; -1 when unknown (statistics from a file that does not say, as ADM's)."""
        return len(self.features) if self.features is not None else self.stats.count


def _image_set(metrics: InceptionMetrics, labels: np.ndarray | None, description: str) -> ImageSet:
    return ImageSet(metrics.feature_stats(description), metrics.features(), labels, description)


# ----------------------------------------------------------------------------- reference


def reference_set(config: ml_collections.ConfigDict, model: InceptionV3, *, image_size: int, num_samples: int,
                  tokenizer: dict | None = None) -> ImageSet:
    """The reference of `config.reference`: an ADM-style batch, or a dataset's images at `image_size`, through
    the tokenizer that `tokenizer` (sampling.json's record) names when given."""
    r, batch_size = config.reference, config.score.batch_size
    if r.npz:
        return npz_reference(r.npz, model, batch_size)
    labels = []
    transform = reconstruction_fn(tokenizer) if tokenizer is not None else None

    def images():  # batch by batch: a whole split need not fit in memory, only its features
        for batch_images, batch_labels in dataset_batches(r, image_size=r.image_size or image_size, num_images=(
                r.num_images or (num_samples if r.crop == "train" else 0)), batch_size=batch_size):
            labels.append(batch_labels)
            yield batch_images if transform is None else transform(batch_images)

    metrics = metrics_from_images(images(), model, batch_size=batch_size, keep_features=True)
    what = "training views" if r.crop == "train" else "center crops"
    through = "" if tokenizer is None else f" through the tokenizer {tokenizer['path']} (step {tokenizer['step']})"
    return _image_set(metrics, np.concatenate(labels), f"{r.source}/{r.split} {what}{through}")


def reconstruction_fn(record: dict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [b, S, S, 3] -> the same encoded to codes and decoded by the tokenizer `record` names, on
    the samples' path (`decode_codes`), as uint8."""
    tokenizer = load_recorded_tokenizer(record).model
    reconstruct = nnx.jit(lambda m, x: m.decode_codes(m.encode(to_model_range(x))[1]))
    return lambda images: np.asarray(to_uint8(reconstruct(tokenizer, images)))


def npz_reference(path, model: InceptionV3, batch_size: int) -> ImageSet:
    """An ADM-style reference batch: its `mu` / `sigma` when present (ADM's evaluator prefers them), the
    features of its `arr_0` images when present, its `arr_1` labels when present."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        labels = data["arr_1"] if "arr_1" in keys and "arr_0" in keys else None
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise ValueError(f"{path} holds neither images ('arr_0') nor statistics ('mu', 'sigma'); keys: {sorted(keys)}")
    description = f"reference batch {path}"
    if "arr_0" not in keys:
        return ImageSet(load_stats(path), None, None, description)
    image_set = _image_set(metrics_from_images([load_images(path)], model, batch_size=batch_size,
                                               keep_features=True), labels, description)
    if {"mu", "sigma"} <= keys:
        image_set.stats = load_stats(path)
    return image_set


def dataset_batches(r: ml_collections.ConfigDict, *, image_size: int, num_images: int,
                    batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images uint8 [b, S, S, 3], labels [b]) of the reference dataset `r`, read by this process alone:
    `num_images` random training views (crop train), or the first `num_images` center crops (0 = all)."""
    data_cfg = ml_collections.ConfigDict(dict(
        source=r.source, tfds_name=r.tfds_name, tfds_data_dir=r.tfds_data_dir, folder=r.folder,
        train_split=r.split, eval_split=r.split, image_size=image_size, train_crop=r.train_crop,
        max_resize_ratio=r.max_resize_ratio, flip=r.flip, num_workers=r.num_workers, read_threads=r.read_threads,
        prefetch_buffer=r.prefetch_buffer))
    if r.crop == "center":
        for batch in data_pipeline.eval_batches(data_cfg, batch_size=batch_size, num_images=num_images,
                                                process_index=0, process_count=1):
            yield batch["image"][batch["mask"]], batch["label"][batch["mask"]]
        return
    batches = data_pipeline.train_iterator(data_cfg, global_batch=batch_size, seed=r.seed, process_index=0,
                                           process_count=1)
    for start in range(0, num_images, batch_size):
        batch, count = next(batches), min(batch_size, num_images - start)
        yield batch["image"][:count], batch["label"][:count]


# ----------------------------------------------------------------------------- scores


def scores(samples: ImageSet, logits: np.ndarray | None, reference: ImageSet, *, nearest_k: int, chunk: int,
           is_splits: int) -> dict:
    """Every score the two sets allow (see the module docstring)."""
    results = dict(gfid=fid_of_features(samples.features, reference.stats), num_samples=samples.count)
    if logits is None:
        results["inception_score_note"] = ("these Inception weights have no classifier head; export weights "
                                           "with it for the Inception Score (see README, Evaluation)")
    else:
        splits = max(1, min(is_splits, len(logits) // 2))  # a part of one sample always scores exactly 1
        results["inception_score"], results["inception_score_std"] = inception_score(logits, splits)
        results["inception_score_splits"] = splits
    if reference.features is not None:
        results["precision"], results["recall"] = neighbours.precision_recall(
            reference.features, samples.features, k=nearest_k, chunk=chunk)
        results["nearest_k"] = nearest_k
    if reference.labels is not None and samples.labels is not None:
        consistency = neighbours.class_consistency(samples.features, samples.labels, reference.features,
                                                   reference.labels, chunk=chunk)
        results.update(consistency, class_consistency_counted=consistency.pop("counted"))
    return results


class Scorer:
    """The Inception and the reference, prepared once, for scoring any number of samples directories (a CFG
    sweep scores one per scale against the same reference)."""

    def __init__(self, config: ml_collections.ConfigDict):
        check_config(config)
        if config.reference.npz and not Path(config.reference.npz).is_file():
            raise config_lib.ConfigError("reference.npz", f"no file at {config.reference.npz}")
        self.config = config
        self.model = load_inception(config.score.inception or None)
        self._references: dict[str, ImageSet] = {}

    def reference(self, *, image_size: int, num_samples: int, tokenizer: dict | None) -> ImageSet:
        """The reference for samples of this size and count (a dataset's defaults depend on both) and, with
        reference.reconstruct, of this tokenizer."""
        key = json.dumps([image_size, num_samples, tokenizer], sort_keys=True)
        if key not in self._references:
            self._references[key] = reference_set(self.config, self.model, image_size=image_size,
                                                  num_samples=num_samples, tokenizer=tokenizer)
        return self._references[key]

    def __call__(self, samples_dir) -> dict:
        """Score the samples in `samples_dir`; writes scores.json there and returns it."""
        s = self.config.score
        samples_dir = Path(samples_dir)
        files = sample_files(samples_dir)
        metrics = metrics_from_images(_images(files), self.model, batch_size=s.batch_size, keep_features=True)
        samples = _image_set(metrics, sample_labels(files), f"samples in {samples_dir}")
        record = _sampling_record(samples_dir)
        reference = self.reference(image_size=load_images(files[0]).shape[1], num_samples=metrics.count,
                                   tokenizer=self._tokenizer(record, samples_dir))
        logits = np.concatenate(metrics.logits) if self.model.with_logits else None
        results = scores(samples, logits, reference, nearest_k=s.nearest_k, chunk=s.chunk, is_splits=s.is_splits)
        results.update(reference=dict(description=reference.description, num_images=reference.count,
                                      stats=reference.stats.description),
                       settings=dict(score=s.to_dict(), reference=self.config.reference.to_dict()),
                       inception_sha256=self.model.weights_sha256, sampling=record)
        if jax.process_index() == 0:
            reports.write_metrics_json(results, samples_dir / SCORES_FILE)
        print(summary_line(results, samples_dir), flush=True)
        return results


    def _tokenizer(self, record: dict | None, samples_dir: Path) -> dict | None:
        """The tokenizer record to pass the reference through: sampling.json's, with reference.reconstruct."""
        if not self.config.reference.reconstruct:
            return None
        config_lib.require(record is not None and "tokenizer" in record, "reference.reconstruct",
                           f"needs the samples' tokenizer, which {samples_dir / 'sampling.json'} does not record")
        return record["tokenizer"]


def score_samples(config: ml_collections.ConfigDict, samples_dir) -> dict:
    """The score task: score the samples in `samples_dir` as `config` says (see Scorer)."""
    return Scorer(config)(samples_dir)


def _images(files: list[Path]) -> Iterator[np.ndarray]:
    for path in files:
        yield load_images(path)


def _sampling_record(samples_dir: Path) -> dict | None:
    """sampling.json of the samples (the settings and checkpoints that made them), None when absent."""
    path = samples_dir / "sampling.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_line(results: dict, samples_dir) -> str:
    """One line: what was scored and every score present."""
    parts = [f"gFID {results['gfid']:.2f}"]
    if "inception_score" in results:
        parts.append(f"IS {results['inception_score']:.2f} ± {results['inception_score_std']:.2f}")
    if "precision" in results:
        parts.append(f"precision {results['precision']:.3f}  recall {results['recall']:.3f}")
    if "class_consistency" in results:
        parts.append(f"class consistency {results['class_consistency']:.3f} "
                     f"(chance {results['chance']:.3f}, {results['classes']} classes)")
    return (f"{results['num_samples']} samples in {samples_dir} vs {results['reference']['num_images']} "
            f"reference images: " + "  ".join(parts))
