"""Codes directories written directly (the codes format's ShardWriter + a manifest), for the reader and GPT tests."""

from __future__ import annotations

import os

import numpy as np

from fvq_jax.data import codes


def write_codes_dir(directory, grids: np.ndarray, labels, *, codebook_size: int, num_classes: int,
                    shard_size: int = 4, tokenizer: dict | None = None, class_names=None) -> str:
    """A finished codes directory: image i has codes grids[i] ([A, h, w]) and label labels[i]; shards of
    `shard_size` images dealt to processes 0 and 1 alternately; `tokenizer` is the manifest's record of the
    tokenizer that made them (path, step, weights; the GPT trainer decodes its sample grids with it)."""
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    grids = np.asarray(grids, np.int32)
    shards = codes.plan_shards(len(grids), shard_size)
    for process in (0, 1):
        writer = codes.ShardWriter(directory, process, shards[process::2], settings={})
        for shard in shards[process::2]:
            for i in range(shard.start, shard.end):
                writer.add(i, int(labels[i]), grids[i])
        writer.close()
    entries, _, _ = codes.gather_shards(directory, shards)
    manifest = {"format": codes.MANIFEST_FORMAT, "version": codes.MANIFEST_VERSION, "status": "complete",
                "record": {"grids_per_image": grids.shape[1], "grid": list(grids.shape[2:])},
                "tokenizer": dict(tokenizer or {}, codebook_size=codebook_size), "num_classes": num_classes,
                "class_names": list(class_names) if class_names is not None else None,
                "num_images": len(grids), "num_shards": len(shards), "shards": entries}
    codes.write_json(os.path.join(directory, codes.MANIFEST), manifest)
    return directory
