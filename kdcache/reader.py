"""Cache reader: the training side of the cache (docs/design.md §4, §8).

`CacheReader` gives random access to the samples of a finished cache, local or behind an fsspec
URL (`kdcache verify` and `kdcache inspect`, which examine a cache whole, are `kdcache/audit.py`). A cache from elsewhere is untrusted input: the manifest is checked as a whole first
(`schema.manifest_faults`), shard paths must stay inside the cache and be listed once, shards must
match the schema and hold unique sample ids, checksums are verified on request, every row is
checked against the format and the manifest (`encoding.DecodedBatch`, `encoding.RowLimits`) before
it is handed out, and nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kdcache import schema
from kdcache.encoding import ARROW_MESSAGE_CHARS as _CHARS, READ_ERRORS, DecodedBatch, RowLimits
from kdcache.errors import CacheError, one_line
from kdcache.files import sha256_stream
from kdcache.remote import MAX_MANIFEST_BYTES, Remote, RemoteConfig, RemoteMissing, is_url
from kdcache.shardcache import ShardCache


class CacheLocation:
    """A cache directory: a local path (or file:// URL), or any other fsspec URL (`kdcache.remote.Remote`:
    storage options, timeouts, retries, one-line network errors)."""

    def __init__(self, cache, remote: RemoteConfig | None = None):
        self.name = os.fspath(cache)
        self.remote = Remote(self.name, remote) if is_url(self.name) else None
        self.root = self.name.removeprefix("file://")

    def path(self, relative: str) -> str:
        return os.path.join(self.root, relative) if self.remote is None else self.remote.path(relative)

    def where(self, relative: str) -> str:
        """How errors name a file of the cache."""
        return f"{self.name.rstrip('/')}/{relative}"

    def exists(self, relative: str) -> bool:
        return os.path.exists(self.path(relative)) if self.remote is None else self.remote.exists(relative)

    def size(self, relative: str) -> int:
        return os.path.getsize(self.path(relative)) if self.remote is None else self.remote.size(relative)

    def read(self, relative: str, *, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """A small file of the cache (manifest, sidecar); FileNotFoundError / RemoteMissing when absent."""
        if self.remote is not None:
            return self.remote.read(relative, limit=limit)
        with open(self.path(relative), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise CacheError(f"{self.where(relative)}: more than the {limit} bytes a manifest may have")
        return data

    def arrow_source(self, relative: str):
        """A local shard as a memory map (pages are read on demand); remote shards come from a `ShardCache`."""
        return pa.memory_map(self.path(relative), "r")

    def path_fault(self, relative: object) -> str | None:
        """Why a manifest's shard path is unsafe, or None: it must be relative, stay inside the cache,
        and (locally) not resolve outside it through a symlink."""
        if not isinstance(relative, str) or not relative:
            return f"{self.name}: shard path {relative!r} is not a non-empty string"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in relative):
            return f"{self.name}: shard path {relative!r} holds control characters"
        if relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative) or "://" in relative:
            return f"{self.name}: shard path {relative!r} is absolute; shard paths must be relative to the cache"
        if "\\" in relative or any(part in ("", ".", "..") for part in relative.split("/")):
            return f"{self.name}: shard path {relative!r} escapes or is not normalised within the cache directory"
        if self.remote is None:
            root = os.path.realpath(self.root)
            if os.path.commonpath([root, os.path.realpath(self.path(relative))]) != root:
                return f"{self.name}: shard path {relative!r} resolves outside the cache directory (symlink)"
        return None

    def resolved(self, relative: str) -> str:
        """The file a shard path names (locally through symlinks), to tell two entries naming one file."""
        return os.path.realpath(self.path(relative)) if self.remote is None else self.path(relative)

    def bytes_fault(self, entry: dict) -> str | None:
        """Presence, size, then sha256 of a shard against its manifest entry; None when all match."""
        where = self.where(entry["path"])
        if not self.exists(entry["path"]):
            return f"{where}: shard is missing"
        size = self.size(entry["path"])
        if size != entry["num_bytes"]:
            return f"{where}: shard is {size} bytes, the manifest says {entry['num_bytes']}"
        with open(self.path(entry["path"]), "rb") as f:        # local: remote shards are checked as fetched
            _, sha256 = sha256_stream(f)
        if sha256 != entry["sha256"]:
            return f"{where}: sha256 {sha256} does not match the manifest's {entry['sha256']} (corrupt shard)"
        return None


def load_manifest(location: CacheLocation) -> dict:
    """The parsed manifest.json, unchecked; CacheError if it is missing or not JSON."""
    return read_manifest(location)[0]


def read_manifest(location: CacheLocation) -> tuple[dict, str]:
    """(the parsed manifest.json, unchecked; its identity "sha256:<hex>" of its bytes).

    A missing manifest is a CacheError saying the cache is unfinished; an unreachable server is the
    network's one-line RemoteError, never "no manifest".
    """
    where = location.where(schema.MANIFEST_NAME)
    try:
        data = location.read(schema.MANIFEST_NAME)
    except (FileNotFoundError, RemoteMissing):
        raise CacheError(f"{location.name}: no {schema.MANIFEST_NAME}; not a finished kdcache cache "
                         "(a dump that is still running or was killed has none yet: rerun it to finish)") from None
    except IsADirectoryError as e:
        raise CacheError(f"{where}: unreadable manifest ({e.strerror})") from None
    except OSError as e:
        raise CacheError(f"{where}: unreadable manifest ({one_line(e, limit=_CHARS)})") from e
    try:
        return json.loads(data), identity_of(data)
    except (ValueError, RecursionError) as e:      # RecursionError: absurdly nested JSON
        raise CacheError(f"{where}: unreadable manifest ({one_line(e, limit=_CHARS)})") from e


def identity_of(manifest_bytes: bytes) -> str:
    """A cache's identity: "sha256:<hex>" of its manifest.json's bytes, wherever the cache lies."""
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def manifest_identity(cache, remote: RemoteConfig | None = None) -> str:
    """The identity of the cache at `cache` (reads only its manifest)."""
    return read_manifest(CacheLocation(cache, remote))[1]


def check_identity(identity: str, expected: str | None, cache: str) -> None:
    """Refuse a cache whose manifest is not the pinned one (`--expect-manifest`)."""
    if expected is not None and identity != expected:
        raise CacheError(f"{cache}: manifest.json has sha256 {identity.removeprefix('sha256:')}, not the "
                         f"{expected.removeprefix('sha256:')} that --expect-manifest pins; this is another cache "
                         "(or an edited one)")


def open_shard(source, where: str, expected: pa.Schema) -> tuple[pa.ipc.RecordBatchFileReader, np.ndarray, pa.ChunkedArray]:
    """Open a shard and read its sample ids: (reader, batch_starts (num_batches + 1,), sample ids).

    Only the sample_id column is decompressed, and each of its batches is fully validated before a
    value is read (a corrupt offset would otherwise read outside the buffer). Refuses (CacheError) a
    shard that Arrow cannot read, another schema, and null, empty or repeated sample ids.
    """
    try:
        reader = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(use_threads=False))
        if not reader.schema.equals(expected, check_metadata=False):
            raise CacheError(f"{where}: shard schema does not match the cache's format ({_schema_diff(expected, reader.schema)})")
        ids_only = pa.ipc.open_file(source, options=pa.ipc.IpcReadOptions(included_fields=[0], use_threads=False))
        if ids_only.num_record_batches != reader.num_record_batches:
            raise CacheError(f"{where}: inconsistent record batch count")
        chunks = []
        for b in range(ids_only.num_record_batches):
            column = ids_only.get_batch(b).column(0)
            try:
                column.validate(full=True)
            except READ_ERRORS as e:
                raise CacheError(f"{where}: record batch {b}: column {schema.SAMPLE_ID!r} is corrupt "
                                 f"({one_line(e, limit=_CHARS)})") from e
            if column.null_count:
                raise CacheError(f"{where}: record batch {b}: column {schema.SAMPLE_ID!r} holds nulls")
            chunks.append(column)
        ids = pa.chunked_array(chunks, pa.string())
        if len(ids) and pc.min(pc.utf8_length(ids)).as_py() == 0:
            raise CacheError(f"{where}: column {schema.SAMPLE_ID!r} holds an empty id")
        if len(ids) and pc.count_distinct(ids).as_py() != len(ids):
            counts = pc.value_counts(ids)
            repeated = counts.filter(pc.greater(counts.field("counts"), 1))[0]
            raise CacheError(f"{where}: sample {repeated['values'].as_py()!r}: {schema.SAMPLE_ID} appears "
                             f"{repeated['counts'].as_py()} times in the shard (ids must be unique in a cache)")
    except CacheError:
        raise
    except READ_ERRORS as e:
        raise CacheError(f"{where}: not a readable Arrow IPC shard ({one_line(e, limit=_CHARS)})") from e
    return reader, np.cumsum([0] + [len(chunk) for chunk in chunks]), ids


def _schema_diff(expected: pa.Schema, found: pa.Schema) -> str:
    """The first difference between two shard schemas, on one line."""
    if found.names != expected.names:
        return f"columns {found.names}, expected {expected.names}"
    for want, got in zip(expected, found):
        if not got.equals(want):
            return (f"column {want.name!r} is {got.type}{'' if got.nullable else ' not null'}, expected "
                    f"{want.type}{'' if want.nullable else ' not null'}")
    return "metadata"


class CacheReader:
    """Random access to the samples of a finished cache.

    `cache` is a local directory or an fsspec URL. Refuses a missing manifest, another format, an
    unknown `format_version`, a malformed manifest (`schema.manifest_faults`; with `for_training=True`
    also one lacking what training reads, `schema.TRAINING_MANIFEST_KEYS`), unsafe or repeated shard
    paths, and shards whose schema or row count disagrees with the manifest or whose sample ids repeat;
    with `verify=True` every shard's size and sha256 are checked first. Every row is checked against
    the format and the manifest's `RowLimits` when its record batch is decoded (`DecodedBatch`).
    `manifest` is a `schema.Manifest`: `manifest[key]` for a key it lacks is a CacheError. Shards are
    opened lazily (a small LRU of `max_open_shards`), so a reader is cheap to construct and to send
    to DataLoader workers: pickling it drops the open shards, and a forked worker opens its own
    (memory maps and decoded batches are never shared between processes).
    """

    def __init__(self, cache, *, verify: bool = False, max_open_shards: int = 4, for_training: bool = False,
                 remote: RemoteConfig | None = None):
        self.remote_config = (remote or RemoteConfig()).remote_config()
        self._location = CacheLocation(cache, self.remote_config)
        self.cache = self._location.name
        manifest, self.identity = read_manifest(self._location)
        check_identity(self.identity, self.remote_config.expected_identity(), self.cache)
        schema.check_manifest(manifest, self.cache, for_training=for_training)
        self.manifest = schema.Manifest(manifest, self.cache)
        self.shards: list[dict] = self.manifest["shards"]
        self._check_shard_paths()
        self.limits = RowLimits.from_manifest(self.manifest)
        self.k_response = self.manifest["topk"]["response"]
        self.k_visual = self.manifest["topk"]["visual"]
        self.schema = schema.manifest_shard_schema(self.manifest)
        self._starts = np.cumsum([0] + [entry["num_samples"] for entry in self.shards])   # (S + 1,)
        if self._starts[-1] != self.manifest["num_samples"]:
            raise CacheError(f"{self.cache}: manifest num_samples {self.manifest['num_samples']} differs from the "
                             f"sum over its shards ({self._starts[-1]})")
        # a cache URL's shards come through the local shard cache, each verified as it arrives
        self.shard_cache = (None if self._location.remote is None else
                            ShardCache(self._location.remote, self.identity, self.remote_config))
        if verify:
            self.verify_shards()
        else:
            self._check_local_sizes()
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _ShardState] = OrderedDict()
        self._pid = os.getpid()

    @property
    def location(self) -> CacheLocation:
        return self._location

    @property
    def starts(self) -> np.ndarray:
        """(S + 1,) the global index of each shard's first sample, then the total."""
        return self._starts

    def _check_shard_paths(self) -> None:
        files: dict[str, str] = {}
        for entry in self.shards:
            fault = self._location.path_fault(entry["path"])
            if fault:
                raise CacheError(fault)
            file = self._location.resolved(entry["path"])
            if file in files:
                raise CacheError(f"{self.cache}: shard paths {files[file]!r} and {entry['path']!r} name the same file")
            files[file] = entry["path"]

    def verify_shards(self) -> None:
        """Every local shard's size and sha256 against the manifest (CacheError on the first fault). A cache
        URL's shards are checked as they arrive in the shard cache, before first use: nothing to do here."""
        if self.shard_cache is not None:
            return
        for entry in self.shards:
            fault = self._location.bytes_fault(entry)
            if fault:
                raise CacheError(fault)

    def _check_local_sizes(self) -> None:
        # a stat per local shard: the byte sizes that bound the sample counts (schema.MIN_SHARD_BYTES_PER_SAMPLE)
        # are the files' own, before a sampler allocates an order over those counts
        if self.shard_cache is not None:
            return
        for entry in self.shards:
            path = self._location.path(entry["path"])
            if os.path.exists(path) and os.path.getsize(path) != entry["num_bytes"]:
                raise CacheError(f"{self._location.where(entry['path'])}: shard is {os.path.getsize(path)} "
                                 f"bytes, the manifest says {entry['num_bytes']}")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()     # memory maps and decoded batches stay in this process
        return state

    def locate(self, index: int) -> tuple[int, int]:
        """(shard index, row within that shard) of global sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a cache of {len(self)} samples")
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        return shard, int(index - self._starts[shard])

    def read_sample(self, index: int) -> dict:
        """One sample as writable numpy arrays (copies), keys as the columns:

        sample_id str; input_ids (T,) int32; response_rows (R,) int32; visual_start, visual_len int;
        image bytes | None; image_sha256 bytes | None; response_topk_ids (R, K_r) int32;
        response_topk_logprobs (R, K_r) float16; visual_topk_ids (L, K_v) int32;
        visual_topk_logprobs (L, K_v) float16; relation (L * (L + 1) / 2,) float16 | None;
        relation_norm float | None.
        """
        shard, row = self.locate(index)
        state = self._shard(shard)
        batch = int(np.searchsorted(state.batch_starts, row, side="right")) - 1
        return state.decoded(batch).sample(row - int(state.batch_starts[batch]))

    def __iter__(self):
        for index in range(len(self)):
            yield self.read_sample(index)

    def close(self) -> None:
        for state in self._open.values():
            state.close()
        self._open.clear()

    def _shard(self, shard: int) -> _ShardState:
        if self._pid != os.getpid():      # a forked DataLoader worker: drop the parent's open shards
            self._open, self._pid = OrderedDict(), os.getpid()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        entry = self.shards[shard]
        where = self._location.where(entry["path"])
        pin = None
        try:
            if self.shard_cache is None:
                source = self._location.arrow_source(entry["path"])
            else:                                        # downloaded and verified once per machine, pinned while open
                path, pin = self.shard_cache.acquire(entry)
                source = pa.memory_map(str(path), "r")
            reader, batch_starts, _ = open_shard(source, where, self.schema)
        except (OSError, pa.ArrowException) as e:
            release_pin(pin)
            raise CacheError(f"{where}: cannot open shard ({one_line(e, limit=_CHARS)})") from e
        except BaseException:
            release_pin(pin)
            raise
        if batch_starts[-1] != entry["num_samples"]:
            release_pin(pin)
            raise CacheError(f"{where}: shard holds {batch_starts[-1]} samples, "
                             f"the manifest says {entry['num_samples']}")
        self._open[shard] = _ShardState(reader, batch_starts, where, self.limits, pin)
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)[1].close()
        return self._open[shard]


def release_pin(pin) -> None:
    if pin is not None:
        pin.release()


class _ShardState:
    """An open shard and its most recently decoded record batch (sequential reads decode each batch once)."""

    def __init__(self, reader: pa.ipc.RecordBatchFileReader, batch_starts: np.ndarray, where: str, limits: RowLimits,
                 pin=None):
        self.reader, self.batch_starts, self.where, self.limits = reader, batch_starts, where, limits
        self.pin = pin                   # a shard-cache shard's shared lock: not evicted while open here
        self._batch: tuple[int, DecodedBatch] | None = None

    def close(self) -> None:
        release_pin(self.pin)
        self.pin = None

    def decoded(self, batch: int) -> DecodedBatch:
        if self._batch is None or self._batch[0] != batch:
            self._batch = (batch, decode_batch(self.reader, batch, self.batch_starts, self.where, self.limits))
        return self._batch[1]


def decode_batch(reader: pa.ipc.RecordBatchFileReader, batch: int, batch_starts: np.ndarray, where: str,
                 limits: RowLimits) -> DecodedBatch:
    """Record batch `batch` of an open shard, decoded and every row checked (CacheError otherwise)."""
    try:
        record_batch = reader.get_batch(batch)
    except READ_ERRORS as e:
        raise CacheError(f"{where}: cannot read record batch {batch} ({one_line(e, limit=_CHARS)})") from e
    decoded = DecodedBatch(record_batch, where, limits, batch_index=batch)
    expected = int(batch_starts[batch + 1] - batch_starts[batch])
    if decoded.num_rows != expected:
        raise CacheError(f"{where}: record batch {batch} holds {decoded.num_rows} rows, its sample ids {expected}")
    return decoded
