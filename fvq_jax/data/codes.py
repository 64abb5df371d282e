"""Token codes of a dataset, extracted once by a tokenizer: the format, its writer, and the reader the GPT trains on.

A codes directory (written by `python -m fvq_jax.main --config=configs/extract_codes.py`, the task in
fvq_jax/extraction/, through `ShardWriter` below) holds
  manifest.json                     what was extracted from what, how, and where (MANIFEST_VERSION);
  shard-PPPPP-SSSSS.array_record    shard SSSSS (source images [S * shard_size, (S + 1) * shard_size)),
                                    written by process PPPPP: one record per image that decoded, in
                                    source order (array_record, group_size 1: random access);
  shard-PPPPP-SSSSS.json            its sidecar: images written, unreadable images skipped, label counts,
                                    the settings it was made with, and the shard file's size and SHA-256.
A record is little-endian int32 [2 + A * h * w]: the label, the image's index in its source, then its A
code grids [A, h, w] in C order; A (`grids_per_image`) and h x w (`grid`) are in the manifest's
`record` entry. int32 because K reaches 262,144.

Writing (`ShardWriter`): a shard goes to shard-....array_record.tmp; when its last image has passed, the file
is closed and hashed, its sidecar written, and the file renamed: a shard is finished when its .array_record
file exists beside its sidecar, and `shard_problems` says whether it still holds what was written (size,
SHA-256). The manifest's shard entries repeat each sidecar's size and checksum (version 2; version 1
directories, written before, have none and are read without that check, with a warning).

Reading. `open_codes(dir)` checks the manifest against the shards (every file present, of the size and SHA-256
recorded when it was written, with the record count the manifest says) and returns a `CodeDataset`, a
random-access source over all shards in manifest order: item i = {"codes": int32 [A, h * w] (row-major grids),
"label": int32, "index": int32}. Verifying reads every byte once, hashed on up to 8 threads (SHA-256: about
1.7 GB/s on one idle core of the development VM; 420-550 MB/s measured there while shared,
fvq_jax/benchmarks/extraction.py), so ImageNet's ten-crop codes (1.28M records of 10 x 256 codes, 13.1 GB) take
about half a minute per host there, and about their read time from disk on a many-core host; a progress line
reports longer checks. A record that cannot be read later (a file changed after the check) raises naming its
shard and its record there.

`train_iterator(dataset, ...)` is the GPT's input stream, built like fvq_jax.data.pipeline's:
  dataset -> seed -> shuffle (a new order every epoch) -> repeat -> random_map(one of the A grids)
  -> ProcessShare (this process's columns of every global batch) -> batch -> prefetch.
Grain keys each element's randomness on the seed and the element's position in the global stream, so
the grid an image contributes at a position depends on (seed, position) only, every image appears once
per epoch, and the global batches are the same for any number of processes. The iterator's
get_state / set_state resume it exactly (save it with Orbax as grain.checkpoint.CheckpointSave).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import glob
import json
import math
import os
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module

from fvq_jax import files
from fvq_jax.data.pipeline import ProcessShare, local_batch_size, prefetch, process_slot
from fvq_jax.progress import Progress

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fvq_jax codes"
MANIFEST_VERSION = 2  # 2: every shard entry carries its file's size and SHA-256
READABLE_VERSIONS = (1, 2)
HEADER = ("label", "index")  # the int32s before the codes in every record
RECORD_DTYPE = np.dtype("<i4")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: each read decodes one record only
SHARD_SUFFIX = ".array_record"


def encode_record(label: int, index: int, codes: np.ndarray) -> bytes:
    """One image's record: codes [A, h, w] -> bytes (see the module docstring)."""
    return np.concatenate([np.array([label, index], RECORD_DTYPE), codes.astype(RECORD_DTYPE).ravel()]).tobytes()


def decode_record(data: bytes, grids: int, tokens: int) -> dict[str, Any]:
    """bytes -> {"codes": int32 [grids, tokens], "label": int32, "index": int32}; ValueError on a wrong length."""
    values = np.frombuffer(data, RECORD_DTYPE)
    if values.size != len(HEADER) + grids * tokens:
        raise ValueError(f"a record of {len(data)} bytes; this layout has {4 * (len(HEADER) + grids * tokens)} "
                         f"({len(HEADER)} + {grids} x {tokens} int32)")
    return {"codes": values[len(HEADER):].reshape(grids, tokens).astype(np.int32), "label": np.int32(values[0]),
            "index": np.int32(values[1])}


