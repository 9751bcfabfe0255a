"""Shard writer and manifest merge: the dump's side of the cache (docs/design.md §4, §8).

Each rank writes its own shards `shard-r{rank:03d}-{index:05d}.arrow` (Arrow IPC file format, zstd
level 3, 1-4 samples per record batch). A shard is written under `<name>.tmp`; when it is complete
its sidecar `_parts/<name>.json` (ids, size, sha256, statistics) appears first, then the shard is
renamed into place, so a finished shard always has a sidecar and a killed dump leaves nothing
half-visible. `finalize_cache` merges every rank's sidecars and skip reports into `manifest.json`,
written last, and removes `_parts/`. The reader side (CacheReader, verify_cache, describe_cache)
lives in `kdcache.reader`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa

from kdcache import schema
from kdcache.errors import CacheError, KdcacheError
from kdcache.records import coerce_sample, raw_bytes, record_batch, sample_stats
from kdcache.files import sha256_file, write_bytes_atomic, write_json_atomic

COMPRESSION = pa.Codec("zstd", 3)


class ShardWriter:
    """Writes one rank's samples into shards of about `shard_size_bytes` each.

    Use as a context manager: leaving the block normally finishes the open shard; leaving it by
    an exception discards the open shard (its temporary file is deleted, never renamed). A new
    writer for a rank continues numbering after that rank's finished shards and deletes the rank's
    leftovers of a killed run.

    A record batch closes once it holds `samples_per_batch` samples or `batch_bytes` of raw data,
    whichever comes first: a reader decompresses whole record batches, so LLaVA-scale samples
    (~1 MB: 728 visual rows x k=64 plus the relation) go one per batch and random access decodes
    only the sample it wants, while small text-only samples share a batch.

    `write` takes a dict whose keys are the column names (`kdcache.schema.COLUMNS`); see
    `kdcache.records.coerce_sample` for what each value may be. `codec` is `kdcache dump --codec`:
    "v1" writes format 1, "lossless" / "compact" format 2 (`kdcache.codecs`); every shard of a cache
    has the same one (a partial cache written with another is refused).
    """

    def __init__(self, cache_dir, *, rank: int = 0, k_response: int, k_visual: int,
                 shard_size_bytes: int = 512 << 20, samples_per_batch: int = 4, batch_bytes: int = 512 << 10,
                 codec: str = "v1"):
        if not 1 <= samples_per_batch <= 4:
            raise ValueError(f"samples_per_batch must be 1-4 (the format's record batches), got {samples_per_batch}")
        if shard_size_bytes <= 0:
            raise ValueError(f"shard_size_bytes must be positive, got {shard_size_bytes}")
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.cache_dir = Path(cache_dir)
        self.rank, self.k_response, self.k_visual = rank, k_response, k_visual
        self.shard_size_bytes, self.samples_per_batch = shard_size_bytes, samples_per_batch
        self.batch_bytes = batch_bytes
        self.codec, self.column_codecs = codec, schema.column_codecs(codec)
        self.schema = schema.shard_schema(k_response, k_visual, self.column_codecs)
        (self.cache_dir / schema.PARTS_DIR).mkdir(parents=True, exist_ok=True)
        remove_unfinished(self.cache_dir, rank)
        _check_codec(self.cache_dir, finished_parts(self.cache_dir), codec)
        finished = [index for _, index, _ in finished_parts(self.cache_dir, rank)]
        self._next_index = max(finished) + 1 if finished else 0
        self._pending: list[dict] = []
        self._pending_bytes = 0
        self._shard: _OpenShard | None = None
        self._closed = False
        self.shards_written: list[str] = []   # names of the shards this writer finished

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def write(self, sample: dict) -> None:
        """Validate and buffer one sample; raises SampleError naming the sample if it is malformed."""
        if self._closed:
            raise KdcacheError(f"ShardWriter for rank {self.rank} in {self.cache_dir} is already closed")
        record = coerce_sample(sample, k_response=self.k_response, k_visual=self.k_visual)
        self._pending.append(record)
        self._pending_bytes += raw_bytes(record)
        if len(self._pending) == self.samples_per_batch or self._pending_bytes >= self.batch_bytes:
            self._flush()

    def close(self) -> None:
        """Write the buffered samples and finish the open shard."""
        if self._closed:
            return
        try:
            if self._pending:
                self._flush()
            if self._shard is not None:
                self._finish_shard()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Drop the buffered samples and delete the open shard's temporary file."""
        self._pending = []
        if self._shard is not None:
            self._shard.discard()
            self._shard = None
        self._closed = True

    def _flush(self) -> None:
        if self._shard is None:
            self._shard = _OpenShard(self.cache_dir, self.rank, self._next_index, self.schema, self.column_codecs)
            self._next_index += 1
        self._shard.write(self._pending)
        self._pending, self._pending_bytes = [], 0
        if self._shard.size() >= self.shard_size_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._shard.finish(topk={"response": self.k_response, "visual": self.k_visual}, codec=self.codec)
        self.shards_written.append(self._shard.name)
        self._shard = None


