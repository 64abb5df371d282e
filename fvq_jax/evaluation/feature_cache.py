"""Inception features computed once and kept for every later score: a reference's beside the reference, the
samples' beside the samples.

An entry is one `.npz` (`feature_stats.save_image_set`): the pool features float32 [N, 2048], the labels and
logits when known, the FID statistics (mu, sigma: the covariance of 50,000 features takes a while to
recompute) and `key`, the JSON of everything that changes the features (for a reference: what it is and
which of its images, crop, resolution, the reconstructing tokenizer, the Inception weights' SHA-256; for
samples: their files' names, sizes and modification times and the weights; scoring.py builds both). A
reference's entry name carries a digest of its key (`entry_path`), so another setting is another entry. An
entry is used only when it reads back whole and its stored key equals the one asked for; anything else (a
truncated or foreign file, samples written again since) is reported, computed again and replaced. Entries are
written under a temporary name and renamed into place (`atomic_savez`), so a killed score never leaves half an
entry; an entry that cannot be written (a read-only dataset) costs a warning, not the score.
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
OFF = "none"  # reference.cache_dir value that turns the reference cache off


def user_cache() -> epath.Path:
    """$FVQ_CACHE (default ~/.cache/fvq_jax)/reference_features: for references that have no place of their own."""
    return epath.Path(os.environ.get(CACHE_ENV, "~/.cache/fvq_jax")).expanduser() / "reference_features"


def key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def entry_path(directory: epath.Path, stem: str, key: dict) -> epath.Path:
    """<directory>/<stem>-<16 hex digits of the key's SHA-256>.npz"""
    return directory / f"{stem}-{hashlib.sha256(key_text(key).encode()).hexdigest()[:16]}.npz"


def read(path: epath.Path, key: dict, what: str) -> ImageSet | None:
    """The entry at `path` if it holds the features for `key`; None (with the reason logged) otherwise."""
    if not path.exists():
        print(f"{what}: no cache entry {path}", flush=True)
        return None
    try:
        image_set, extra = load_image_set(path)
        stored = json.loads(str(extra["key"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logging.warning("%s: cache entry %s cannot be read (%s: %s); computing them again",
                        what, path, type(error).__name__, error)
        return None
    if key_text(stored) != key_text(key):
        logging.warning("%s: cache entry %s was made for another key (%s); computing them again",
                        what, path, key_text(stored))
        return None
    print(f"{what}: cache hit {path} ({image_set.count} images; key {key_text(key)})", flush=True)
    return image_set


def write(path: epath.Path, key: dict, image_set: ImageSet, what: str) -> None:
    """Store the entry (process 0); a failure to write is logged and otherwise ignored."""
    if jax.process_index() != 0:
        return
    try:
        save_image_set(path, image_set, key=key_text(key))
    except OSError as error:
        logging.warning("%s: could not write the cache entry %s (%s); set reference.cache_dir to a writable "
                        "folder to keep them", what, path, error)
        return
    print(f"{what}: cached in {path}", flush=True)


def cached(path: epath.Path | None, key: dict, compute: Callable[[], ImageSet], *, what: str) -> ImageSet:
    """The features for `key` from the entry at `path`, or compute() and store them there (None: no cache)."""
    if path is None:
        return compute()
    image_set = read(path, key, what)
    if image_set is None:
        image_set = compute()
        write(path, key, image_set, what)
    return image_set
