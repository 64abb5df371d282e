"""Code extraction: where the time goes stage by stage, the encoder alone as the bound, today's extraction vs this one.

  python -m fvq_jax.benchmarks.extraction          # the 32x32 digits folder, ten-crop, batch 64, 1,280 images
  python -m fvq_jax.benchmarks.extraction --tiny   # every path once at 16x16, no figures (the tests run it)

Setup, in a temporary directory unless --folder / --tokenizer name existing ones: the digits folder of
`python -m fvq_jax.tools.sample_folder --kind=digits` (one variant per digit: 1,618 training images, 32x32, 10
classes), and a tokenizer with random weights of the architecture a user trains on it
(configs/tokenizer.py:res=32, the local VQ-GAN: 8x8 codes, K = 1,024, VQBridge S/4; random weights cost what
trained ones do) saved as an export.

Stages, on the first --batch images, each on one thread (the median of --repeats), per image:
  decode        the file opened and decoded (fvq_jax.data.unreadable.read_image)
  resize        the ADM resize to the ten-crop's side int(1.1 S) (ten-crop) or the center crop at S (center)
  crops+flips   torchvision's TenCrop of it: four corners, the center and the same five mirrored (ten-crop)
  to device     the batch's views [B * A, S, S, 3] onto the devices
  encoder       the jitted encode of that batch already on the devices: the bound of any extraction pipeline
                (also at batch 1 and at the batch extraction picks by itself, batch_size=0)
  writing       records, array_record, the shard's SHA-256 and sidecar
End to end: `python -m fvq_jax.main --config=configs/extract_codes.py`, each run in its own process, three runs
per setting: a warm-up of one batch that fills a compilation cache the runs share (no timed run compiles), one
batch again, then --images images. Images/s is the last run's manifest figure (images over the extraction loop's
seconds: start-up, tokenizer loading and verification excluded); CPU ms per image is the CPU time of the last
two runs' processes, subtracted, over the images between them. The settings:
  today   the extraction as it was before fvq_jax/extraction/ (fvq_jax/tools/extract_codes.py), run from its own
          source tree: `git archive` of --baseline (default: the parent of the commit that removed that file)
          into the temporary directory, so it is exactly the code of then; at batch 1 (its default) and --batch;
  this    fvq_jax/extraction at --batch and at its own choice (batch_size=0).
Then the codes of both at --batch are compared record by record (labels, indices, every code), and open_codes'
verification is timed (SHA-256 of shards from the page cache, MB/s) and extrapolated to ImageNet's ten-crop
codes. Prints a markdown table and one JSON line. On a shared machine, read the ratios and the CPU times: every
row of one run shares its load, and the CPU time per image depends little on it.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from fvq_jax import checkpointing, config_lib, files
from fvq_jax.sharding import MeshSpec
from fvq_jax.benchmarks.common import describe_device, emit
from fvq_jax.data import codes
from fvq_jax.data.sources import FolderSource
from fvq_jax.data.transforms import TEN_CROP_VIEWS, center_crop, ten_crop
from fvq_jax.data.unreadable import read_image
from fvq_jax.extraction.pipeline import Encoder
from fvq_jax.extraction.spec import ExtractionSpec
from fvq_jax.models.factory import VQGANSpec, build_tokenizer
from fvq_jax.models.load import load_tokenizer
from fvq_jax.tools import sample_folder

ROOT = pathlib.Path(__file__).resolve().parents[2]
REMOVED = "fvq_jax/tools/extract_codes.py"  # today's extraction; --baseline defaults to the commit before its removal
CROP_RANGE = 1.1  # configs/extract_codes.py's
IMAGENET_IMAGES = 1_281_167

_TINY = flags.DEFINE_bool("tiny", False, "16x16 images, the tiny tokenizer, 24 images at batch 8, 1 repeat, one run "
                          "per setting, today's extraction at batch 8 only: every path once, no figures.")
_IMAGES = flags.DEFINE_integer("images", 1280, "Images of the timed end-to-end runs.")
_BATCH = flags.DEFINE_integer("batch", 64, "Images per batch (ten-crop: 10 views each).")
_AUGMENT = flags.DEFINE_enum("augment", "tencrop", ["tencrop", "center"], "The views.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeats of each stage (the median is reported).")
_FOLDER = flags.DEFINE_string("folder", None, "An image folder <folder>/train/<class>/*; default: the digits.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer run or export; default: random weights.")
_BASELINE = flags.DEFINE_string("baseline", None, f"The git revision of today's extraction; default: the parent of "
                                f"the commit that removed {REMOVED}; 'none' skips it.")
_VERIFY_MB = flags.DEFINE_integer("verify_mb", 256, "MiB of shards whose verification is timed.")


# ----------------------------------------------------------------------------- setup


def make_tokenizer(out: str, folder: str, tiny: bool) -> str:
    """An export with random weights of configs/tokenizer.py:res=32 (or :tiny, 16x16), reading `folder`."""
    config = config_lib.load_file(ROOT / "configs" / "tokenizer.py").get_config("tiny" if tiny else "res=32")
    config.data.update(source="folder", folder=folder, train_split="train", eval_split="validation")
    _, params, rest = nnx.split(build_tokenizer(VQGANSpec.from_config(config), rngs=nnx.Rngs(0)), nnx.Param, ...)
    checkpointing.save_export(out, {"params": nnx.to_pure_dict(params), "state": nnx.to_pure_dict(rest)},
                              config.to_dict())
    return out


def git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True, timeout=120).stdout


def baseline_tree(revision: str | None, into: str) -> tuple[str, str] | None:
    """(today's source tree unpacked in `into`, its commit), or None without a git checkout."""
    try:
        if revision is None:
            removed = git("log", "-1", "--format=%H", "--diff-filter=D", "--", REMOVED).decode().strip()
            revision = f"{removed}^" if removed else "HEAD"
        commit = git("rev-parse", "--short", revision).decode().strip()
        archive = git("archive", "--format=tar", commit, "fvq_jax", "configs")
    except (OSError, subprocess.CalledProcessError):
        return None
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(into, filter="data")
    return into, commit


# ----------------------------------------------------------------------------- stages


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(), the median over `repeats` calls (CPU: every thread of this process)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def stages(folder: str, tokenizer: str, augment: str, batch: int, encoder_batches: list[int], repeats: int,
           scratch: str) -> dict[str, tuple]:
    """{stage: (wall, CPU) seconds per image} of one batch of `batch` images (see the module docstring), and the
    encoder alone at each of `encoder_batches` images per batch."""
    source = FolderSource(folder, "train")
    records = [source[i] for i in range(batch)]
    loaded = load_tokenizer(tokenizer)
    size = loaded.config.data.image_size
    encoder = Encoder(loaded.model, loaded.mesh)
    images = [read_image(r) for r in records]
    side = int(CROP_RANGE * size) if augment == "tencrop" else size
    resized = [center_crop(image, side) for image in images]
    views = np.stack([ten_crop(x, size) if augment == "tencrop" else x[None] for x in resized])
    flat = views.reshape((-1, size, size, 3))
    on_device = {n: jax.block_until_ready(encoder.put(flat[:n * views.shape[1]])) for n in {batch, *encoder_batches}}
    for x in on_device.values():
        jax.block_until_ready(encoder.encode(x))  # compiles
    result = np.asarray(encoder.encode(on_device[batch])).reshape(views.shape[:2] + encoder.grid(size, 1))
    shard = codes.Shard(0, 0, batch)

    def write():
        writer = codes.ShardWriter(tempfile.mkdtemp(dir=scratch), 0, [shard], {})
        for i, record in enumerate(records):
            writer.add(i, record["label"], result[i])
        writer.close()

    timings = {"decode": (lambda: [read_image(r) for r in records], batch),
               "resize": (lambda: [center_crop(image, side) for image in images], batch)}
    if augment == "tencrop":
        timings["crops+flips"] = (lambda: [ten_crop(x, size) for x in resized], batch)
    timings.update({"to device": (lambda: jax.block_until_ready(encoder.put(flat)), batch),
                    "encoder": (lambda: jax.block_until_ready(encoder.encode(on_device[batch])), batch),
                    "writing": (write, batch)})
    for n in encoder_batches:
        # The same number of images as one batch of `batch`, n at a time.
        timings[f"encoder, batch {n}"] = (lambda n=n: [jax.block_until_ready(encoder.encode(on_device[n]))
                                                       for _ in range(batch // n)], batch // n * n)
    return {name: tuple(t / count for t in timed(fn, repeats)) for name, (fn, count) in timings.items()}


# ----------------------------------------------------------------------------- end to end


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def extract(tree: str, tokenizer: str, folder: str, out: str, *, augment: str, images: int, batch: int,
            cache: str) -> tuple[dict, float]:
    """`python -m fvq_jax.main --config=configs/extract_codes.py` of source tree `tree` in its own process: (the
    manifest, the process's CPU seconds)."""
    command = [sys.executable, "-m", "fvq_jax.main",
               f"--config={tree}/configs/extract_codes.py:tokenizer={tokenizer},augment={augment},images={images},"
               f"batch={batch}", "--config.data.source=folder", f"--config.data.folder={folder}", f"--workdir={out}"]
    env = dict(os.environ, PYTHONPATH=tree, JAX_COMPILATION_CACHE_DIR=cache, TF_CPP_MIN_LOG_LEVEL="2",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    cpu = children_cpu()
    result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    with open(os.path.join(out, codes.MANIFEST)) as f:
        return json.load(f), children_cpu() - cpu


def end_to_end(tree: str, name: str, scratch: str, *, tiny: bool, first: int, **settings) -> dict:
    """{'rate': images/s, 'cpu_ms': CPU ms per image or None, 'batch', 'out'} of one setting (see the module
    docstring: a warm-up and a run of `first` images (one batch) before the timed one, unless tiny)."""
    if not tiny:
        extract(tree, out=os.path.join(scratch, f"{name}_warmup"), **dict(settings, images=first))
        _, small_cpu = extract(tree, out=os.path.join(scratch, f"{name}_small"), **dict(settings, images=first))
    out = os.path.join(scratch, name)
    manifest, cpu = extract(tree, out=out, **settings)
    extraction = manifest["extraction"]
    cpu_ms = None if tiny else 1e3 * (cpu - small_cpu) / (settings["images"] - first)
    return {"rate": extraction["images_per_second"], "cpu_ms": cpu_ms, "batch": extraction["batch_size"], "out": out}


def same_codes(a: str, b: str) -> tuple[int, int]:
    """(records of `a` equal to `b`'s in label, index and every code, records in `a`)."""
    first, second = codes.open_codes(a, verify=False), codes.open_codes(b, verify=False)
    equal = sum(len(first) == len(second) and all(np.array_equal(x[k], y[k]) for k in ("codes", "label", "index"))
                for x, y in zip(first, second))
    return equal, len(first)


def verification_rate(scratch: str, megabytes: int) -> float:
    """MB/s of the shard check open_codes runs (sizes, then SHA-256 on threads), over 8 files from the page cache."""
    rng = np.random.default_rng(0)
    paths, records = [], []
    for i in range(8):
        path = os.path.join(scratch, f"verify-{i}{codes.SHARD_SUFFIX}")
        with open(path, "wb") as f:
            f.write(rng.integers(0, 256, megabytes * 2 ** 20 // 8, np.uint8).tobytes())
        paths.append(path)
        records.append({"bytes": os.path.getsize(path), "sha256": files.sha256(path)})
    wall, _ = timed(lambda: codes.shard_problems(paths, records, "verify"), 1)
    return megabytes * 2 ** 20 / 1e6 / wall


# ----------------------------------------------------------------------------- report


def main(argv):
    del argv
    tiny = _TINY.value
    batch, images, repeats = (8, 24, 1) if tiny else (_BATCH.value, _IMAGES.value, _REPEATS.value)
    augment = _AUGMENT.value
    views = len(TEN_CROP_VIEWS) if augment == "tencrop" else 1
    cpu_devices = jax.device_count() if jax.devices()[0].platform == "cpu" else 0
    auto = ExtractionSpec(tokenizer="-", mesh=MeshSpec(data=-1, fsdp=1)).images_per_batch(views, 1, cpu_devices)  # a one-process extraction's own
    with tempfile.TemporaryDirectory() as scratch:
        folder = _FOLDER.value or os.path.join(scratch, "digits")
        if not _FOLDER.value:
            sample_folder.write_digits(folder, variants=1)
        tokenizer = _TOKENIZER.value or make_tokenizer(os.path.join(scratch, "tokenizer"), folder, tiny)
        timing = stages(folder, tokenizer, augment, batch, sorted({1, auto} - {batch}), repeats, scratch)
        common = dict(tokenizer=tokenizer, folder=folder, augment=augment, images=images, tiny=tiny,
                      cache=os.path.join(scratch, "jit_cache"))
        rows, identical = {}, {}
        skip_baseline = _BASELINE.value == "none"
        baseline = None if skip_baseline else baseline_tree(_BASELINE.value, os.path.join(scratch, "today"))
        today = f"today ({REMOVED} at {baseline[1]})" if baseline else None
        if baseline is not None:
            for today_batch in sorted({batch} if tiny else {1, batch}):
                rows[today, today_batch] = end_to_end(baseline[0], f"today_{today_batch}", scratch, batch=today_batch,
                                                      first=today_batch, **common)
        this = "this (fvq_jax/extraction)"
        for this_batch in [batch] if tiny else [batch, 0]:
            rows[this, this_batch] = end_to_end(str(ROOT), f"this_{this_batch}", scratch, batch=this_batch,
                                                first=this_batch or auto, **common)
        if baseline is not None:  # the same batches (the same programs), and each one's default
            identical[f"this and today at batch {batch}"] = same_codes(rows[this, batch]["out"],
                                                                       rows[today, batch]["out"])
            if not tiny:
                identical["this at batch_size=0 and today at batch 1"] = same_codes(rows[this, 0]["out"],
                                                                                    rows[today, 1]["out"])
        verify = verification_rate(scratch, 8 if tiny else _VERIFY_MB.value)

    this_rate, encoder = rows[this, batch]["rate"], 1 / timing["encoder"][0]
    host = sum(timing[name][0] for name in timing if not name.startswith("encoder"))
    print(f"\n{describe_device()}; {augment}, {views} view(s) of each image, {images} images end to end; load "
          f"average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print(f"| stage (batch {batch}) | ms / image (wall) | ms / image (CPU) | images/s |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in timing.items():
        print(f"| {name} | {1e3 * wall:.2f} | {1e3 * cpu:.2f} | {1 / wall:,.1f} |")
    print(f"| all but the encoder, one thread | {1e3 * host:.2f} | | {1 / host:,.0f} |")
    print(f"\n| end to end | images/s | CPU ms / image | this at batch {batch}: x images/s |")
    print("|---|---|---|---|")
    for (name, chosen), row in rows.items():
        cpu = "" if row["cpu_ms"] is None else f"{row['cpu_ms']:.1f}"
        label = f"batch {chosen}" if chosen else f"batch_size=0 (batch {row['batch']})"
        print(f"| {name}, {label} | {row['rate']:,.1f} | {cpu} | {this_rate / row['rate']:.2f} |")
    print(f"| the encoder alone, batch {batch} | {encoder:,.1f} | {1e3 * timing['encoder'][1]:.1f} | "
          f"{this_rate / encoder:.2f} |")
    for what, (same, compared) in identical.items():
        print(f"\ncodes identical, {what}: {same} of {compared} images")
    size_gb = IMAGENET_IMAGES * (len(codes.HEADER) + 10 * 256) * 4 / 1e9
    print(f"verification (SHA-256 on threads, page cache): {verify:,.0f} MB/s; ImageNet's ten-crop codes at 256 "
          f"({size_gb:.1f} GB) take {size_gb * 1e3 / verify:.0f} s at that rate (from disk: at most its read rate)")
    emit({"benchmark": "extraction", "device": describe_device(), "augment": augment, "batch": batch,
          "images": images, "stages_ms_per_image": {k: [1e3 * w, 1e3 * c] for k, (w, c) in timing.items()},
          "end_to_end": [{"setting": name, "batch": row["batch"], "images_per_s": row["rate"],
                          "cpu_ms_per_image": row["cpu_ms"]} for (name, _), row in rows.items()],
          "encoder_images_per_s": encoder, "codes_identical": {k: list(v) for k, v in identical.items()},
          "verify_MB_per_s": verify,
          "load_average": os.getloadavg()[0]})


if __name__ == "__main__":
    app.run(main)