class _OpenShard:
    """A shard being written under its temporary name."""

    def __init__(self, cache_dir: Path, rank: int, index: int, shard_schema: pa.Schema,
                 column_codecs: dict[str, str] | None = None):
        self.rank, self.index = rank, index
        self.name = schema.shard_name(rank, index)
        self.path = cache_dir / self.name
        self.tmp = cache_dir / (self.name + ".tmp")
        self.sidecar = cache_dir / schema.PARTS_DIR / sidecar_name(self.name)
        self.schema, self.column_codecs = shard_schema, column_codecs
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_file(self.sink, shard_schema,
                                      options=pa.ipc.IpcWriteOptions(compression=COMPRESSION))
        self.sample_ids: list[str] = []
        self.stats: dict = {}

    def write(self, records: list[dict]) -> None:
        batch = record_batch(records, self.schema, self.column_codecs)
        self.writer.write_batch(batch)
        self.stats = add_stats(self.stats, {"encoded_bytes": role_bytes(batch)})
        for record in records:
            self.sample_ids.append(record[schema.SAMPLE_ID])
            self.stats = add_stats(self.stats, sample_stats(record))

    def size(self) -> int:
        return self.sink.tell()

    def finish(self, *, topk: dict, codec: str = "v1") -> None:
        self.writer.close()
        self.sink.close()
        num_bytes, sha256 = sha256_file(self.tmp, sync=True)
        write_json_atomic(self.sidecar, {
            "path": self.name, "rank": self.rank, "index": self.index, "topk": topk, "codec": codec,
            "num_samples": len(self.sample_ids), "num_bytes": num_bytes, "sha256": sha256,
            "sample_ids": self.sample_ids, "stats": self.stats,
        })
        os.replace(self.tmp, self.path)   # the shard becomes visible only now, sidecar already in place

    def discard(self) -> None:
        try:
            self.writer.close()
        except (pa.ArrowException, OSError):
            pass
        self.sink.close()
        self.tmp.unlink(missing_ok=True)


# --- the rank-local parts: sidecars, skip reports, resume


def sidecar_name(shard: str) -> str:
    return shard.removesuffix(".arrow") + ".json"


def finished_parts(cache_dir, rank: int | None = None) -> list[tuple[int, int, dict]]:
    """(rank, index, sidecar) of every finished shard (a shard file with its sidecar), by (rank, index)."""
    cache_dir = Path(cache_dir)
    found = []
    for path in (cache_dir / schema.PARTS_DIR).glob("shard-r*.json"):
        parsed = schema.parse_shard_name(path.stem + ".arrow")
        if parsed is None or (rank is not None and parsed[0] != rank):
            continue
        if not (cache_dir / (path.stem + ".arrow")).exists():
            continue                     # killed between the sidecar and the rename: unfinished
        try:
            found.append((*parsed, json.loads(path.read_text())))
        except FileNotFoundError:
            continue                     # removed by its rank's writer while we looked
        except (OSError, ValueError) as e:
            raise CacheError(f"{path}: unreadable shard sidecar ({e})") from e
    return sorted(found, key=lambda part: part[:2])


def _check_codec(cache_dir: Path, parts: list, codec: str | None) -> str:
    """The one codec of a cache's finished shards (a sidecar without one: "v1"), which must be `codec` when
    given; a partial dump is resumed only with the codec it was started with. Returns it (or `codec`)."""
    found = sorted({sidecar.get("codec", "v1") for _, _, sidecar in parts})
    if len(found) > 1 or (found and codec is not None and found[0] != codec):
        raise CacheError(f"{cache_dir}: its finished shards were written with --codec {' and '.join(found)}"
                         + (f", not {codec}" if codec is not None else "")
                         + "; resume a dump with the codec it was started with (or choose another --out)")
    return found[0] if found else codec


def remove_unfinished(cache_dir, rank: int | None = None) -> None:
    """Delete what a killed writer of `rank` (all ranks when None) left: temporary files, a
    sidecar whose shard was never renamed, a shard without sidecar (its samples were never
    recorded as done, so they are dumped again)."""
    cache_dir = Path(cache_dir)
    parts = cache_dir / schema.PARTS_DIR
    prefix = "shard-r" if rank is None else f"shard-r{rank:03d}-"
    for tmp in [*cache_dir.glob(prefix + "*.arrow.tmp"), *parts.glob(prefix + "*.json.tmp")]:
        tmp.unlink(missing_ok=True)
    for shard in cache_dir.glob(prefix + "*.arrow"):
        if schema.parse_shard_name(shard.name) and not (parts / sidecar_name(shard.name)).exists():
            shard.unlink()
    for sidecar in parts.glob(prefix + "*.json"):
        if schema.parse_shard_name(sidecar.stem + ".arrow") and not (cache_dir / (sidecar.stem + ".arrow")).exists():
            sidecar.unlink()


