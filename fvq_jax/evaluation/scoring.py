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

The reference's features (and their FID statistics) are computed once and cached beside the reference
(`ReferenceSpec.cache_directory`, feature_cache.py), keyed by everything that changes them; later scores
and every scale of a CFG sweep read them back ("reference features: cache hit ..."). The samples' features
are kept beside them (SAMPLES/sample_features.npz, keyed by the batch files), so scoring the same samples
again (another reference, another k) runs no Inception at all. Each pass over images prints a progress line
with its rate and ETA; the Inception sees fixed-size padded batches, so one program is compiled per image size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from fvq_jax import config_lib
from fvq_jax.data import pipeline as data_pipeline
from fvq_jax.data.sources import split_source
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.value_range import to_model_range, to_uint8
from fvq_jax.evaluation import feature_cache, neighbours, reports
from fvq_jax.evaluation.feature_stats import ImageSet, load_images, load_stats
from fvq_jax.evaluation.fid import fid_of_features
from fvq_jax.evaluation.inception_metrics import InceptionMetrics, metrics_from_images
from fvq_jax.evaluation.inception_score import inception_score
from fvq_jax.models.inception import InceptionV3, load_inception
from fvq_jax.models.load import load_recorded_tokenizer
from fvq_jax.progress import Progress

SAMPLE_FILES = "batch_*.npz"
SCORES_FILE = "scores.json"
SAMPLES_CACHE = "sample_features.npz"  # the samples' Inception outputs, beside them
CROPS = ("train", "center")


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class ScoreSpec(config_lib.Spec):
    """The checked `score` block (configs/score.py describes each field)."""

    batch_size: int
    nearest_k: int
    chunk: int
    is_splits: int
    inception: str

    def __post_init__(self):
        for name in ("batch_size", "nearest_k", "chunk", "is_splits"):
            config_lib.require_number(getattr(self, name), name, integer=True)
        config_lib.require(isinstance(self.inception, str), "inception", f"must be a path or '', got {self.inception!r}")


@dataclasses.dataclass(frozen=True)
class ReferenceSpec(config_lib.Spec):
    """The checked `reference` block: an ADM-style batch (`npz`) or a dataset (`data`, a DataSpec whose train and
    eval split are both `reference.split`), and how its images are taken (configs/score.py describes each field).

    `data.image_size` holds `image_size`, or while that is 0 (the samples' resolution, known only with the
    samples) a stand-in that `dataset()` replaces; DataSpec checks every other field of the dataset now.
    """

    npz: str
    reconstruct: bool
    crop: str
    image_size: int
    num_images: int
    seed: int
    cache_dir: str
    data: DataSpec | None  # None for an npz reference

    def __post_init__(self):
        config_lib.require(isinstance(self.npz, str), "npz", f"must be a path or '', got {self.npz!r}")
        config_lib.require(isinstance(self.reconstruct, bool), "reconstruct",
                           f"must be true or false, got {self.reconstruct!r}")
        config_lib.require(not (self.npz and self.reconstruct), "reconstruct",
                           "needs a dataset reference, not reference.npz")
        config_lib.require(not self.npz or Path(self.npz).is_file(), "npz", f"no file at {self.npz}")
        config_lib.require_choice(self.crop, "crop", CROPS)
        for name in ("image_size", "num_images", "seed"):
            config_lib.require_number(getattr(self, name), name, strict=False, integer=True)
        config_lib.require(isinstance(self.cache_dir, str), "cache_dir",
                           f"must be a folder, '' or '{feature_cache.OFF}', got {self.cache_dir!r}")

    @classmethod
    def from_config(cls, block, prefix: str = "reference") -> "ReferenceSpec":
        values = block.to_dict() if isinstance(block, ml_collections.ConfigDict) else dict(block)
        data = None
        if not values.get("npz"):
            data = DataSpec.from_config(
                dict(values, train_split=values.get("split"), eval_split=values.get("split"),
                     image_size=values.get("image_size") or 1), prefix)
        return super().from_config(values, prefix, data=data)

    def dataset(self, samples_size: int) -> DataSpec:
        """The reference dataset at its resolution: image_size, or the samples' when image_size is 0."""
        return dataclasses.replace(self.data, image_size=self.image_size or samples_size)

    def count(self, num_samples: int, num_records: int) -> int:
        """Images the reference takes from a split of `num_records`: num_images, or when 0 as many as there
        are samples (crop train) or the whole split (crop center); center crops never more than the split."""
        if self.crop == "train":
            return self.num_images or num_samples
        return min(self.num_images, num_records) if self.num_images else num_records

    def cache_directory(self) -> epath.Path | None:
        """Where the reference's features are cached: cache_dir when set ('none': nowhere), else beside the
        reference: an ADM batch's folder; <folder>/.fvq_cache for an image folder (the folder's own splits stay
        as they were: only <folder>/<split>/<class>/ is ever read); <tfds_data_dir>/.fvq_cache; the user cache
        ($FVQ_CACHE, default ~/.cache/fvq_jax) for the built-in photos and TFDS's default data dir."""
        if self.cache_dir:
            return None if self.cache_dir == feature_cache.OFF else epath.Path(self.cache_dir)
        if self.npz:
            return epath.Path(self.npz).parent
        if self.data.source == "folder":
            return epath.Path(self.data.folder) / ".fvq_cache"
        if self.data.source == "tfds" and self.data.tfds_data_dir:
            return epath.Path(self.data.tfds_data_dir) / ".fvq_cache"
        return feature_cache.user_cache()


