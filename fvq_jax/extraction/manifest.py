"""What an extraction records in its manifest.json: the settings that decide the codes, the fixed description
(record layout, tokenizer, views, dataset), and the shards gathered from their sidecars."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import jax

import fvq_jax
from fvq_jax import checkpointing, config_lib
from fvq_jax.data import codes
from fvq_jax.data.sources import class_names
from fvq_jax.data.spec import DataSpec
from fvq_jax.data.transforms import TEN_CROP_VIEWS
from fvq_jax.extraction.spec import ExtractionSpec
from fvq_jax.models.load import Loaded, is_run


def code_settings(spec: ExtractionSpec, data: DataSpec, split: str, augment: str, loaded: Loaded,
                  num_images: int) -> dict[str, Any]:
    """{config field: value} of everything that decides the files' contents; a resume must match them."""
    settings = {"tokenizer": str(checkpointing.absolute(spec.tokenizer)), "step": loaded.step,
                "weights": loaded.weights, "augment": augment, "num_images": num_images,
                "shard_size": spec.shard_size, "data.source": data.source, "data.split": split,
                "data.image_size": data.image_size}
    by_source = {"tfds": ("tfds_name", "tfds_data_dir"), "folder": ("folder",), "photos": ()}[data.source]
    settings.update({f"data.{name}": getattr(data, name) for name in by_source})
    if augment == "tencrop":
        settings["crop_range"] = spec.crop_range
    if augment == "random":
        settings.update({"crops_per_image": spec.crops_per_image, "seed": spec.seed})
        settings.update({f"data.{name}": getattr(data, name) for name in ("train_crop", "max_resize_ratio", "flip")})
    return settings


def refuse_changes(what: str, saved: dict[str, Any], settings: dict[str, Any]) -> None:
    """ConfigError naming every field whose value differs from `saved`, the settings `what` was made with."""
    changes = config_lib.config_changes(saved, settings)
    if changes:
        show = lambda value: value if value is config_lib.MISSING else repr(value)  # noqa: E731
        listed = "; ".join(f"{field}: {show(old)} there, {show(new)} now" for field, old, new in changes)
        raise config_lib.ConfigError(changes[0][0], f"{what} was made with settings that would give other codes "
                                     f"({listed}); run it with its own settings, or choose a new --workdir")


def code_version() -> dict[str, Any]:
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


def describe(plan, num_shards: int) -> dict[str, Any]:
    """The manifest's fixed part (a job.Plan's): the record layout, the tokenizer, the views, the dataset and the
    settings."""
    spec, data, loaded, grid = plan.spec, plan.data, plan.loaded, plan.grid
    quantizer, saved_data = loaded.config.quantizer, loaded.config.get("data", {})
    names = class_names(plan.source)
    views = {"mode": plan.augment, "grids_per_image": plan.views.num_views}
    if plan.augment == "tencrop":
        views.update(crop_range=spec.crop_range, crop_side=int(spec.crop_range * data.image_size),
                     views=list(TEN_CROP_VIEWS))
    if plan.augment == "random":
        views.update(seed=spec.seed, train_crop=data.train_crop, max_resize_ratio=data.max_resize_ratio,
                     flip=data.flip, rng="numpy default_rng([seed, source index, view])")
    return {
        "format": codes.MANIFEST_FORMAT, "version": codes.MANIFEST_VERSION, "status": "partial",
        "record": {"layout": "little-endian int32: label, source index, then codes [A, h, w] in C order",
                   "header": list(codes.HEADER), "grids_per_image": plan.views.num_views, "grid": list(grid),
                   "dtype": "int32"},
        "tokenizer": {
            "path": plan.settings["tokenizer"], "kind": "run" if is_run(spec.tokenizer) else "export",
            "step": loaded.step, "weights": loaded.weights, "codebook_size": quantizer.codebook_size,
            "code_dim": quantizer.code_dim, "grid": list(grid), "quantizer": quantizer.type,
            "projector": quantizer.projector, "l2_norm": quantizer.l2_norm, "model": loaded.config.model.to_dict(),
            "data": {k: saved_data.get(k) for k in ("source", "tfds_name", "folder", "image_size", "train_crop")},
        },
        "augmentation": views,
        "image_size": data.image_size,
        "dataset": {"source": data.source, "split": plan.split, "name": data.name,
                    "num_source_images": len(plan.source)},
        "settings": plan.settings,
        "num_shards": num_shards, "shard_size": spec.shard_size,
        "num_classes": len(names) if names is not None else None, "class_names": list(names) if names else None,
    }


def update_manifest(manifest: dict, out: str, shards: list[codes.Shard], status: str,
                    extraction: dict | None = None) -> dict:
    """`manifest` with the finished shards' entries, image and label counts and skips gathered from their
    sidecars (all sessions, all processes), `status` and `extraction`; written to out/manifest.json by process 0."""
    entries, skipped, counts = codes.gather_shards(out, shards)
    # Without class names (a TFDS dataset without them), the labels seen so far bound the classes.
    num_classes = len(manifest["class_names"]) if manifest["class_names"] else max(counts, default=-1) + 1
    manifest.update(status=status, num_images=sum(e["images"] for e in entries), num_skipped=len(skipped),
                    skipped=skipped, num_classes=num_classes,
                    images_per_class=[counts.get(c, 0) for c in range(num_classes)], shards=entries)
    if extraction is not None:
        manifest["extraction"] = extraction
    manifest["code_version"] = code_version()
    if jax.process_index() == 0:
        codes.write_json(os.path.join(out, codes.MANIFEST), manifest)
    return manifest
