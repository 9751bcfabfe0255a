"""The cache format, version 1 (docs/design.md §4): the only place its columns and layout are defined.

A cache is a directory holding `manifest.json` (written last) and Arrow IPC shards named
`shard-r{rank:03d}-{index:05d}.arrow`; while a dump runs, per-shard sidecars, per-rank reports and
the dump's run record live in `_parts/`. Every on-disk name and column is defined here and nowhere
else; the writer (`kdcache.writer`), the reader (`kdcache.reader`), the row codec
(`kdcache.encoding`) and the dump job import them.
"""

from __future__ import annotations

import re

import pyarrow as pa

from kdcache.errors import CacheError

FORMAT = "kdcache"
FORMAT_VERSION = 1

MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"
RUN_FILE = "dump-config.json"        # in PARTS_DIR: the settings a resumed dump must match
SHARD_PATTERN = re.compile(r"^shard-r(\d{3,})-(\d{5,})\.arrow$")

# --- columns (one row per sample)
SAMPLE_ID = "sample_id"
INPUT_IDS = "input_ids"
RESPONSE_ROWS = "response_rows"
VISUAL_START = "visual_start"
VISUAL_LEN = "visual_len"
IMAGE = "image"
IMAGE_SHA256 = "image_sha256"
RESPONSE_TOPK_IDS = "response_topk_ids"
RESPONSE_TOPK_LOGPROBS = "response_topk_logprobs"
VISUAL_TOPK_IDS = "visual_topk_ids"
VISUAL_TOPK_LOGPROBS = "visual_topk_logprobs"
RELATION = "relation"
RELATION_NORM = "relation_norm"

COLUMNS = (SAMPLE_ID, INPUT_IDS, RESPONSE_ROWS, VISUAL_START, VISUAL_LEN, IMAGE, IMAGE_SHA256,
           RESPONSE_TOPK_IDS, RESPONSE_TOPK_LOGPROBS, VISUAL_TOPK_IDS, VISUAL_TOPK_LOGPROBS,
           RELATION, RELATION_NORM)
NULLABLE = frozenset({IMAGE, IMAGE_SHA256, RELATION, RELATION_NORM})
ROLES = ("response", "visual")
# role -> (ids column, logprobs column); each has one (K,) entry per row of that role
TOPK_COLUMNS = {"response": (RESPONSE_TOPK_IDS, RESPONSE_TOPK_LOGPROBS),
                "visual": (VISUAL_TOPK_IDS, VISUAL_TOPK_LOGPROBS)}

SHARD_ENTRY_KEYS = ("path", "num_samples", "num_bytes", "sha256")
REQUIRED_MANIFEST_KEYS = ("format", "format_version", "topk", "num_samples", "shards")


def shard_schema(k_response: int, k_visual: int) -> pa.Schema:
    """The Arrow schema of every shard of a cache with these top-k sizes (docs/design.md §4, exactly)."""
    for name, k in (("k_response", k_response), ("k_visual", k_visual)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{name} must be a positive int, got {k!r}")
    types = {
        SAMPLE_ID: pa.string(),
        INPUT_IDS: pa.list_(pa.int32()),
        RESPONSE_ROWS: pa.list_(pa.int32()),
        VISUAL_START: pa.int32(),
        VISUAL_LEN: pa.int32(),
        IMAGE: pa.binary(),
        IMAGE_SHA256: pa.binary(32),
        RESPONSE_TOPK_IDS: pa.list_(pa.list_(pa.int32(), k_response)),
        RESPONSE_TOPK_LOGPROBS: pa.list_(pa.list_(pa.float16(), k_response)),
        VISUAL_TOPK_IDS: pa.list_(pa.list_(pa.int32(), k_visual)),
        VISUAL_TOPK_LOGPROBS: pa.list_(pa.list_(pa.float16(), k_visual)),
        RELATION: pa.list_(pa.float16()),
        RELATION_NORM: pa.float32(),
    }
    fields = [pa.field(name, types[name], nullable=name in NULLABLE) for name in COLUMNS]
    return pa.schema(fields, metadata={"kdcache.format": FORMAT, "kdcache.format_version": str(FORMAT_VERSION)})


def relation_size(visual_len: int) -> int:
    """Number of stored relation values: the upper triangle of an (L, L) matrix, diagonal included,
    L (L + 1) / 2 (`kdcache.targets.pack_upper`'s layout)."""
    return visual_len * (visual_len + 1) // 2


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:05d}.arrow"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, index) of a finished shard's file name, None for any other name."""
    match = SHARD_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def manifest_faults(manifest: object, source: str) -> list[str]:
    """Everything wrong with a manifest's format, version and required keys; empty when usable.

    The version is checked before the other keys: a newer format may have renamed them, and the
    useful message then is "upgrade", not "missing key".
    """
    if not isinstance(manifest, dict):
        return [f"{source}: manifest is not a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"{source}: not a kdcache cache (format is {manifest.get('format')!r}, expected {FORMAT!r})"]
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return [f"{source}: cache format_version {version!r} is not a valid version "
                f"(this kdcache reads {FORMAT_VERSION})"]
    if version > FORMAT_VERSION:
        return [f"{source}: cache format_version {version} is newer than this kdcache understands "
                f"({FORMAT_VERSION}); upgrade kdcache"]
    faults = [f"{source}: manifest lacks required key {key!r}" for key in REQUIRED_MANIFEST_KEYS if key not in manifest]
    topk = manifest.get("topk")
    if "topk" in manifest and not (isinstance(topk, dict) and all(_positive_int(topk.get(r)) for r in ROLES)):
        faults.append(f"{source}: manifest 'topk' must map 'response' and 'visual' to positive ints, got {topk!r}")
    if "num_samples" in manifest and not _count(manifest["num_samples"]):
        faults.append(f"{source}: manifest 'num_samples' must be a non-negative int, got {manifest['num_samples']!r}")
    shards = manifest.get("shards")
    if "shards" in manifest and not isinstance(shards, list):
        faults.append(f"{source}: manifest 'shards' must be a list, got {type(shards).__name__}")
    for i, entry in enumerate(shards if isinstance(shards, list) else []):
        faults += _shard_entry_faults(entry, f"{source}: manifest shards[{i}]")
    return faults


def check_manifest(manifest: object, source: str) -> None:
    """Raise CacheError naming every fault of `manifest_faults`."""
    faults = manifest_faults(manifest, source)
    if faults:
        raise CacheError("; ".join(faults))


def _shard_entry_faults(entry: object, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where} is not an object"]
    faults = [f"{where} lacks key {key!r}" for key in SHARD_ENTRY_KEYS if key not in entry]
    if "path" in entry and not isinstance(entry["path"], str):
        faults.append(f"{where} 'path' must be a string, got {entry['path']!r}")
    for key in ("num_samples", "num_bytes"):
        if key in entry and not _count(entry[key]):
            faults.append(f"{where} {key!r} must be a non-negative int, got {entry[key]!r}")
    sha = entry.get("sha256")
    if "sha256" in entry and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        faults.append(f"{where} 'sha256' must be 64 lowercase hex digits, got {sha!r}")
    return faults


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_int(value: object) -> bool:
    return _count(value) and value > 0
