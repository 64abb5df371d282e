"""Extract the token codes of a dataset with a trained tokenizer, once, for training a class-conditional GPT.

  python -m fvq_jax.main --config=configs/extract_codes.py:tokenizer=RUN_OR_EXPORT --workdir=OUT

Every image of the split (the first `num_images`, or all) becomes one record of A code grids [A, h, w] int32
in OUT (layout, manifest and reader: fvq_jax/data/codes.py). The views, `augment`:
  tencrop  the reference (LlamaGen's extract_codes_c2i --ten-crop): the ADM center crop to
           int(crop_range * S) (281 for S = 256), then torchvision's TenCrop(S), A = 10 in the order of
           transforms.TEN_CROP_VIEWS: the four corners and the center, then the same five of the mirrored
           crop. The mirrored half is the flip augmentation: mirroring all ten again would only repeat them
           (a mirrored corner of the crop is the opposite corner of the mirrored crop, pixel for pixel);
  center   the ADM center crop at S, A = 1;
  random   `crops_per_image` training views (data.train_crop and data.flip, as the tokenizer trained),
           view k of source image i drawn from numpy's default_rng([seed, i, k]), A = crops_per_image.
Only single-level quantizers (type vq or ema) are accepted: the GPT models one code per position, and a
residual or multi-scale tokenizer has several.

Work split and devices. Source images [s * shard_size, (s + 1) * shard_size) form shard s. The shards not yet
finished are dealt round robin to the processes (process 0 lists them and broadcasts the list), and each
process writes its own shards, images in source order. All processes run the tokenizer together on the
global mesh (config.mesh), in lockstep: each step every process brings batch_size / process_count images,
their A views each, as one global batch; a process that has run out of images brings masked padding, which
is never written. Why the global mesh rather than each process's local devices: the tokenizer is then loaded
exactly as evaluation loads it (load_tokenizer's collective restore, FSDP-sharded weights for a tokenizer too
large to replicate), with no second way to build meshes and restore; the price, processes waiting for the
slowest, is at most about one shard of batches because the shards are dealt round robin. OUT must be a path
on one filesystem that every process sees (local disk for one host; NFS or a FUSE-mounted bucket for several;
not a gs:// URL: array_record writes plain files). The tokenizer may be anywhere Orbax reads.

Resume. A shard is written to shard-PPPPP-SSSSS.array_record.tmp, then its sidecar JSON, then renamed:
a shard is finished when its .array_record file exists. A rerun of the same command skips finished shards
(a stale .tmp is overwritten) and writes identical files. manifest.json is written with status "partial"
before the first shard and "complete" at the end. The settings that decide the codes (tokenizer path, its
resolved step and weights, data, split, image size, views, crop range, seed, image count, shard size) are
kept in the manifest and in every sidecar; a rerun that would change them is refused with the fields named
(batch_size, the mesh and the reader settings may change).

Unreadable images are skipped, counted, logged once by name (fvq_jax.data.unreadable) and listed in the
manifest. A progress line (images done / total, images/s, ETA) is printed every `log_every` batches.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
import subprocess
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from array_record.python import array_record_module
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

import fvq_jax
from fvq_jax import checkpointing, config_lib, sharding
from fvq_jax.data import codes as codes_format
from fvq_jax.data.pipeline import TrainExample, local_batch_size, prefetch
from fvq_jax.data.spec import SOURCES, TRAIN_CROPS
from fvq_jax.data.sources import Record, class_names, split_source
from fvq_jax.data.transforms import TEN_CROP_VIEWS, center_crop, ten_crop
from fvq_jax.data.value_range import to_model_range
from fvq_jax.data.unreadable import SkipLog, Unreadable, read_image
from fvq_jax.models.vqgan import VQGANArch
from fvq_jax.models.load import is_run, load_tokenizer, saved_config
from fvq_jax.train.lock import WorkdirLock
from fvq_jax.progress import format_eta

AUGMENTS = ("tencrop", "center", "random")
SINGLE_LEVEL_QUANTIZERS = ("vq", "ema")
_PADDING: Record = {"padding": True}


def check_config(config: ml_collections.ConfigDict, num_processes: int | None = None) -> None:
    """ConfigError naming the first bad field that needs no tokenizer, data or devices to judge (the process
    count: None = unknown)."""
    config_lib.require(isinstance(config.tokenizer, str) and bool(config.tokenizer), "tokenizer",
                       "must name a training run or an export directory, e.g. tokenizer=workdir/fvq_photos")
    config_lib.require_number(config.step, "step", strict=False, integer=True)
    config_lib.require(isinstance(config.use_ema, bool), "use_ema", f"must be true or false, got {config.use_ema!r}")
    config_lib.require(config.augment is None or config.augment in AUGMENTS, "augment",
                       f"{config.augment!r} is not one of {list(AUGMENTS)} (or None)")
    config_lib.require_number(config.crop_range, "crop_range", minimum=1.0, strict=False)
    config_lib.require_number(config.crops_per_image, "crops_per_image", integer=True)
    config_lib.require_number(config.seed, "seed", strict=False, integer=True)
    for name in ("batch_size", "shard_size", "log_every"):
        config_lib.require_number(config[name], name, integer=True)
    config_lib.require_number(config.num_images, "num_images", strict=False, integer=True)
    if num_processes:
        local_batch_size(config.batch_size, num_processes, "batch_size")
    if config.data.source is not None:
        config_lib.require_choice(config.data.source, "data.source", SOURCES)


# ----------------------------------------------------------------------------- settings


def resolve_data(config: ml_collections.ConfigDict, tokenizer_config: ml_collections.ConfigDict,
                 augment: str | None = None) -> ml_collections.ConfigDict:
    """The tokenizer's saved `data` block overridden by the config's fields that are not None, with `split`
    (None: the tokenizer's train_split); ConfigError naming a field that is still missing or bad."""
    saved = tokenizer_config.data.to_dict() if "data" in tokenizer_config else {}
    data = {**saved, **{k: v for k, v in config.data.to_dict().items() if v is not None}}
    data.setdefault("split", saved.get("train_split"))
    data["tfds_data_dir"] = data.get("tfds_data_dir") or ""
    data["folder"] = data.get("folder") or ""

    def required(*names):
        for name in names:
            config_lib.require(data.get(name) is not None, f"data.{name}",
                               f"{config.tokenizer} records no data.{name} (an imported tokenizer?): set it")

    required("source")
    config_lib.require_choice(data["source"], "data.source", SOURCES)
    required("split", "image_size", "num_workers", "read_threads", "prefetch_buffer",
             *{"tfds": ("tfds_name",), "folder": (), "photos": ("train_split", "eval_split")}[data["source"]])
    config_lib.require_number(data["image_size"], "data.image_size", integer=True)
    for name in ("num_workers", "read_threads"):
        config_lib.require_number(data[name], f"data.{name}", strict=False, integer=True)
    config_lib.require_number(data["prefetch_buffer"], "data.prefetch_buffer", integer=True)
    if (augment or default_augment(data["source"])) == "random":
        required("train_crop", "max_resize_ratio", "flip")
        config_lib.require_choice(data["train_crop"], "data.train_crop", TRAIN_CROPS)
        config_lib.require_number(data["max_resize_ratio"], "data.max_resize_ratio", minimum=1.0, strict=False)
    return ml_collections.ConfigDict(data)


def default_augment(source: str) -> str:
    """augment=None: random views of the nine built-in photos, the reference's ten-crop of any dataset."""
    return "random" if source == "photos" else "tencrop"


def grids_per_image(config: ml_collections.ConfigDict, augment: str) -> int:
    return {"tencrop": len(TEN_CROP_VIEWS), "center": 1, "random": config.crops_per_image}[augment]


def check_tokenizer(path: str, tokenizer_config: ml_collections.ConfigDict, image_size: int) -> None:
    """ConfigError unless the tokenizer gives one code per token at this image size."""
    kind = tokenizer_config.quantizer.type
    config_lib.require(kind in SINGLE_LEVEL_QUANTIZERS, "tokenizer",
                       f"{path} has quantizer.type={kind!r}; only single-level quantizers "
                       f"{list(SINGLE_LEVEL_QUANTIZERS)} give one code per token, which is what the GPT models (a "
                       "residual or multi-scale tokenizer has several per position)")
    factor = VQGANArch.from_config(tokenizer_config.model, "model").downsample_factor
    config_lib.require(image_size % factor == 0, "data.image_size",
                       f"{image_size} is not divisible by the tokenizer's downsampling factor {factor}")


def code_settings(config, data, augment: str, loaded, num_images: int) -> dict[str, Any]:
    """{config field: value} of everything that decides the files' contents; a resume must match them."""
    settings = {"tokenizer": str(checkpointing.absolute(config.tokenizer)), "step": loaded.step,
                "weights": loaded.weights,
                "augment": augment, "num_images": num_images, "shard_size": config.shard_size}
    settings.update({f"data.{name}": data[name] for name in ("source", "split", "image_size")})
    settings.update({f"data.{name}": data[name] for name in {"tfds": ("tfds_name", "tfds_data_dir"),
                                                              "folder": ("folder",), "photos": ()}[data.source]})
    if augment == "tencrop":
        settings["crop_range"] = config.crop_range
    if augment == "random":
        settings.update({"crops_per_image": config.crops_per_image, "seed": config.seed})
        settings.update({f"data.{name}": data[name] for name in ("train_crop", "max_resize_ratio", "flip")})
    return settings


def refuse_changes(what: str, saved: dict[str, Any], settings: dict[str, Any]) -> None:
    """ConfigError naming every field whose value differs from `saved`, the settings `what` was made with."""
    changes = config_lib.config_changes(saved, settings)
    if changes:
        show = lambda value: value if value is config_lib.MISSING else repr(value)  # noqa: E731
        listed = "; ".join(f"{field}: {show(old)} there, {show(new)} now" for field, old, new in changes)
        raise config_lib.ConfigError(changes[0][0], f"{what} was made with settings that would give other codes "
                                     f"({listed}); run it with its own settings, or choose a new --workdir")


# ----------------------------------------------------------------------------- views


@dataclasses.dataclass(frozen=True)
class Views(grain.transforms.Map):
    """record -> {'grids': uint8 [A, S, S, 3], 'label', 'index', 'mask', 'skipped'}. Padding (index -1) and
    unreadable records give zeros with mask False; an unreadable one names itself in 'skipped'."""
    augment: str
    image_size: int
    num_views: int
    crop_range: float = 1.1
    seed: int = 0
    train_view: TrainExample | None = None  # random: the training transform

    def views(self, image: Image.Image, index: int) -> np.ndarray:
        size = self.image_size
        if self.augment == "center":
            return center_crop(image, size)[None]
        if self.augment == "tencrop":
            return ten_crop(center_crop(image, int(self.crop_range * size)), size)
        return np.stack([self.train_view.view(image, np.random.default_rng([self.seed, index, k]))
                         for k in range(self.num_views)])

    def map(self, record: Record) -> dict[str, Any]:
        image = None if "padding" in record else read_image(record)
        valid = image is not None and not isinstance(image, Unreadable)
        size = self.image_size
        return {
            "grids": self.views(image, record["index"]) if valid else np.zeros((self.num_views, size, size, 3),
                                                                                 np.uint8),
            "label": np.int32(record["label"] if valid else 0),
            "index": np.int32(record.get("index", -1)),
            "mask": np.bool_(valid),
            "skipped": image.entry() if isinstance(image, Unreadable) else "",
        }


def make_views(config, data, augment: str) -> Views:
    train_view = None
    if augment == "random":
        train_view = TrainExample(data.image_size, data.train_crop, data.max_resize_ratio, data.flip)
    return Views(augment, data.image_size, grids_per_image(config, augment), config.crop_range, config.seed, train_view)


# ----------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first source image
    end: int  # one past the last


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    return [Shard(s, s * shard_size, min((s + 1) * shard_size, num_images))
            for s in range(math.ceil(num_images / shard_size))]


def deal(shards: list[Shard], process_index: int, process_count: int) -> list[Shard]:
    """Process `process_index`'s share of the unfinished shards: every process_count-th, from its index."""
    return shards[process_index::process_count]


def finished_file(out: str, shard: int) -> str | None:
    """The finished shard file of shard `shard` (whichever process wrote it), or None."""
    found = sorted(glob.glob(os.path.join(out, f"shard-*-{shard:05d}.array_record")))
    found = [f for f in found if os.path.exists(f[:-len(".array_record")] + ".json")]
    return found[0] if found else None


def sidecar(path: str) -> dict[str, Any]:
    with open(path[:-len(".array_record")] + ".json") as f:
        return json.load(f)


def _write_json(path: str, content: dict) -> None:
    """Replace `path` in one rename: readers never see half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)


class ShardSink:
    """Routes this process's images, in stream order, to their shards' files; a shard is finished (tmp file
    closed, sidecar written, renamed) as soon as its last source image has passed, readable or not."""

    def __init__(self, out: str, process: int, shards: list[Shard], settings: dict[str, Any]):
        self._out, self._process, self._settings = out, process, settings
        self._todo = list(reversed(shards))
        self._writer = None
        self._seen = 0

    def _open(self, shard: Shard) -> None:
        for stale in glob.glob(os.path.join(self._out, f"shard-*-{shard.index:05d}.*")):
            os.remove(stale)  # an earlier session's unfinished file or sidecar of this shard
        self._path = os.path.join(self._out, codes_format.shard_stem(self._process, shard.index) + ".array_record")
        self._writer = array_record_module.ArrayRecordWriter(self._path + ".tmp", codes_format.WRITER_OPTIONS)
        self._seen, self._images, self._skipped, self._labels = 0, 0, [], {}

    def add(self, index: int, label: int, codes: np.ndarray | None, skipped: str = "") -> None:
        """Source image `index`: codes [A, h, w], or None when it was unreadable (`skipped`: name<TAB>reason)."""
        shard = self._todo[-1]
        if not shard.start <= index < shard.end:
            raise AssertionError(f"image {index} arrived while shard {shard} was open")
        if self._writer is None:
            self._open(shard)
        if codes is None:
            self._skipped.append(skipped.partition("\t")[0])
        else:
            self._writer.write(codes_format.encode_record(label, index, codes))
            self._images += 1
            self._labels[str(label)] = self._labels.get(str(label), 0) + 1
        self._seen += 1
        if self._seen == shard.end - shard.start:
            self._finish(shard)

    def _finish(self, shard: Shard) -> None:
        self._writer.close()
        stem = self._path[:-len(".array_record")]
        _write_json(stem + ".json", {"file": os.path.basename(self._path), "process": self._process,
                                     "shard": shard.index, "first": shard.start, "end": shard.end,
                                     "images": self._images, "skipped": self._skipped, "label_counts": self._labels,
                                     "settings": self._settings})
        os.replace(self._path + ".tmp", self._path)
        self._todo.pop()
        self._writer = None

    def close(self) -> None:
        if self._todo:
            raise AssertionError(f"the stream ended with shards {[s.index for s in self._todo]} unfinished")


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in the order make_array_from_process_local_data
    took them (its addressable row blocks in global order; replicas over other mesh axes coincide)."""
    blocks = {shard.index[0].start or 0: shard.data for shard in x.addressable_shards}
    return np.concatenate([np.asarray(blocks[start]) for start in sorted(blocks)])


def _batches(source, shards: list[Shard], views: Views, local_batch: int, num_steps: int, data):
    """This process's `num_steps` batches of views: its shards' images in order, then padding (an iterator to
    close: it may hold worker processes)."""
    parts = [grain.MapDataset.source(source)[s.start:s.end] for s in shards]
    padding = num_steps * local_batch - sum(s.end - s.start for s in shards)
    if padding:
        parts.append(grain.MapDataset.source([_PADDING] * padding))
    records = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
    dataset = records.map(views).batch(local_batch)
    # Elements are whole batches: buffer a few, not grain's default of 500.
    options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=max(2, data.read_threads))
    return iter(prefetch(dataset.to_iter_dataset(options), data.num_workers, data.prefetch_buffer))


