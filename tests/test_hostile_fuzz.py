"""A byte-flip fuzz of a cache shard (in a child process, so that a segfault fails the test): every flipped
byte, the manifest resealed, is either read back exactly, read as rows that keep every invariant (checked
here in plain Python, independently of kdcache.encoding), or refused with a one-line CacheError."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdcache import schema
from kdcache.errors import CacheError
from kdcache.reader import CacheReader

from hostile_cache_cases import SHARD_0, pristine_cache, read_manifest, write_manifest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return pristine_cache(tmp_path_factory)


# --- byte-flip fuzz (runs in a child process: a segfault is a non-zero return code, not a dead pytest)


def test_a_byte_flipped_shard_reads_back_exactly_or_as_valid_rows_or_is_refused_and_never_crashes(pristine, tmp_path):
    cache = Path(shutil.copytree(pristine, tmp_path / "cache"))
    size = (cache / SHARD_0).stat().st_size
    flips = size if size <= 8000 else 3000
    child = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import test_hostile_fuzz as t; "
                               "t.fuzz(sys.argv[2], int(sys.argv[3]))",
         str(Path(__file__).parent), str(cache), str(flips)],
        capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, f"fuzz child exited {child.returncode}:\n{child.stdout[-3000:]}\n{child.stderr[-3000:]}"
    stats = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\nbyte-flip fuzz of a {size}-byte shard: {stats}")
    assert stats["flips"] == flips >= 2000
    assert stats["identical"] + stats["refused"] + stats["changed_valid"] == flips
    assert stats["refused"] > 0 and stats["identical"] > 0


def fuzz(cache_dir: str, flips: int, seed: int = 0) -> None:
    """Flip one byte at each of `flips` offsets of shard 0 (every byte when `flips` is its size), reseal
    the manifest, read every row through a verifying reader. Prints one JSON line of counts; exits 1
    on any exception other than CacheError, or on a row handed out that breaks an invariant (checked
    here independently of kdcache.encoding)."""
    cache = Path(cache_dir)
    path = cache / SHARD_0
    original_bytes = path.read_bytes()
    manifest = read_manifest(cache)
    original_rows = list(CacheReader(cache, verify=True))
    rng = np.random.default_rng(seed)
    offsets = (np.arange(len(original_bytes)) if flips >= len(original_bytes)
               else np.sort(rng.choice(len(original_bytes), size=flips, replace=False)))
    masks = rng.integers(1, 256, size=len(offsets))
    counts = {"flips": 0, "identical": 0, "refused": 0, "changed_valid": 0}
    problems = []
    for offset, mask in zip(offsets.tolist(), masks.tolist()):
        data = bytearray(original_bytes)
        data[offset] ^= mask
        tmp = path.with_suffix(".fuzz")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, path)                # a new file: no memory map of the old one sees the change
        manifest["shards"][0]["sha256"] = hashlib.sha256(data).hexdigest()
        write_manifest(cache, manifest)
        counts["flips"] += 1
        try:
            reader = CacheReader(cache, verify=True, for_training=True)
            rows = [reader.read_sample(i) for i in range(len(reader))]
        except CacheError as e:
            counts["refused"] += 1
            if "\n" in str(e):
                problems.append(f"offset {offset}: multi-line CacheError {str(e)!r}")
            continue
        except Exception as e:               # noqa: BLE001 - anything else is the failure we look for
            problems.append(f"offset {offset} ^ {mask:#04x}: {type(e).__name__}: {e}")
            continue
        if len(rows) == len(original_rows) and all(same_row(a, b) for a, b in zip(rows, original_rows)):
            counts["identical"] += 1
            continue
        counts["changed_valid"] += 1         # a valid Arrow file with other, still valid, values
        fault = invariant_fault(rows, manifest)
        if fault:
            problems.append(f"offset {offset} ^ {mask:#04x}: handed out an invalid row: {fault}")
    path.write_bytes(original_bytes)
    print(json.dumps(counts))
    if problems:
        print("\n".join(problems[:50]), file=sys.stderr)
        sys.exit(1)


def same_row(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, np.ndarray):
            if not (isinstance(other, np.ndarray) and value.dtype == other.dtype and value.shape == other.shape
                    and value.tobytes() == other.tobytes()):
                return False
        elif value != other and not (isinstance(value, float) and math.isnan(value) and math.isnan(other)):
            return False
    return True


def invariant_fault(rows: list[dict], manifest: dict) -> str | None:
    """What is wrong with rows a reader handed out, checked row by row in plain Python (None: nothing)."""
    if len({row["sample_id"] for row in rows}) != len(rows):
        return "repeated sample ids"
    vocab, token, visual_len = manifest["vocab_size"], manifest["image_token_id"], manifest["visual_len"]
    for row in rows:
        ids, length = row["input_ids"].tolist(), len(row["input_ids"])
        start, n_visual = row["visual_start"], row["visual_len"]
        checks = {
            "sample_id": isinstance(row["sample_id"], str) and row["sample_id"] != "",
            "length": 0 < length <= manifest["max_length"],
            "input_ids": all(0 <= i < vocab for i in ids),
            "span": n_visual in (0, visual_len) and start >= 0 and start + n_visual <= length
                    and (n_visual > 0 or start == 0),
            "image tokens": [i for i, x in enumerate(ids) if x == token] == list(range(start, start + n_visual)),
            "response_rows": all(0 <= a < b for a, b in zip(row["response_rows"].tolist(),
                                                           row["response_rows"].tolist()[1:] + [length - 1])),
            "rows per role": row["response_topk_ids"].shape[0] == len(row["response_rows"])
                             == row["response_topk_logprobs"].shape[0]
                             and row["visual_topk_ids"].shape[0] == n_visual == row["visual_topk_logprobs"].shape[0],
            "topk ids": all(len(set(r)) == len(r) and all(0 <= i < vocab for i in r)
                            for role in ("response", "visual") for r in row[f"{role}_topk_ids"].tolist()),
            "logprobs": all(not math.isnan(x) and x <= 0 for role in ("response", "visual")
                            for x in row[f"{role}_topk_logprobs"].astype(np.float32).ravel().tolist()),
            "relation": (row["relation"] is None and row["relation_norm"] is None and n_visual == 0)
                        or (row["relation"] is not None and n_visual > 0
                            and len(row["relation"]) == schema.relation_size(n_visual)
                            and all(math.isfinite(x) for x in row["relation"].astype(np.float32).tolist())
                            and math.isfinite(row["relation_norm"]) and row["relation_norm"] >= 0),
            "image": (row["image"] is None and row["image_sha256"] is None and n_visual == 0)
                     or (row["image"] is not None and n_visual > 0
                         and hashlib.sha256(row["image"]).digest() == row["image_sha256"]),
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            return f"sample {row['sample_id']!r}: {failed}"
    return None
