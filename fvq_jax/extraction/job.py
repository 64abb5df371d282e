"""The extraction task: a trained tokenizer turns a dataset into token grids, once, for training a GPT.

  python -m fvq_jax.main --config=configs/extract_codes.py:tokenizer=RUN_OR_EXPORT --workdir=OUT

Every image of the split (the first `num_images`, or all) becomes one record of A code grids [A, h, w] int32
in OUT (layout, manifest, writer and reader: fvq_jax/data/codes.py); the views (ten-crop, center, random) are
described in fvq_jax/extraction/views.py, the pipeline that makes and encodes them in pipeline.py. Only
single-level quantizers (type vq or ema) are accepted: the GPT models one code per position, and a residual
or multi-scale tokenizer has several.

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

Resume. A rerun of the same command keeps the finished shards that still hold what was written (size and
SHA-256 against their sidecars; a truncated or corrupt one is named and written again), overwrites stale
.tmp files and writes identical files. manifest.json is written with status "partial" before the first
shard and "complete" at the end. The settings that decide the codes (tokenizer path, its resolved step and
weights, data, split, image size, views, crop range, seed, image count, shard size) are kept in the manifest
and in every sidecar; a rerun that would change them is refused with the fields named (batch_size, the mesh
and the reader settings may change).

Unreadable images are skipped, counted, logged once by name (fvq_jax.data.unreadable) and listed in the
manifest. A progress line (images done / total, images/s, ETA) is printed every `progress_every` seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fvq_jax import config_lib
from fvq_jax.data import codes
from fvq_jax.data.pipeline import local_batch_size
from fvq_jax.data.sources import Record, split_source
from fvq_jax.data.spec import DataSpec
from fvq_jax.extraction import manifest as manifest_lib
from fvq_jax.extraction.pipeline import Encoder, encode_batches, image_batches
from fvq_jax.extraction.spec import ExtractionSpec
from fvq_jax.extraction.views import Views, make_views
from fvq_jax.models.load import Loaded, load_tokenizer
from fvq_jax.models.vqgan import VQGANArch
from fvq_jax.progress import Progress
from fvq_jax.train.lock import WorkdirLock

SINGLE_LEVEL_QUANTIZERS = ("vq", "ema")


def resolve(config: ml_collections.ConfigDict, num_processes: int | None = None) -> ExtractionSpec:
    """The extraction spec of `config`; ConfigError naming the first bad field that needs no tokenizer, data or
    devices to judge (the process count: None = unknown)."""
    spec = ExtractionSpec.from_config(config)
    if num_processes and spec.batch_size:
        local_batch_size(spec.batch_size, num_processes, "batch_size")
    return spec


def extract_codes(spec: ExtractionSpec, workdir) -> dict[str, Any]:
    """The extraction entry (configs/extract_codes.py, `resolve`): see the module docstring. Returns the
    manifest."""
    out = os.path.abspath(os.fspath(workdir))
    with WorkdirLock(out):
        started = time.time()
        plan = make_plan(spec, out)
        shards = codes.plan_shards(plan.num_images, spec.shard_size)
        todo = shards_to_write(plan, shards, out)
        if not todo and plan.previous is not None and plan.previous.get("status") == "complete":
            print(f"{out}: all {len(shards)} shards are extracted already ({plan.previous['num_images']} images)",
                  flush=True)
            return plan.previous
        manifest = manifest_lib.describe(plan, len(shards))
        manifest_lib.update_manifest(manifest, out, shards, "partial")
        loop_seconds = write_shards(plan, todo, out)
        return finish(plan, manifest, shards, todo, out, time.time() - started, loop_seconds)


# ----------------------------------------------------------------------------- what to extract, and from what


@dataclasses.dataclass(frozen=True)
class Plan:
    """One extraction, resolved: the spec, its data against the tokenizer's, the views, the batch, the tokenizer."""
    spec: ExtractionSpec
    data: DataSpec
    split: str
    augment: str
    views: Views
    source: Sequence[Record]
    num_images: int  # the first images of the source that are extracted
    batch_size: int  # images per step, all processes together
    local_batch: int  # this process's images per step
    loaded: Loaded
    encoder: Encoder
    grid: tuple[int, ...]  # codes per view (h, w)
    settings: dict[str, Any]  # what decides the codes (manifest.code_settings)
    previous: dict | None  # the manifest already in the output directory


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