# ----------------------------------------------------------------------------- manifest


def _code_version() -> dict[str, Any]:
    version = {"fvq_jax": fvq_jax.__version__, "jax": jax.__version__, "git": None}
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(fvq_jax.__file__)))
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            version["git"] = commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def read_previous(out: str) -> dict | None:
    path = os.path.join(out, codes_format.MANIFEST)
    if not os.path.exists(path):
        return None
    return codes_format.read_manifest(out)


def _gather_shards(out: str, shards: list[Shard]) -> tuple[list[dict], list[str]]:
    """(manifest entries of the finished shards, in shard order; the unreadable images they skipped)."""
    entries, skipped = [], []
    for shard in shards:
        path = finished_file(out, shard.index)
        if path is None:
            continue
        info = sidecar(path)
        entries.append({k: info[k] for k in ("file", "process", "shard", "first", "end", "images")})
        entries[-1]["label_counts"] = info["label_counts"]
        skipped += info["skipped"]
    return entries, skipped


def describe(config, data, augment: str, views: Views, loaded, tokenizer_config, source, grid: tuple[int, int],
             settings: dict[str, Any], num_shards: int) -> dict[str, Any]:
    """The manifest's fixed part: the record layout, the tokenizer, the views, the dataset and the settings."""
    quantizer, saved_data = tokenizer_config.quantizer, tokenizer_config.get("data", {})
    names = class_names(source)
    views_record = {"mode": augment, "grids_per_image": views.num_views}
    if augment == "tencrop":
        views_record.update(crop_range=config.crop_range, crop_side=int(config.crop_range * data.image_size),
                            views=list(TEN_CROP_VIEWS))
    if augment == "random":
        views_record.update(seed=config.seed, train_crop=data.train_crop, max_resize_ratio=data.max_resize_ratio,
                            flip=data.flip, rng="numpy default_rng([seed, source index, view])")
    return {
        "format": codes_format.MANIFEST_FORMAT, "version": codes_format.MANIFEST_VERSION, "status": "partial",
        "record": {"layout": "little-endian int32: label, source index, then codes [A, h, w] in C order",
                   "header": list(codes_format.HEADER), "grids_per_image": views.num_views, "grid": list(grid),
                   "dtype": "int32"},
        "tokenizer": {
            "path": settings["tokenizer"], "kind": "run" if is_run(config.tokenizer) else "export",
            "step": loaded.step, "weights": loaded.weights, "codebook_size": quantizer.codebook_size,
            "code_dim": quantizer.code_dim, "grid": list(grid), "quantizer": quantizer.type,
            "projector": quantizer.projector, "l2_norm": quantizer.l2_norm, "model": loaded.config.model.to_dict(),
            "data": {k: saved_data.get(k) for k in ("source", "tfds_name", "folder", "image_size", "train_crop")},
        },
        "augmentation": views_record,
        "image_size": data.image_size,
        "dataset": {"source": data.source, "split": data.split,
                    "name": {"tfds": data.tfds_name, "folder": data.folder}.get(data.source, "photos"),
                    "num_source_images": len(source)},
        "settings": settings,
        "num_shards": num_shards, "shard_size": config.shard_size,
        "num_classes": len(names) if names is not None else None, "class_names": list(names) if names else None,
    }


