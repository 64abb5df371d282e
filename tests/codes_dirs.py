"""Codes directories written directly (array_record shards + manifest.json), for the reader and GPT tests."""

from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from fvq_jax.data import codes


def write_codes_dir(directory, grids: np.ndarray, labels, *, codebook_size: int, num_classes: int,
                    shard_size: int = 4, tokenizer: dict | None = None, class_names=None) -> str:
    """A finished codes directory: image i has codes grids[i] ([A, h, w]) and label labels[i]; shards of
    `shard_size` images dealt to processes 0 and 1 alternately; `tokenizer` is the manifest's record of the
    tokenizer that made them (path, step, weights; the GPT trainer decodes its sample grids with it)."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    grids = np.asarray(grids, np.int32)
    shards = []
    for s, start in enumerate(range(0, len(grids), shard_size)):
        end = min(start + shard_size, len(grids))
        name = codes.shard_stem(s % 2, s) + ".array_record"
        writer = array_record_module.ArrayRecordWriter(os.path.join(directory, name), codes.WRITER_OPTIONS)
        for i in range(start, end):
            writer.write(codes.encode_record(int(labels[i]), i, grids[i]))
        writer.close()
        shards.append({"file": name, "process": s % 2, "shard": s, "first": start, "end": end, "images": end - start})
    manifest = {"format": codes.MANIFEST_FORMAT, "version": codes.MANIFEST_VERSION, "status": "complete",
                "record": {"grids_per_image": grids.shape[1], "grid": list(grids.shape[2:])},
                "tokenizer": dict(tokenizer or {}, codebook_size=codebook_size), "num_classes": num_classes,
                "class_names": list(class_names) if class_names is not None else None,
                "num_images": len(grids), "num_shards": len(shards), "shards": shards}
    with open(os.path.join(directory, codes.MANIFEST), "w") as f:
        json.dump(manifest, f)
    return directory