def shard_stem(process: int, shard: int) -> str:
    return f"shard-{process:05d}-{shard:05d}"


# ----------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first source image
    end: int  # one past the last


def plan_shards(num_images: int, shard_size: int) -> list[Shard]:
    """The shards of the first `num_images` source images, `shard_size` images each (the last one fewer)."""
    return [Shard(s, s * shard_size, min((s + 1) * shard_size, num_images))
            for s in range(math.ceil(num_images / shard_size))]


def sidecar_path(path: str) -> str:
    """The sidecar JSON of the shard file `path`."""
    return path[:-len(SHARD_SUFFIX)] + ".json"


def read_sidecar(path: str) -> dict[str, Any]:
    with open(sidecar_path(path)) as f:
        return json.load(f)


def write_json(path: str, content: dict) -> None:
    """Replace `path` in one rename: readers never see half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(content, f, indent=1)
    os.replace(path + ".tmp", path)


def finished_file(directory: str, shard: int) -> str | None:
    """The finished file of shard `shard` (whichever process wrote it: one with a sidecar), or None."""
    found = sorted(glob.glob(os.path.join(directory, f"shard-*-{shard:05d}{SHARD_SUFFIX}")))
    found = [f for f in found if os.path.exists(sidecar_path(f))]
    return found[0] if found else None


def _size_problem(path: str, record: dict[str, Any]) -> str | None:
    if "sha256" not in record:
        return "it was written without a checksum (a codes directory of format version 1)"
    size = os.path.getsize(path)
    if size != record["bytes"]:
        return f"it is {size:,} bytes, {record['bytes']:,} when it was written (truncated or overwritten)"
    return None


def _hash_all(paths: list[str], what: str) -> list[str]:
    """files.sha256 of every path, on threads (hashlib releases the GIL), with a progress line for long checks."""
    progress = Progress(what, len(paths), unit="shards")
    digests: dict[str, str] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        futures = {pool.submit(files.sha256, path): path for path in paths}
        for future in concurrent.futures.as_completed(futures):
            digests[futures[future]] = future.result()
            progress.update(1)
    return [digests[path] for path in paths]


def shard_problems(paths: list[str], records: list[dict[str, Any]], what: str) -> list[str | None]:
    """For each shard file, what is wrong with it against its record (its sidecar or manifest entry, with the
    `bytes` and `sha256` of the file as written), or None when it holds exactly what was written. Sizes first,
    then the SHA-256 of the rest on several threads; `what` names the check in its progress line."""
    problems = [_size_problem(path, record) for path, record in zip(paths, records)]
    to_hash = [i for i, problem in enumerate(problems) if problem is None]
    for i, digest in zip(to_hash, _hash_all([paths[i] for i in to_hash], what)):
        if digest != records[i]["sha256"]:
            problems[i] = "its SHA-256 differs from the one recorded when it was written (corrupt)"
    return problems


class ShardWriter:
    """Writes this process's images, in source order, to their shards' files: a shard is finished (file closed
    and hashed, sidecar written, file renamed) as soon as its last source image has passed, readable or not.
    `settings` (what decides the codes) goes into every sidecar."""

    def __init__(self, directory: str, process: int, shards: list[Shard], settings: dict[str, Any]):
        self._directory, self._process, self._settings = directory, process, settings
        self._todo = list(reversed(shards))
        self._writer = None
        self._seen = 0

    def _open(self, shard: Shard) -> None:
        for stale in glob.glob(os.path.join(self._directory, f"shard-*-{shard.index:05d}.*")):
            os.remove(stale)  # an earlier session's unfinished, corrupt or truncated file of this shard
        self._path = os.path.join(self._directory, shard_stem(self._process, shard.index) + SHARD_SUFFIX)
        self._writer = array_record_module.ArrayRecordWriter(self._path + ".tmp", WRITER_OPTIONS)
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
            self._writer.write(encode_record(label, index, codes))
            self._images += 1
            self._labels[str(label)] = self._labels.get(str(label), 0) + 1
        self._seen += 1
        if self._seen == shard.end - shard.start:
            self._finish(shard)

    def _finish(self, shard: Shard) -> None:
        self._writer.close()
        written = self._path + ".tmp"
        write_json(sidecar_path(self._path), {
            "file": os.path.basename(self._path), "process": self._process, "shard": shard.index,
            "first": shard.start, "end": shard.end, "images": self._images, "skipped": self._skipped,
            "label_counts": self._labels, "bytes": os.path.getsize(written), "sha256": files.sha256(written),
            "settings": self._settings})
        os.replace(written, self._path)
        self._todo.pop()
        self._writer = None

    def close(self) -> None:
        if self._todo:
            raise AssertionError(f"the stream ended with shards {[s.index for s in self._todo]} unfinished")


ENTRY_FIELDS = ("file", "process", "shard", "first", "end", "images", "bytes", "sha256")


def gather_shards(directory: str, shards: list[Shard]) -> tuple[list[dict], list[str], dict[int, int]]:
    """From the sidecars of the finished ones among `shards` (any process's, any session's): (their manifest
    entries in shard order, the unreadable images they skipped, {label: images} over all of them)."""
    entries, skipped, counts = [], [], {}
    for shard in shards:
        path = finished_file(directory, shard.index)
        if path is None:
            continue
        info = read_sidecar(path)
        entries.append({k: info[k] for k in ENTRY_FIELDS})
        skipped += info["skipped"]
        for label, n in info["label_counts"].items():
            counts[int(label)] = counts.get(int(label), 0) + n
    return entries, skipped, counts


# ----------------------------------------------------------------------------- reading


def read_manifest(directory) -> dict[str, Any]:
    """The manifest of a codes directory; FileNotFoundError / ValueError saying what is wrong."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a codes directory, or its extraction has not "
                                "started (python -m fvq_jax.main --config=configs/extract_codes.py --workdir=DIR)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"{path} is {manifest.get('format')!r} version {manifest.get('version')!r}; this reader "
                         f"reads {MANIFEST_FORMAT!r} versions {list(READABLE_VERSIONS)}")
    return manifest