def update_manifest(manifest: dict, out: str, shards: list[Shard], status: str, extraction: dict | None = None) -> dict:
    """`manifest` with the finished shards' entries, image and label counts and skips gathered from their
    sidecars (all sessions, all processes), `status` and `extraction`; written to out/manifest.json by process 0."""
    entries, skipped = _gather_shards(out, shards)
    counts: dict[int, int] = {}
    for entry in entries:
        for label, n in entry.pop("label_counts").items():
            counts[int(label)] = counts.get(int(label), 0) + n
    # Without class names (a TFDS dataset without them), the labels seen so far bound the classes.
    num_classes = len(manifest["class_names"]) if manifest["class_names"] else max(counts, default=-1) + 1
    manifest.update(status=status, num_images=sum(e["images"] for e in entries), num_skipped=len(skipped),
                    skipped=skipped, num_classes=num_classes,
                    images_per_class=[counts.get(c, 0) for c in range(num_classes)], shards=entries)
    if extraction is not None:
        manifest["extraction"] = extraction
    manifest["code_version"] = _code_version()
    if jax.process_index() == 0:
        _write_json(os.path.join(out, codes_format.MANIFEST), manifest)
    return manifest


# ----------------------------------------------------------------------------- entry


def extract_codes(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
    """The extraction entry (configs/extract_codes.py): see the module docstring. Returns the manifest."""
    check_config(config)
    out = os.path.abspath(os.fspath(workdir))
    with WorkdirLock(out):
        return _extract(config, out)


def _extract(config: ml_collections.ConfigDict, out: str) -> dict[str, Any]:
    started = time.time()
    process, processes = jax.process_index(), jax.process_count()

    # ------------------------------------------------------------------ what to extract, and from what
    step = config.step or None
    tokenizer_config = saved_config(config.tokenizer, step)
    data = resolve_data(config, tokenizer_config, config.augment)
    augment = config.augment or default_augment(data.source)
    check_tokenizer(config.tokenizer, tokenizer_config, data.image_size)
    views = make_views(config, data, augment)
    source = split_source(data, data.split)
    num_images = min(config.num_images, len(source)) if config.num_images else len(source)
    local_batch = local_batch_size(config.batch_size, processes, "batch_size")
    batch_shards = sharding.batch_shards(config.mesh, jax.device_count())
    config_lib.require(config.batch_size * views.num_views % batch_shards == 0, "batch_size",
                       f"{config.batch_size} images x {views.num_views} views do not split over the mesh's "
                       f"{batch_shards} batch shards")

    # ------------------------------------------------------------------ tokenizer
    loaded = load_tokenizer(config.tokenizer, step=step, use_ema=config.use_ema, mesh_cfg=config.mesh)
    settings = code_settings(config, data, augment, loaded, num_images)
    previous = read_previous(out)
    if previous is not None:
        kind = "finished" if previous.get("status") == "complete" else "unfinished"
        refuse_changes(f"the {kind} extraction in {out}", previous["settings"], settings)
    graph, params, rest = nnx.split(loaded.model, nnx.Param, ...)
    batch_sharding = sharding.data_sharding(loaded.mesh)

    @functools.partial(jax.jit, out_shardings=batch_sharding)
    def encode(params, rest, images):
        """images: uint8 [B * A, S, S, 3] -> codes int32 [B * A, h, w]."""
        _, indices, _ = nnx.merge(graph, params, rest).encode(to_model_range(images))
        return indices.astype(jnp.int32)

    size = data.image_size
    probe = jax.ShapeDtypeStruct((batch_shards, size, size, 3), jnp.uint8)
    grid = tuple(jax.eval_shape(encode, params, rest, probe).shape[1:])

    # ------------------------------------------------------------------ shards left
    all_shards = plan_shards(num_images, config.shard_size)
    finished = [finished_file(out, s.index) for s in all_shards]
    for path in filter(None, finished):  # the manifest may be gone: each shard says how it was made
        refuse_changes(f"the shard {path}", sidecar(path)["settings"], settings)
    # Process 0's list of finished shards, so that every process deals the same list.
    done = np.array([path is not None for path in finished], np.int32)
    if processes > 1:
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    todo = [s for s, d in zip(all_shards, done) if not d]
    if not todo and previous is not None and previous.get("status") == "complete":
        print(f"{out}: all {len(all_shards)} shards are extracted already ({previous['num_images']} images)",
              flush=True)
        return previous
    manifest = describe(config, data, augment, views, loaded, tokenizer_config, source, grid, settings,
                        len(all_shards))
    update_manifest(manifest, out, all_shards, "partial")

    # ------------------------------------------------------------------ extract
    todo_images = sum(s.end - s.start for s in todo)
    mine = deal(todo, process, processes)
    sink = ShardSink(out, process, mine, settings)
    # Every process runs as many steps as the busiest one; the others pad.
    steps = max(math.ceil(sum(s.end - s.start for s in deal(todo, p, processes)) / local_batch)
                for p in range(processes))
    skips = SkipLog()
    pending = None  # (host batch, device codes) of the previous step: written while this step runs
    t_loop = t_log = time.time()
    done_log = 0

    def write(pending) -> None:
        batch, indices = pending
        codes = _local_rows(indices).reshape((local_batch, views.num_views) + grid)
        for row in range(local_batch):
            if batch["index"][row] >= 0:  # not padding
                sink.add(int(batch["index"][row]), int(batch["label"][row]),
                         codes[row] if batch["mask"][row] else None, str(batch["skipped"][row]))

    batches = _batches(source, mine, views, local_batch, steps, data) if steps else None
    try:
        for step in range(1, steps + 1):
            batch = next(batches)
            skips.record(batch["skipped"])
            images = batch["grids"].reshape((-1, size, size, 3))
            indices = encode(params, rest, jax.make_array_from_process_local_data(batch_sharding, images))
            if pending is not None:
                write(pending)
            pending = (batch, indices)
            if step % config.log_every == 0 or step == steps:
                jax.block_until_ready(indices)
                done = min(step * config.batch_size, todo_images)  # all processes' images, up to padding
                rate = (done - done_log) / max(time.time() - t_log, 1e-9)
                if process == 0:
                    print(f"extract {num_images - todo_images + done}/{num_images} images  {rate:.1f} img/s  "
                          f"ETA {format_eta((todo_images - done) / max(rate, 1e-9))}", flush=True)
                t_log, done_log = time.time(), done
    finally:
        if batches is not None:
            batches.close()  # its worker processes, if any
    if pending is not None:
        write(pending)
    sink.close()
    loop_seconds = time.time() - t_loop

    # ------------------------------------------------------------------ manifest
    if processes > 1:
        multihost_utils.sync_global_devices("extract_codes: every shard written")
    missing = [s.index for s in todo if finished_file(out, s.index) is None]
    if missing:
        raise RuntimeError(f"shards {missing} of {out} are missing after extraction: every process must see the "
                           "same filesystem (see fvq_jax/tools/extract_codes.py)")
    seconds = time.time() - started
    rate = todo_images / max(loop_seconds, 1e-9)
    extraction = {"finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(seconds, 2),
                  "images_this_session": todo_images, "images_per_second": round(rate, 2),
                  "resumed": todo_images < num_images, "process_count": processes, "device_count": jax.device_count(),
                  "device_kind": jax.devices()[0].device_kind, "batch_size": config.batch_size,
                  "mesh": dict(zip(loaded.mesh.axis_names, (int(n) for n in loaded.mesh.devices.shape)))}
    manifest = update_manifest(manifest, out, all_shards, "complete", extraction)
    if not manifest["num_images"]:
        raise ValueError(f"no readable image among the {num_images} of {data.source}/{data.split}")
    if process == 0:
        print(f"extracted {todo_images} images x {views.num_views} grids of {grid[0]}x{grid[1]} in {seconds:.1f} s "
              f"({rate:.2f} img/s, {rate * views.num_views:.1f} grids/s with compilation; setup "
              f"{seconds - loop_seconds:.1f} s); {manifest['num_images']} images in all, "
              f"{manifest['num_skipped']} unreadable skipped -> {out}", flush=True)
    return manifest
