"""Files written whole or not at all, and their checksums: the one implementation of each.

`write_atomically` writes through a temporary name beside the target and renames it into place, so a reader (or a
rerun after a kill or a full disk) finds the old file or the new one, never a part. `sha256` reads a file in
blocks; hashlib releases the GIL, so several may run on threads.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import BinaryIO, Callable

from etils import epath

_BLOCK = 1 << 20


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> epath.Path:
    """write(file) into `.NAME.<pid>-<random>.tmp` beside `path`, then renamed to `path`; the temporary file is
    removed if `write` fails. Makes the parent folder."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with temporary.open("wb") as f:
            write(f)
        temporary.replace(path)
    finally:
        if temporary.exists():
            temporary.unlink()
    return path


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at `path`, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
