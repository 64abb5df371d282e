"""A reference's Inception features, computed once and kept beside the reference for every later score.

An entry is one `.npz` (`feature_stats.save_image_set`): the pool features float32 [N, 2048], the labels,
the FID statistics (mu, sigma: the covariance of 50,000 features is what takes time to recompute) and
`key`, the JSON of everything that changes the features (what the reference is and which of its images,
crop, resolution, the reconstructing tokenizer, the Inception weights' SHA-256; scoring.py builds it).
The file name carries a digest of the key, so another setting is another entry. An entry is used only when
it reads back whole and its stored key equals the one asked for; anything else (a truncated or foreign
file, a digest collision) is reported, computed again and replaced. Entries are written under a temporary
name and renamed into place (`atomic_savez`), so a killed score never leaves half an entry; an entry that
cannot be written (a read-only dataset) costs a warning, not the score.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Callable

import jax
from absl import logging
from etils import epath

from fvq_jax.evaluation.feature_stats import ImageSet, load_image_set, save_image_set

CACHE_ENV = "FVQ_CACHE"  # the user cache (as the tokenizer evaluation's statistics): ~/.cache/fvq_jax by default
OFF = "none"  # reference.cache_dir value that turns the cache off


def user_cache() -> epath.Path:
    """$FVQ_CACHE (default ~/.cache/fvq_jax)/reference_features: for references that have no place of their own."""
    return epath.Path(os.environ.get(CACHE_ENV, "~/.cache/fvq_jax")).expanduser() / "reference_features"


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def entry_path(directory: epath.Path, stem: str, key: dict) -> epath.Path:
    """<directory>/<stem>-<16 hex digits of the key's SHA-256>.npz"""
    return directory / f"{stem}-{key_digest(key)[:16]}.npz"


def read(path: epath.Path, key: dict) -> ImageSet | None:
    """The entry at `path` if it holds the features for `key`; None (with the reason logged) otherwise."""
    if not path.exists():
        print(f"reference features: no cache entry {path}", flush=True)
        return None
    try:
        image_set, extra = load_image_set(path)
        stored = json.loads(str(extra["key"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logging.warning("reference features: cache entry %s cannot be read (%s: %s); computing them again",
                        path, type(error).__name__, error)
        return None
    if json.dumps(stored, sort_keys=True) != json.dumps(key, sort_keys=True):
        logging.warning("reference features: cache entry %s was made for another key (%s); computing them again",
                        path, json.dumps(stored, sort_keys=True))
        return None
    print(f"reference features: cache hit {path} ({image_set.count} images; key {json.dumps(key, sort_keys=True)})",
          flush=True)
    return image_set


def write(path: epath.Path, key: dict, image_set: ImageSet) -> None:
    """Store the entry (process 0); a failure to write is logged and otherwise ignored."""
    if jax.process_index() != 0:
        return
    try:
        save_image_set(path, image_set, key=json.dumps(key, sort_keys=True))
    except OSError as error:
        logging.warning("reference features: could not write the cache entry %s (%s); set reference.cache_dir "
                        "to a writable folder to keep them", path, error)
        return
    print(f"reference features: cached in {path}", flush=True)


def cached(directory: epath.Path | None, stem: str, key: dict, compute: Callable[[], ImageSet]) -> ImageSet:
    """The features for `key` from `directory`'s cache entry, or compute() and store them there (None: no cache)."""
    if directory is None:
        return compute()
    path = entry_path(directory, stem, key)
    image_set = read(path, key)
    if image_set is None:
        image_set = compute()
        write(path, key, image_set)
    return image_set
