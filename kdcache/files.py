"""Bytes on disk: atomic JSON writes and sha256 of files and streams.

Every file kdcache writes for others to read (manifest, shard sidecars, rank reports, the dump's
run record, a checkpoint's `kdcache.json`) goes through `write_json_atomic`; every checksum of a
shard, a dataset or a download goes through `sha256_stream`. No torch, no pyarrow here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO

BLOCK = 1 << 20      # read size for hashing


def write_json_atomic(path: str | Path, obj, *, indent: int | None = 2) -> None:
    """Write JSON to `path` through a temporary file, fsync and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` through a temporary file, fsync and a rename (see `write_json_atomic`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_stream(f: BinaryIO) -> tuple[int, str]:
    """(bytes read, sha256 hex) of an open binary stream, read to its end in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    while block := f.read(BLOCK):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()


def sha256_file(path: str | Path, *, sync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file; with `sync`, also flushed to disk (before a rename makes it visible)."""
    with open(path, "rb") as f:
        result = sha256_stream(f)
        if sync:
            os.fsync(f.fileno())
    return result
