"""Sharing caches: `kdcache push CACHE URL` and `kdcache pull URL DIR [--shards N | --samples N]`.

Push uploads the shards first and the seal (`manifest.sha256`) and `manifest.json` last, so a reader
of the URL sees either no cache or a whole one; then it downloads the remote copy once and checks
every shard's sha256 (and the manifest's bytes). A rerun skips shards already there at their size
and refuses a URL that holds another cache. Pull copies a cache into a local directory, each shard
checked against its sha256 before it is renamed into place: the whole cache (its manifest copied
byte for byte, so the copy has the same identity), or the first N shards / samples as a smaller
valid cache whose manifest records its `origin` (URL, manifest sha256, sample count). A rerun
continues where an interrupted pull stopped (`DIR/_pull.json` records what is being pulled).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from kdcache import lock, schema
from kdcache.errors import CacheError, KdcacheError
from kdcache.files import sha256_file, write_json_atomic
from kdcache.reader import CacheLocation, CacheReader, check_identity, identity_of, read_manifest
from kdcache.audit import verify_cache
from kdcache.remote import Remote, RemoteConfig, RemoteMissing
from kdcache.shardcache import download_verified
from kdcache.writer import COMPRESSION, write_manifest, write_sealed_manifest

PULL_RECORD = "_pull.json"      # in a pull's directory until it is complete: what is being pulled


class ByteBar:
    """One tqdm bar over a whole transfer; `callback()` is an fsspec callback for one file of it."""

    def __init__(self, total: int, desc: str):
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None)

    def callback(self):
        from fsspec.callbacks import Callback

        bar = self.bar

        class _Update(Callback):
            def call(self, *args, **kwargs):
                pass

            def relative_update(self, inc=1):
                bar.update(inc)

        return _Update()

    def close(self) -> None:
        self.bar.close()


# --- push


def push_cache(cache, url: str, *, remote: RemoteConfig | None = None, verify: bool = True) -> str:
    """Publish the local cache `cache` at `url`; returns its identity ("sha256:<hex>" of its manifest)."""
    remote = (remote or RemoteConfig()).remote_config()
    local = CacheReader(cache, remote=remote)             # manifest checked, --expect-manifest pin applied
    local.verify_shards()                                  # never publish a corrupt shard
    manifest_bytes = Path(local.location.path(schema.MANIFEST_NAME)).read_bytes()
    if identity_of(manifest_bytes) != local.identity:
        raise CacheError(f"{local.cache}: manifest.json changed while it was being read; push again")
    if "://" not in url or url.startswith("file://"):
        Path(url.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
    target = Remote(url if "://" in url else "file://" + os.path.abspath(url), remote)
    already = _remote_identity(target)
    if already is not None and already != local.identity:
        raise KdcacheError(f"{url} already holds another cache (manifest {already}); push to an empty URL")
    if already is None:
        _upload(local, target)
        digest = local.identity.removeprefix("sha256:")
        target.write(schema.MANIFEST_SEAL_NAME, f"{digest}  {schema.MANIFEST_NAME}\n".encode())
        target.write(schema.MANIFEST_NAME, manifest_bytes)  # last: the cache exists for readers from now on
    if verify:
        _check_copy(url, remote, local)
    return local.identity


def _remote_identity(target: Remote) -> str | None:
    try:
        return read_manifest(CacheLocation(target.url, target.config))[1]
    except CacheError as e:
        if isinstance(e, RemoteMissing) or "no manifest.json" in str(e):
            return None
        raise


def _upload(local: CacheReader, target: Remote) -> None:
    bar = ByteBar(sum(entry["num_bytes"] for entry in local.shards), f"push {target.url}")
    try:
        for entry in local.shards:
            try:
                if target.size(entry["path"]) == entry["num_bytes"]:
                    bar.bar.update(entry["num_bytes"])
                    continue                               # an interrupted push uploaded it already
            except RemoteMissing:
                pass
            target.upload(Path(local.location.path(entry["path"])), entry["path"], bar.callback())
    finally:
        bar.close()


def _check_copy(url: str, remote: RemoteConfig, local: CacheReader) -> None:
    """Download the remote copy once (into a scratch shard cache) and check it against the local manifest."""
    largest = max((entry["num_bytes"] for entry in local.shards), default=0)
    with tempfile.TemporaryDirectory(prefix="kdcache-push-") as scratch:
        scratch_config = dataclasses.replace(remote, cache_dir=scratch, expect_manifest=local.identity,
                                             cache_size_gb=max(2 * largest, 1) / 2**30)
        faults = verify_cache(url, quick=True, remote=scratch_config)
    if faults:
        raise CacheError(f"the copy at {url} does not match {local.cache}: {faults[0]}"
                         + (f" (and {len(faults) - 1} more faults)" if len(faults) > 1 else ""))


# --- pull


def pull_cache(url, directory, *, remote: RemoteConfig | None = None, shards: int | None = None,
               samples: int | None = None) -> dict:
    """Copy the cache at `url` into `directory` (all of it, or its first `shards` shards / `samples` samples);
    returns the written manifest. Resumable: run it again after an interruption."""
    if shards is not None and samples is not None:
        raise KdcacheError("pass at most one of --shards and --samples")
    remote = (remote or RemoteConfig()).remote_config()
    location = CacheLocation(url, remote)
    source, identity = read_manifest(location)
    check_identity(identity, remote.expected_identity(), location.name)
    schema.check_manifest(source, location.name)
    plan = {"origin": location.name, "manifest_sha256": identity, "shards": shards, "samples": samples}
    directory = Path(directory)
    with lock.storage_errors(directory, "DIR"), lock.job_lock(directory, job="pull", flag="DIR"):
        _check_pull_directory(directory, plan)
        entries, cut = _selection(source, shards, samples)
        _fetch_all(location, entries if cut is None else entries[:-1], directory)
        if cut is not None:
            entries[-1] = _truncated_shard(location, entries[-1], cut, directory)
        manifest = _pulled_manifest(location, source, identity, entries, directory)
        (directory / PULL_RECORD).unlink(missing_ok=True)
    return manifest


def _check_pull_directory(directory: Path, plan: dict) -> None:
    """An empty directory, or the leftovers of the same pull (resumed); anything else is refused."""
    record = directory / PULL_RECORD
    if record.is_file():
        try:
            before = json.loads(record.read_text())
        except ValueError:
            before = None
        if before != plan:
            raise KdcacheError(f"{directory} holds an unfinished pull of something else ({record}: {before}); "
                               "finish that one with its own command, or pull into another directory")
    elif lock.entries(directory):
        raise KdcacheError(f"{directory} is not empty; pull into a new or empty directory")
    write_json_atomic(record, plan)


def _selection(manifest: dict, shards: int | None, samples: int | None) -> tuple[list[dict], int | None]:
    """(shard entries to copy, rows to keep of the last one, or None to keep it whole)."""
    entries = [dict(entry) for entry in manifest["shards"]]
    if shards is not None:
        return entries[:shards], None
    if samples is None or samples >= manifest["num_samples"]:
        return entries, None
    chosen, total = [], 0
    for entry in entries:
        chosen.append(entry)
        total += entry["num_samples"]
        if total >= samples:
            keep = entry["num_samples"] - (total - samples)
            return chosen, None if keep == entry["num_samples"] else keep
    return chosen, None


def _fetch_all(location: CacheLocation, entries: list[dict], directory: Path) -> None:
    """Each shard into `directory`, checked; one already there with its sha256 (an earlier run's) is kept."""
    bar = ByteBar(sum(entry["num_bytes"] for entry in entries), f"pull {location.name}")
    try:
        for entry in entries:
            final = _safe_target(location, directory, entry)
            if final.is_file() and sha256_file(final) == (entry["num_bytes"], entry["sha256"]):
                bar.bar.update(entry["num_bytes"])
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            _copy_shard(location, entry, final, bar.callback())
    finally:
        bar.close()


def _safe_target(location: CacheLocation, directory: Path, entry: dict) -> Path:
    fault = location.path_fault(entry["path"])
    if fault:
        raise CacheError(fault)
    return directory / entry["path"]


def _copy_shard(location: CacheLocation, entry: dict, final: Path, callback) -> None:
    source = location.remote or Remote("file://" + os.path.abspath(location.root))
    download_verified(source, entry, final, progress=callback)


def _truncated_shard(location: CacheLocation, entry: dict, rows: int, directory: Path) -> dict:
    """The first `rows` samples of a shard as a shard of their own (same schema and compression); its entry."""
    final = _safe_target(location, directory, entry)
    whole = final.with_name(final.name + ".whole")
    final.parent.mkdir(parents=True, exist_ok=True)
    _copy_shard(location, entry, whole, None)               # checked against the source's sha256
    try:
        with pa.memory_map(str(whole), "r") as source:
            reader = pa.ipc.open_file(source)
            tmp = final.with_name(final.name + ".tmp")
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(
                    sink, reader.schema, options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as out:
                left = rows
                for b in range(reader.num_record_batches):
                    batch = reader.get_batch(b)
                    out.write_batch(batch.slice(0, min(left, batch.num_rows)))
                    left -= min(left, batch.num_rows)
                    if left == 0:
                        break
        size, sha256 = sha256_file(tmp, sync=True)
        os.replace(tmp, final)
    except (OSError, pa.ArrowException) as e:
        raise CacheError(f"{location.where(entry['path'])}: cannot cut to {rows} samples ({e})") from e
    finally:
        whole.unlink(missing_ok=True)
    return {**entry, "num_samples": rows, "num_bytes": size, "sha256": sha256}


def _pulled_manifest(location: CacheLocation, source: dict, identity: str, entries: list[dict],
                     directory: Path) -> dict:
    """The whole cache: its own manifest, byte for byte (the same identity). A part: a manifest of its own."""
    if entries == source["shards"]:
        data = location.read(schema.MANIFEST_NAME)
        if identity_of(data) != identity:
            raise CacheError(f"{location.where(schema.MANIFEST_NAME)}: changed while it was being pulled; pull again")
        write_sealed_manifest(directory, data)
        return source
    total = sum(entry["num_samples"] for entry in entries)
    size = sum(entry["num_bytes"] for entry in entries)
    manifest = {**source, "shards": entries, "num_samples": total,
                "stats": {"num_bytes": size, "bytes_per_sample": size / total if total else None},
                "origin": {"url": location.name, "manifest_sha256": identity, "num_samples": source["num_samples"],
                           "shards": len(source["shards"])}}
    schema.check_manifest(manifest, str(directory))
    write_manifest(directory, manifest)
    return manifest