def completed_sample_ids(cache_dir) -> set[str]:
    """Ids of the samples in finished shards of an unfinalised cache, all ranks: what a resumed dump skips."""
    return {sample_id for _, _, sidecar in finished_parts(cache_dir) for sample_id in sidecar["sample_ids"]}


def write_rank_report(cache_dir, rank: int, *, skipped: list[dict], fidelity: dict | None = None) -> None:
    """Record that `rank` finished, with the samples it skipped ([{"sample_id", "reason"}]) and, with
    `kdcache dump --fidelity-sample`, its fidelity sums (`kdcache.fidelity.Fidelity.sums`)."""
    for entry in skipped:
        if not (isinstance(entry, dict) and isinstance(entry.get("sample_id"), str)
                and isinstance(entry.get("reason"), str)):
            raise ValueError(f"skipped entries must be {{'sample_id': str, 'reason': str}}, got {entry!r}")
    entries = [{"sample_id": e["sample_id"], "reason": e["reason"]} for e in skipped]
    report = {"rank": rank, "skipped": entries, **({} if fidelity is None else {"fidelity": fidelity})}
    write_json_atomic(Path(cache_dir) / schema.PARTS_DIR / _report_name(rank), report)


def _report_name(rank: int) -> str:
    return f"rank-{rank:03d}.json"


# --- finalize: every rank's parts -> manifest.json


def finalize_cache(cache_dir, manifest: dict) -> dict:
    """Merge all ranks' sidecars and reports into `manifest` and write `manifest.json`, last.

    Adds `format`, `format_version`, `topk` (checked against the shards), `shards` ordered by
    (rank, index), `num_samples`, `skipped` and `stats`. Every rank in `range(manifest["world_size"])`
    (or, without that key, every rank with shards) must have written its report. Refuses a sample
    id that appears twice. Removes `_parts/` once the manifest is in place. Returns the manifest.
    """
    cache_dir = Path(cache_dir)
    if (cache_dir / schema.MANIFEST_NAME).exists():
        raise CacheError(f"{cache_dir} is already finalized ({schema.MANIFEST_NAME} exists)")
    remove_unfinished(cache_dir)
    parts = finished_parts(cache_dir)
    reports = _rank_reports(cache_dir, parts, manifest.get("world_size"))
    where: dict[str, str] = {}
    for _, _, sidecar in parts:
        for sample_id in sidecar["sample_ids"]:
            if sample_id in where:
                raise CacheError(f"{cache_dir}: sample id {sample_id!r} is in both {where[sample_id]} and "
                                 f"{sidecar['path']}; sample ids must be unique in a cache")
            where[sample_id] = sidecar["path"]
    shards = [{key: sidecar[key] for key in schema.SHARD_ENTRY_KEYS} for _, _, sidecar in parts]
    stats: dict = {}
    for _, _, sidecar in parts:
        stats = add_stats(stats, sidecar["stats"])
    codec = _check_codec(cache_dir, parts, None) or manifest.get("codec", "v1")
    column_codecs = schema.column_codecs(codec)
    merged = {
        **{key: value for key, value in manifest.items() if key not in ("codec", "codecs")},
        "format": schema.FORMAT,
        "format_version": schema.format_version(column_codecs, manifest.get("targets")),
        **({} if column_codecs is None else {"codec": codec, "codecs": column_codecs}),
        "topk": _merged_topk(cache_dir, manifest, parts),
        "num_samples": len(where),
        "shards": shards,
        "skipped": [entry for rank in sorted(reports) for entry in reports[rank]["skipped"]],
        "stats": summary_stats(stats, num_samples=len(where), num_bytes=sum(s["num_bytes"] for s in shards),
                               by_role=column_codecs is not None),
    }
    measured = merged_fidelity([reports[rank].get("fidelity") for rank in sorted(reports)])
    if measured is not None:
        merged["fidelity"] = measured
    schema.check_manifest(merged, str(cache_dir))
    write_manifest(cache_dir, merged)
    shutil.rmtree(cache_dir / schema.PARTS_DIR, ignore_errors=True)
    return merged


def write_manifest(cache_dir, manifest: dict) -> str:
    """Seal, then manifest: `manifest.sha256` (sha256sum's line for the manifest's bytes) and then
    `manifest.json`, each atomically, so a finished cache always has both. Returns the cache's identity
    ("sha256:<hex>" of the manifest's bytes; docs/design.md §13)."""
    return write_sealed_manifest(cache_dir, (json.dumps(manifest, indent=2) + "\n").encode())