def resolve(config: ml_collections.ConfigDict) -> tuple[ScoreSpec, ReferenceSpec]:
    """The `score` and `reference` blocks, checked (ConfigError naming the first bad field)."""
    return ScoreSpec.from_config(config.score, "score"), ReferenceSpec.from_config(config.reference, "reference")


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


def array_shape(path, name: str) -> tuple[int, ...]:
    """The shape of array `name` in the .npz at `path`, from its header alone (no image is read)."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        return tuple(read_header(f)[0])


def _image_set(metrics: InceptionMetrics, labels: np.ndarray | None, description: str) -> ImageSet:
    logits = np.concatenate(metrics.logits) if metrics.with_logits else None
    return ImageSet(metrics.feature_stats(description), metrics.features(), labels, description, logits)


# ----------------------------------------------------------------------------- reference


def reference_set(spec: ReferenceSpec, model: InceptionV3, *, batch_size: int, image_size: int, num_samples: int,
                  tokenizer: dict | None = None) -> ImageSet:
    """The reference of `spec`: an ADM-style batch, or a dataset's images at `image_size` (when spec.image_size
    is 0), through the tokenizer that `tokenizer` (sampling.json's record) names when given. Its features come
    from the cache beside the reference when they were computed before (feature_cache)."""
    if spec.npz:
        return npz_reference(spec, model, batch_size)
    data = spec.dataset(image_size)
    source = split_source(data, data.train_split)
    count = spec.count(num_samples, len(source))
    what = "training views" if spec.crop == "train" else "center crops"
    through = "" if tokenizer is None else f" through the tokenizer {tokenizer['path']} (step {tokenizer['step']})"
    description = f"{data.source}/{data.train_split} {what}{through}"
    key = dict(_dataset_identity(data, source), split=data.train_split, crop=spec.crop, image_size=data.image_size,
               num_images=count, tokenizer=tokenizer, inception_sha256=model.weights_sha256)
    if spec.crop == "train":  # the views' randomness; which views come first depends on the workers' batches
        key.update(seed=spec.seed, train_crop=data.train_crop, max_resize_ratio=data.max_resize_ratio,
                   flip=data.flip, num_workers=data.num_workers)
        if data.num_workers:
            key["batch_size"] = batch_size

    def compute() -> ImageSet:
        labels = []

        def images():  # batch by batch: a whole split need not fit in memory, only its features
            for batch_images, batch_labels in dataset_batches(data, crop=spec.crop, seed=spec.seed, num_images=count,
                                                              batch_size=batch_size):
                labels.append(batch_labels)
                yield batch_images

        metrics = metrics_from_images(images(), model, batch_size=batch_size, keep_features=True,
                                      transform=None if tokenizer is None else reconstruction_fn(tokenizer),
                                      progress=Progress("reference features", count))
        return _image_set(metrics, np.concatenate(labels), description)

    stem = f"{data.source}-{data.train_split}-{spec.crop}{data.image_size}-n{count}"
    return _cached_reference(spec, stem, key, compute)


def _cached_reference(spec: ReferenceSpec, stem: str, key: dict, compute: Callable[[], ImageSet]) -> ImageSet:
    directory = spec.cache_directory()
    path = None if directory is None else feature_cache.entry_path(directory, stem, key)
    return feature_cache.cached(path, key, compute, what="reference features")


def _dataset_identity(data: DataSpec, source) -> dict:
    """What names the dataset's split and its records in a cache key: the folder (absolute) and its files' names,
    the TFDS dataset, data dir and record count, or the built-in photos."""
    if data.source == "folder":
        names = "\n".join(source[i]["name"] for i in range(len(source)))
        return dict(source="folder", folder=os.path.abspath(data.folder), records=len(source),
                    names_sha256=hashlib.sha256(names.encode()).hexdigest())
    if data.source == "tfds":
        return dict(source="tfds", tfds_name=data.tfds_name, tfds_data_dir=data.tfds_data_dir, records=len(source))
    return dict(source=data.source, records=len(source))


def reconstruction_fn(record: dict) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images [b, S, S, 3] -> the same encoded to codes and decoded by the tokenizer `record` names, on
    the samples' path (`decode_codes`), as uint8."""
    tokenizer = load_recorded_tokenizer(record).model
    reconstruct = nnx.jit(lambda m, x: m.decode_codes(m.encode(to_model_range(x))[1]))
    return lambda images: np.asarray(to_uint8(reconstruct(tokenizer, images)))


def npz_reference(spec: ReferenceSpec, model: InceptionV3, batch_size: int) -> ImageSet:
    """An ADM-style reference batch: its `mu` / `sigma` when present (ADM's evaluator prefers them), the
    features of its `arr_0` images when present (cached beside the file), its `arr_1` labels when present."""
    path = Path(spec.npz)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
    if "arr_0" not in keys and not {"mu", "sigma"} <= keys:
        raise ValueError(f"{path} holds neither images ('arr_0') nor statistics ('mu', 'sigma'); keys: {sorted(keys)}")
    description = f"reference batch {path}"
    if "arr_0" not in keys:
        return ImageSet(load_stats(path), None, None, description)
    status = path.stat()
    key = dict(source="npz", file=str(path.resolve()), bytes=status.st_size, mtime_ns=status.st_mtime_ns,
               inception_sha256=model.weights_sha256)

    def compute() -> ImageSet:
        with np.load(path, allow_pickle=False) as data:
            labels = data["arr_1"] if "arr_1" in keys else None
        metrics = metrics_from_images([load_images(path)], model, batch_size=batch_size, keep_features=True,
                                      progress=Progress("reference features", array_shape(path, "arr_0")[0]))
        return _image_set(metrics, labels, description)

    image_set = _cached_reference(spec, f"{path.stem}.features", key, compute)
    if {"mu", "sigma"} <= keys:
        image_set = dataclasses.replace(image_set, stats=load_stats(path))
    return image_set


def dataset_batches(data: DataSpec, *, crop: str, seed: int, num_images: int,
                    batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(images uint8 [b, S, S, 3], labels [b]) of the reference dataset `data` (its train split), read by this
    process alone: `num_images` random training views (crop train, from `seed`), or the first `num_images`
    center crops (0 = all)."""
    if crop == "center":
        for batch in data_pipeline.eval_batches(data, batch_size=batch_size, num_images=num_images,
                                                process_index=0, process_count=1):
            yield batch["image"][batch["mask"]], batch["label"][batch["mask"]]
        return
    batches = data_pipeline.train_iterator(data, global_batch=batch_size, seed=seed, process_index=0,
                                           process_count=1)
    for start in range(0, num_images, batch_size):
        batch, count = next(batches), min(batch_size, num_images - start)
        yield batch["image"][:count], batch["label"][:count]


# ----------------------------------------------------------------------------- scores


def scores(samples: ImageSet, reference: ImageSet, *, nearest_k: int, chunk: int, is_splits: int) -> dict:
    """Every score the two sets allow (see the module docstring)."""
    logits = samples.logits
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

    def __init__(self, score: ScoreSpec, reference: ReferenceSpec):
        self.score, self.reference_spec = score, reference
        self.model = load_inception(score.inception or None)
        self._references: dict[str, ImageSet] = {}

    def reference(self, *, image_size: int, num_samples: int, tokenizer: dict | None) -> ImageSet:
        """The reference for samples of this size and count (a dataset's defaults depend on both) and, with
        reference.reconstruct, of this tokenizer."""
        key = json.dumps([image_size, num_samples, tokenizer], sort_keys=True)
        if key not in self._references:
            self._references[key] = reference_set(self.reference_spec, self.model, batch_size=self.score.batch_size,
                                                  image_size=image_size, num_samples=num_samples, tokenizer=tokenizer)
        return self._references[key]

    def __call__(self, samples_dir) -> dict:
        """Score the samples in `samples_dir`; writes scores.json there and returns it."""
        s = self.score
        samples_dir = Path(samples_dir)
        files = sample_files(samples_dir)
        shapes = [array_shape(path, "arr_0") for path in files]
        samples = self.samples(samples_dir, files, sum(shape[0] for shape in shapes))
        record = _sampling_record(samples_dir)
        reference = self.reference(image_size=shapes[0][1], num_samples=samples.count,
                                   tokenizer=self._tokenizer(record, samples_dir))
        results = scores(samples, reference, nearest_k=s.nearest_k, chunk=s.chunk, is_splits=s.is_splits)
        settings = dataclasses.asdict(self.reference_spec)
        if self.reference_spec.data is not None:
            settings["data"] = dataclasses.asdict(self.reference_spec.dataset(shapes[0][1]))
        results.update(reference=dict(description=reference.description, num_images=reference.count,
                                      stats=reference.stats.description),
                       settings=dict(score=dataclasses.asdict(s), reference=settings),
                       inception_sha256=self.model.weights_sha256, sampling=record)
        if jax.process_index() == 0:
            reports.write_metrics_json(results, samples_dir / SCORES_FILE)
        print(summary_line(results, samples_dir), flush=True)
        return results

    def samples(self, samples_dir: Path, files: list[Path], count: int) -> ImageSet:
        """The features of the `count` samples in `files`, from SAMPLES_CACHE when those files made it."""

        def compute() -> ImageSet:
            metrics = metrics_from_images(_images(files), self.model, batch_size=self.score.batch_size,
                                          keep_features=True, progress=Progress("sample features", count))
            return _image_set(metrics, sample_labels(files), f"samples in {samples_dir}")

        key = dict(files=[[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in files],
                   inception_sha256=self.model.weights_sha256)
        return feature_cache.cached(epath.Path(samples_dir) / SAMPLES_CACHE, key, compute, what="sample features")

    def _tokenizer(self, record: dict | None, samples_dir: Path) -> dict | None:
        """The tokenizer record to pass the reference through: sampling.json's, with reference.reconstruct."""
        if not self.reference_spec.reconstruct:
            return None
        config_lib.require(record is not None and "tokenizer" in record, "reference.reconstruct",
                           f"needs the samples' tokenizer, which {samples_dir / 'sampling.json'} does not record")
        return record["tokenizer"]


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