def batch_size(spec: ExtractionSpec, num_views: int) -> int:
    """Images per step: spec.batch_size, or one that splits over the processes and whose views split over the
    mesh's batch shards (ConfigError naming batch_size when the one given does not)."""
    processes, shards = jax.process_count(), spec.mesh.batch_shards(jax.device_count())
    cpu_devices = jax.device_count() if jax.devices()[0].platform == "cpu" else 0
    batch = spec.images_per_batch(num_views, math.lcm(processes, shards // math.gcd(num_views, shards)), cpu_devices)
    local_batch_size(batch, processes, "batch_size")
    config_lib.require(batch * num_views % shards == 0, "batch_size",
                       f"{batch} images x {num_views} views do not split over the mesh's {shards} batch shards")
    return batch


def make_plan(spec: ExtractionSpec, out: str) -> Plan:
    """Resolve the extraction against the tokenizer, the data and the devices, load the tokenizer, and refuse a
    finished or unfinished extraction in `out` made with other settings."""
    resolved = []

    def resolve(tokenizer_config: ml_collections.ConfigDict) -> None:  # before the tokenizer's arrays are read
        data, split, augment = spec.resolve_data(tokenizer_config.get("data", {}))
        check_tokenizer(spec.tokenizer, tokenizer_config, data.image_size)
        num_views = spec.views_per_image(augment)
        source = split_source(data, split)
        resolved.append((data, split, augment, num_views, source, batch_size(spec, num_views)))

    loaded = load_tokenizer(spec.tokenizer, step=spec.step or None, use_ema=spec.use_ema, mesh_cfg=spec.mesh,
                            check=resolve)
    data, split, augment, num_views, source, batch = resolved[-1]
    views = make_views(data, augment, num_views, spec.crop_range, spec.seed)
    num_images = min(spec.num_images, len(source)) if spec.num_images else len(source)
    settings = manifest_lib.code_settings(spec, data, split, augment, loaded, num_images)
    previous = read_previous(out)
    if previous is not None:
        kind = "finished" if previous.get("status") == "complete" else "unfinished"
        manifest_lib.refuse_changes(f"the {kind} extraction in {out}", previous["settings"], settings)
    encoder = Encoder(loaded.model, loaded.mesh)
    grid = encoder.grid(data.image_size, spec.mesh.batch_shards(jax.device_count()))
    return Plan(spec, data, split, augment, views, source, num_images, batch, batch // jax.process_count(), loaded,
                encoder, grid, settings, previous)


def read_previous(out: str) -> dict | None:
    return codes.read_manifest(out) if os.path.exists(os.path.join(out, codes.MANIFEST)) else None


# ----------------------------------------------------------------------------- shards left


def deal(shards: list[codes.Shard], process_index: int, process_count: int) -> list[codes.Shard]:
    """Process `process_index`'s share of the unfinished shards: every process_count-th, from its index."""
    return shards[process_index::process_count]


def shards_to_write(plan: Plan, shards: list[codes.Shard], out: str) -> list[codes.Shard]:
    """The shards that are not finished, or no longer hold what was written (named on the console), as process 0
    sees them; a finished shard made with other settings is refused."""
    finished = {s.index: path for s in shards if (path := codes.finished_file(out, s.index))}
    sidecars = {index: codes.read_sidecar(path) for index, path in finished.items()}
    for index, path in finished.items():  # the manifest may be gone: each shard says how it was made
        manifest_lib.refuse_changes(f"the shard {path}", sidecars[index]["settings"], plan.settings)
    done = np.zeros(len(shards), np.int32)
    if jax.process_index() == 0:
        indices = sorted(finished)
        problems = codes.shard_problems([finished[i] for i in indices], [sidecars[i] for i in indices],
                                        f"verify the shards in {out}")
        for index, problem in zip(indices, problems):
            if problem:
                print(f"{finished[index]}: {problem}; writing it again", flush=True)
            done[index] = problem is None
    if jax.process_count() > 1:  # process 0's list, so that every process deals the same one
        done = np.asarray(multihost_utils.broadcast_one_to_all(done))
    return [s for s in shards if not done[s.index]]


# ----------------------------------------------------------------------------- extract


def write_shards(plan: Plan, todo: list[codes.Shard], out: str) -> float:
    """Encode and write this process's share of `todo` (all processes in lockstep); returns the loop's seconds."""
    process, processes = jax.process_index(), jax.process_count()
    mine = deal(todo, process, processes)
    # Every process runs as many steps as the busiest one; the others pad.
    steps = max(math.ceil(sum(s.end - s.start for s in deal(todo, p, processes)) / plan.local_batch)
                for p in range(processes))
    todo_images = sum(s.end - s.start for s in todo)
    progress = Progress("extract", plan.num_images, done=plan.num_images - todo_images,
                        every=plan.spec.progress_every)
    writer = codes.ShardWriter(out, process, mine, plan.settings)
    started = time.time()
    if steps:
        batches = image_batches(plan.source, mine, plan.views, plan.local_batch, steps, plan.data)
        try:
            encode_batches(batches, steps, plan.encoder, writer, plan.grid, progress, plan.batch_size)
        finally:
            batches.close()  # its worker processes, if any
    writer.close()
    return time.time() - started


def finish(plan: Plan, manifest: dict, shards: list[codes.Shard], todo: list[codes.Shard], out: str,
           seconds: float, loop_seconds: float) -> dict[str, Any]:
    """Check that every shard was written (by some process) and write the complete manifest."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("extract_codes: every shard written")
    missing = [s.index for s in todo if codes.finished_file(out, s.index) is None]
    if missing:
        raise RuntimeError(f"shards {missing} of {out} are missing after extraction: every process must see the "
                           "same filesystem (see fvq_jax/extraction/job.py)")
    todo_images = sum(s.end - s.start for s in todo)
    rate = todo_images / max(loop_seconds, 1e-9)
    mesh = plan.loaded.mesh
    extraction = {"finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "seconds": round(seconds, 2),
                  "images_this_session": todo_images, "images_per_second": round(rate, 2),
                  "resumed": todo_images < plan.num_images, "process_count": jax.process_count(),
                  "device_count": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                  "batch_size": plan.batch_size,
                  "mesh": dict(zip(mesh.axis_names, (int(n) for n in mesh.devices.shape)))}
    manifest = manifest_lib.update_manifest(manifest, out, shards, "complete", extraction)
    if not manifest["num_images"]:
        raise ValueError(f"no readable image among the {plan.num_images} of {plan.data.source}/{plan.split}")
    if jax.process_index() == 0:
        grid, views = plan.grid, plan.views.num_views
        print(f"extracted {todo_images} images x {views} grids of {grid[0]}x{grid[1]} in {seconds:.1f} s "
              f"({rate:.2f} img/s, {rate * views:.1f} grids/s with compilation; setup "
              f"{seconds - loop_seconds:.1f} s); {manifest['num_images']} images in all, "
              f"{manifest['num_skipped']} unreadable skipped -> {out}", flush=True)
    return manifest
