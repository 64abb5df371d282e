"""Input pipeline throughput: decoded, randomly cropped and flipped 256x256 images per second per CPU core.

  python -m fvq_jax.benchmarks.input_pipeline [--num_files=256 --batches=12 --image_size=256]
  python -m fvq_jax.benchmarks.input_pipeline --num_files=8 --batches=1 --image_size=32   # seconds (the tests)

Writes a temporary ImageNet-like folder (JPEGs of about 500x375 made of resized photo crops plus
sensor-like noise, quality 95, ~100 KB like ImageNet's, so decoding costs what it does there), then times
  baseline: a plain loop in one thread: PIL open + decode + resize + random crop + flip, written
            the obvious way (no box halving needed: these files are below 2x the crop's short side);
  pipeline: fvq_jax.data.pipeline.train_iterator over the folder (grain, batch 32), for several
            thread / worker-process settings;
and prints a markdown table plus how many cores keep one accelerator fed at a given training speed.

"Per core" is images per CPU-second: CPU time of this process and its grain workers (from
/proc), so the figure holds on a machine shared with other jobs, where wall-clock rates do not.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from fvq_jax.data import pipeline, sources, transforms
from fvq_jax.data.spec import DataSpec

# ImageNet's common sizes (width, height); the mean file is ~110 KB at ~400x350.
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (333, 500))
BATCH = 32


def write_folder(root: pathlib.Path, num_files: int, seed: int = 0) -> float:
    """root/train/class_XX/*.JPEG from random crops of the sample photos; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    photos = [sources.load_photo(name) for name in sources.PHOTOS]
    total = 0
    for i in range(num_files):
        photo = photos[i % len(photos)]
        width, height = SIZES[rng.integers(len(SIZES))]
        side_h = int(rng.integers(photo.shape[0] // 2, photo.shape[0] + 1))
        side_w = min(photo.shape[1], int(side_h * width / height))
        top = int(rng.integers(0, photo.shape[0] - side_h + 1))
        left = int(rng.integers(0, photo.shape[1] - side_w + 1))
        crop = Image.fromarray(photo[top:top + side_h, left:left + side_w]).resize((width, height), Image.BICUBIC)
        noisy = np.asarray(crop, np.float32) + rng.normal(0.0, 8.0, (height, width, 3))
        folder = root / "train" / f"class_{i % 16:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.JPEG"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=95)
        total += path.stat().st_size
    return total / num_files / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its live worker processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in [os.getpid()] + [p.pid for p in multiprocessing.active_children()]:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


class Timer:
    """Wall and CPU seconds between start() and stop()."""

    def start(self):
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()

    def stop(self):
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu
        return self


def baseline(files: list[pathlib.Path], count: int, size: int) -> Timer:
    """A plain single-threaded PIL loop doing the same work the obvious way (whole-image resize)."""
    rng = np.random.default_rng(0)
    high = transforms.max_short_side(size, 1.25)
    timer = Timer()
    timer.start()
    for i in range(count):
        image = Image.open(files[i % len(files)]).convert("RGB")
        scale = int(rng.integers(size, high + 1)) / min(image.size)
        pixels = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC))
        top = int(rng.integers(0, pixels.shape[0] - size + 1))
        left = int(rng.integers(0, pixels.shape[1] - size + 1))
        pixels = pixels[top:top + size, left:left + size]
        np.ascontiguousarray(pixels[:, ::-1] if rng.random() < 0.5 else pixels)
    return timer.stop()


def run_pipeline(root: pathlib.Path, size: int, batches: int, *, read_threads: int, num_workers: int) -> Timer:
    """The training iterator, timed after 2 warm-up batches (worker start-up excluded)."""
    data = DataSpec(source="folder", folder=str(root), train_split="train", eval_split="train", image_size=size,
                    train_crop="short_side", max_resize_ratio=1.25, flip=True, num_workers=num_workers,
                    read_threads=read_threads, prefetch_buffer=2, tfds_name="", tfds_data_dir="")
    iterator = pipeline.train_iterator(data, global_batch=BATCH, seed=0, process_index=0, process_count=1)
    for _ in range(2):
        next(iterator)
    timer = Timer()
    timer.start()
    for _ in range(batches):
        batch = next(iterator)
    timer.stop()
    assert batch["image"].shape == (BATCH, size, size, 3)
    iterator.close()
    return timer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_files", type=int, default=256, help="JPEGs in the generated folder")
    parser.add_argument("--batches", type=int, default=12,
                        help="timed batches of 32 per pipeline setting (after 2 warm-up batches)")
    parser.add_argument("--image_size", type=int, default=256, help="crop size S")
    parser.add_argument("--step_rate", type=float, default=180.0,
                        help="images/s one accelerator consumes (target train step speed)")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    size, count = args.image_size, args.batches * BATCH
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        mean_kb = write_folder(root, args.num_files)
        files = sorted(root.glob("train/*/*.JPEG"))
        baseline(files, 16, size)  # warm the page cache and PIL
        rows = [("baseline: plain PIL loop, 1 thread", baseline(files, count, size))]
        for name, threads, workers in [("grain, in-process, 1 decode thread", 1, 0),
                                       (f"grain, in-process, {cores} decode threads", cores, 0),
                                       (f"grain, {cores} worker processes x 1 thread", 1, cores)]:
            rows.append((name, run_pipeline(root, size, args.batches, read_threads=threads, num_workers=workers)))

    base = count / rows[0][1].cpu
    print(f"\n{len(files)} JPEGs, mean {mean_kb:.0f} KB, ~500x375; random crop to {size} + flip; batch {BATCH}; "
          f"{cores} CPU cores\n")
    print("| setting | images/s (wall) | CPU cores busy | images/s per core | vs baseline per core |")
    print("|---|---|---|---|---|")
    for name, timer in rows:
        per_core = count / timer.cpu
        print(f"| {name} | {count / timer.wall:.1f} | {timer.cpu / timer.wall:.2f} | {per_core:.1f} | "
              f"{per_core / base:.2f} |")
    per_core = max(count / timer.cpu for _, timer in rows[1:])
    print(f"\nOne accelerator at {args.step_rate:.0f} img/s needs {args.step_rate / per_core:.1f} cores "
          f"at the pipeline's best {per_core:.1f} images/s per core.")


if __name__ == "__main__":
    main()