def write_sealed_manifest(cache_dir, data: bytes) -> str:
    """`write_manifest` for manifest bytes already made (a pulled mirror keeps its origin's bytes)."""
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(data).hexdigest()
    write_bytes_atomic(cache_dir / schema.MANIFEST_SEAL_NAME, f"{digest}  {schema.MANIFEST_NAME}\n".encode())
    write_bytes_atomic(cache_dir / schema.MANIFEST_NAME, data)
    return "sha256:" + digest


def _rank_reports(cache_dir: Path, parts: list, world_size) -> dict[int, dict]:
    reports = {}
    for path in (cache_dir / schema.PARTS_DIR).glob("rank-*.json"):
        report = json.loads(path.read_text())
        reports[int(report["rank"])] = report
    expected = range(world_size) if isinstance(world_size, int) else sorted({rank for rank, _, _ in parts})
    missing = [rank for rank in expected if rank not in reports]
    if missing:
        raise CacheError(f"{cache_dir}: rank(s) {missing} have not reported ({schema.PARTS_DIR}/"
                         f"{_report_name(missing[0])} missing): their dump did not finish; rerun it to resume")
    return reports


def _merged_topk(cache_dir: Path, manifest: dict, parts: list) -> dict:
    topk = manifest.get("topk")
    for _, _, sidecar in parts:
        if topk is None:
            topk = sidecar["topk"]
        if sidecar["topk"] != topk:
            raise CacheError(f"{cache_dir}: shard {sidecar['path']} was written with top-k {sidecar['topk']} "
                             f"but the cache declares {topk}")
    if topk is None:
        raise CacheError(f"{cache_dir}: no shards and no 'topk' in the manifest; cannot finalize")
    return topk


# --- statistics (sums in the sidecars, means in the manifest)


def add_stats(total: dict, more: dict) -> dict:
    """Sum two statistics dicts of numbers / nested dicts of numbers, key by key."""
    out = dict(total)
    for key, value in more.items():
        out[key] = add_stats(out.get(key, {}), value) if isinstance(value, dict) else out.get(key, 0) + value
    return out


def summary_stats(sums: dict, *, num_samples: int, num_bytes: int, by_role: bool = True) -> dict:
    """Manifest statistics from summed sidecar statistics; means are None where nothing was counted.
    `by_role` False (format 1) leaves out `encoded_bytes`: `--codec v1` writes the manifest of before, byte
    for byte."""
    rows = {role: sums.get("rows", {}).get(role, 0) for role in schema.ROLES}
    tail = sums.get("tail_mass_sum", {})
    tokens = sums.get("tokens", 0)
    return {
        "num_bytes": num_bytes,
        "bytes_per_sample": num_bytes / num_samples if num_samples else None,
        "bytes_per_token": num_bytes / tokens if tokens else None,
        "tokens": tokens,
        "rows": rows,
        "mean_tail_mass": {role: tail.get(role, 0.0) / rows[role] if rows[role] else None for role in schema.ROLES},
        "samples_with_image": sums.get("samples_with_image", 0),
        "samples_with_relation": sums.get("samples_with_relation", 0),
        "image_bytes": sums.get("image_bytes", 0),
        **({"encoded_bytes": {role: sums.get("encoded_bytes", {}).get(role, 0) for role in schema.BYTE_ROLES}}
           if by_role else {}),
    }


def role_bytes(batch: pa.RecordBatch) -> dict[str, int]:
    """A record batch's Arrow column bytes as written (encoded, before the shard's zstd) by `schema.BYTE_ROLES`."""
    return {role: sum(batch.column(name).nbytes for name in columns) for role, columns in schema.BYTE_ROLES.items()}


def merged_fidelity(reports: list[dict]) -> dict | None:
    """The manifest's `fidelity` from every rank's `Fidelity.sums` (None when no rank measured anything)."""
    reports = [r for r in reports if r]
    if not reports:
        return None
    out = {"num_samples": sum(r["num_samples"] for r in reports), "codec": reports[0]["codec"]}
    for role in schema.ROLES:
        rows = sum(r["roles"][role]["rows"] for r in reports)
        maxima = [r["roles"][role]["kl_max"] for r in reports if r["roles"][role]["kl_max"] is not None]
        out[role] = {"kl_mean_nats": sum(r["roles"][role]["kl_sum"] for r in reports) / rows if rows else None,
                     "kl_max_nats": max(maxima) if maxima else None, "rows": rows}
    count = sum(r["relation"]["samples"] for r in reports)
    minima = [r["relation"]["cosine_min"] for r in reports if r["relation"]["cosine_min"] is not None]
    out["relation"] = {"cosine_min": min(minima) if minima else None,
                       "cosine_mean": sum(r["relation"]["cosine_sum"] for r in reports) / count if count else None,
                       "samples": count}
    return out
