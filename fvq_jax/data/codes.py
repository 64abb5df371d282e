"""Token codes of a dataset, extracted once by a tokenizer: the files, and the reader the GPT trainer uses.

A codes directory (written by `python -m fvq_jax.main --config=configs/extract_codes.py`, see
fvq_jax/tools/extract_codes.py) holds
  manifest.json                     what was extracted from what, how, and where (MANIFEST_VERSION);
  shard-PPPPP-SSSSS.array_record    shard SSSSS (source images [S * shard_size, (S + 1) * shard_size)),
                                    written by process PPPPP: one record per image that decoded, in
                                    source order (array_record, group_size 1: random access);
  shard-PPPPP-SSSSS.json            its sidecar: images written, unreadable images skipped, label counts,
                                    the settings it was made with.
A record is little-endian int32 [2 + A * h * w]: the label, the image's index in its source, then its A
code grids [A, h, w] in C order; A (`grids_per_image`) and h x w (`grid`) are in the manifest's
`record` entry. int32 because K reaches 262,144.

`open_codes(dir)` checks the manifest against the shards (every file present, readable, with the
record count the manifest says) and returns a `CodeDataset`, a random-access source over all shards in
manifest order: item i = {"codes": int32 [A, h * w] (row-major grids), "label": int32, "index": int32}.

`train_iterator(dataset, ...)` is the GPT's input stream, built like fvq_jax.data.pipeline's:
  dataset -> seed -> shuffle (a new order every epoch) -> repeat -> random_map(one of the A grids)
  -> ProcessShare (this process's columns of every global batch) -> batch -> prefetch.
Grain keys each element's randomness on the seed and the element's position in the global stream, so
the grid an image contributes at a position depends on (seed, position) only, every image appears once
per epoch, and the global batches are the same for any number of processes. The iterator's
get_state / set_state resume it exactly (save it with Orbax as grain.checkpoint.CheckpointSave).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain
import numpy as np
from array_record.python import array_record_module

from fvq_jax.data.pipeline import ProcessShare, local_batch_size, prefetch, process_slot

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "fvq_jax codes"
MANIFEST_VERSION = 1
HEADER = ("label", "index")  # the int32s before the codes in every record
RECORD_DTYPE = np.dtype("<i4")
WRITER_OPTIONS = "group_size:1"  # one record per chunk: each read decodes one record only


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


def read_manifest(directory) -> dict[str, Any]:
    """The manifest of a codes directory; FileNotFoundError / ValueError saying what is wrong."""
    path = os.path.join(os.fspath(directory), MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {directory}: not a codes directory, or its extraction has not "
                                "started (python -m fvq_jax.main --config=configs/extract_codes.py --workdir=DIR)")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path} is {manifest.get('format')!r} version {manifest.get('version')!r}; this reader "
                         f"reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}")
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
    """

    def __init__(self, directory, manifest: dict[str, Any]):
        self.directory = os.fspath(directory)
        self.manifest = manifest
        record = manifest["record"]
        self.grids_per_image = int(record["grids_per_image"])
        self.grid = tuple(int(n) for n in record["grid"])
        self.num_tokens = self.grid[0] * self.grid[1]
        instructions = []
        for shard in manifest["shards"]:
            path = os.path.join(self.directory, shard["file"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing ({MANIFEST} lists it with {shard['images']} images); "
                                        "run the extraction again to rewrite it")
            found = _count_records(path)
            if found != shard["images"]:
                raise ValueError(f"{path} holds {found} records, {MANIFEST} says {shard['images']}: the shard and the "
                                 "manifest come from different extractions; run the extraction again")
            if found:
                instructions.append(f"{path}[0:{found}]")  # counted already: the source need not reopen the file
        total = sum(s["images"] for s in manifest["shards"])
        if total != manifest["num_images"]:
            raise ValueError(f"the shards of {self.directory} hold {total} images, {MANIFEST} says "
                             f"{manifest['num_images']}")
        if not total:
            raise ValueError(f"{self.directory} holds no images")
        self._source = grain.sources.ArrayRecordDataSource(instructions)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {self.directory}, which holds {len(self)}")
        try:
            return decode_record(self._source[index], self.grids_per_image, self.num_tokens)
        except ValueError as error:
            raise ValueError(f"record {index} of {self.directory}: {error}") from None

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


def open_codes(directory) -> CodeDataset:
    """The finished codes directory `directory` as a CodeDataset; FileNotFoundError / ValueError naming what is
    missing or inconsistent (no manifest, an unfinished extraction, a missing, truncated or mismatched shard)."""
    manifest = read_manifest(directory)
    if manifest.get("status") != "complete":
        raise ValueError(f"the extraction in {directory} is unfinished ({len(manifest.get('shards', []))} of "
                         f"{manifest.get('num_shards')} shards listed): run it again to finish it")
    return CodeDataset(directory, manifest)


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