def _count_records(path: str) -> int:
    """The records in an array_record file; ValueError naming the file when it cannot be read."""
    try:
        reader = array_record_module.ArrayRecordReader(path)
        try:
            return reader.num_records()
        finally:
            reader.close()
    except Exception as error:  # noqa: BLE001 - array_record raises RuntimeError, ValueError, OSError
        reason = str(error).strip() or type(error).__name__
        raise ValueError(f"shard {path} is unreadable (truncated or corrupt: {reason}); delete it and run the "
                         "extraction again to rewrite it") from None


class CodeDataset(Sequence[dict]):
    """Every extracted image of a codes directory, in manifest order (see the module docstring).

    item i: {"codes": int32 [A, h * w], "label": int32, "index": int32 (its position in the image source)}.
    `verify`: check every shard's size and SHA-256 against the manifest first (a version 1 directory has no
    checksums: a warning says so).
    """

    def __init__(self, directory, manifest: dict[str, Any], *, verify: bool = True):
        self.directory = os.fspath(directory)
        self.manifest = manifest
        record = manifest["record"]
        self.grids_per_image = int(record["grids_per_image"])
        self.grid = tuple(int(n) for n in record["grid"])
        self.num_tokens = self.grid[0] * self.grid[1]
        shards = manifest["shards"]
        self._paths = [os.path.join(self.directory, shard["file"]) for shard in shards]
        for path, shard in zip(self._paths, shards):
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing ({MANIFEST} lists it with {shard['images']} images); "
                                        "run the extraction again to rewrite it")
        if verify:
            self._verify(shards)
        instructions = []
        for path, shard in zip(self._paths, shards):
            found = _count_records(path)
            if found != shard["images"]:
                raise ValueError(f"{path} holds {found} records, {MANIFEST} says {shard['images']}: the shard and the "
                                 "manifest come from different extractions; run the extraction again")
            if found:
                instructions.append(f"{path}[0:{found}]")  # counted already: the source need not reopen the file
        total = sum(s["images"] for s in shards)
        if total != manifest["num_images"]:
            raise ValueError(f"the shards of {self.directory} hold {total} images, {MANIFEST} says "
                             f"{manifest['num_images']}")
        if not total:
            raise ValueError(f"{self.directory} holds no images")
        self._starts = np.cumsum([0] + [s["images"] for s in shards]).tolist()  # first item of each shard
        self._source = grain.sources.ArrayRecordDataSource(instructions)

    def _verify(self, shards: list[dict]) -> None:
        if self.manifest["version"] < 2:
            logging.warning("%s is a version 1 codes directory: its shards carry no checksums and cannot be "
                            "verified; run its extraction again (same command and --workdir) to rewrite them with "
                            "checksums", self.directory)
            return
        problems = shard_problems(self._paths, shards, f"verify {self.directory}")
        bad = [f"{path}: {problem}" for path, problem in zip(self._paths, problems) if problem]
        if bad:
            raise ValueError(f"{len(bad)} of the {len(shards)} shards of {self.directory} do not hold "
                             f"what was written: {'; '.join(bad)}; run the extraction again (same command and "
                             "--workdir): it rewrites them")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {self.directory}, which holds {len(self)}")
        try:
            return decode_record(self._source[index], self.grids_per_image, self.num_tokens)
        except Exception as error:  # noqa: BLE001 - array_record raises RuntimeError (corrupt chunk), OSError, ...
            shard = bisect.bisect_right(self._starts, index) - 1
            reason = str(error).strip() or type(error).__name__
            raise ValueError(f"record {index - self._starts[shard]} of shard {self._paths[shard]} (item {index} of "
                             f"{self.directory}) is unreadable: {reason}") from None

    @property
    def codebook_size(self) -> int:
        return int(self.manifest["tokenizer"]["codebook_size"])

    @property
    def num_classes(self) -> int:
        """Label values are in [0, num_classes) (the GPT's class embedding size, before its null class)."""
        return int(self.manifest["num_classes"])

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Label -> name (folder names, TFDS label names, the photos' names), or None when the source has none."""
        names = self.manifest.get("class_names")
        return None if names is None else tuple(names)


def open_codes(directory, *, verify: bool = True) -> CodeDataset:
    """The finished codes directory `directory` as a CodeDataset; FileNotFoundError / ValueError naming what is
    missing or inconsistent (no manifest, an unfinished extraction, a missing, truncated, corrupt or mismatched
    shard). `verify=False` skips the size and SHA-256 check of every shard (record counts are still checked)."""
    manifest = read_manifest(directory)
    if manifest.get("status") != "complete":
        raise ValueError(f"the extraction in {directory} is unfinished ({len(manifest.get('shards', []))} of "
                         f"{manifest.get('num_shards')} shards listed): run it again to finish it")
    return CodeDataset(directory, manifest, verify=verify)


@dataclasses.dataclass(frozen=True)
class PickGrid(grain.transforms.RandomMap):
    """{"codes": [A, N], "label", ...} -> {"codes": one of the A grids [N], "label"}, drawn from the element's rng."""

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        codes = element["codes"]
        return {"codes": codes[rng.integers(len(codes))], "label": element["label"]}


def train_iterator(dataset: CodeDataset, *, global_batch: int, seed: int, process_index: int | None = None,
                   process_count: int | None = None, num_workers: int = 0, read_threads: int = 4,
                   prefetch_buffer: int = 2) -> grain.DatasetIterator:
    """This process's endless batches {"codes": int32 [B, h * w], "label": int32 [B]}, B = global_batch / process
    count (see the module docstring). Restore a saved state only into an iterator built with the same dataset,
    global_batch, seed, process count and num_workers (the state's layout depends on num_workers).
    """
    index, count = process_slot(process_index, process_count)
    batch = local_batch_size(global_batch, count, "train.global_batch")
    stream = grain.MapDataset.source(dataset).seed(seed).shuffle().repeat().random_map(PickGrid())
    share = ProcessShare(stream, index, count, batch)
    batches = share.to_iter_dataset(grain.ReadOptions(num_threads=read_threads)).batch(batch, drop_remainder=True)
    return iter(prefetch(batches, num_workers, prefetch_buffer))
