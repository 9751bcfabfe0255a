"""Hostile caches: tampered shards whose sha256 was recomputed, so that they pass the checksum checks.

Nothing read from a cache may crash kdcache or reach torch unchecked: each case below rewrites one
value of one shard (a valid Arrow file, resealed in the manifest) or of the manifest, and the
reader, `verify_cache` and `kdcache verify` must refuse it in one line naming the shard, the sample
and the column. The cache is tests/hostile_cache_cases.py's; the byte-flip fuzz of its shards is in
test_hostile_fuzz.py.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from kdcache import schema
from kdcache.cli import app
from kdcache.encoding import DecodedBatch
from kdcache.records import record_batch
from kdcache.errors import CacheError
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.writer import COMPRESSION

from hostile_cache_cases import (IMAGE_TOKEN, K_R, K_V, L, MAX_LENGTH, SHARD_0, SHARD_1, START, T, VOCAB,
                                 pristine_cache, read_manifest, reseal, write_manifest)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return pristine_cache(tmp_path_factory)


@pytest.fixture
def cache(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine cache, to tamper with."""
    return Path(shutil.copytree(pristine, tmp_path / "cache"))


# --- tampering: rewrite a valid Arrow file, reseal the manifest


def tamper(cache: Path, shard: str, sample_id: str, change) -> None:
    """Rewrite `shard` with `change(row)` applied to sample `sample_id` (a row dict as the reader returns
    it), same schema, batches and compression; then reseal the manifest."""
    path = cache / shard
    with pa.OSFile(str(path), "rb") as source:
        shard_file = pa.ipc.open_file(source)
        file_schema = shard_file.schema
        batches = [shard_file.get_batch(b) for b in range(shard_file.num_record_batches)]
    rewritten = []
    for batch in batches:
        decoded = DecodedBatch(batch, str(path))
        rows = [decoded.sample(r) for r in range(batch.num_rows)]
        for row in rows:
            if row["sample_id"] == sample_id:
                change(row)
        rewritten.append(record_batch(rows, file_schema))
    tmp = path.with_suffix(".rewrite")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, file_schema, options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as writer:
            for batch in rewritten:
                writer.write_batch(batch)
    os.replace(tmp, path)
    reseal(cache)


def setter(column: str, value):
    def change(row):
        row[column] = value
    return change


def at(column: str, index, value):
    def change(row):
        row[column][index] = value
    return change


def image_sample_made_text_only(row):          # visual_len 0, targets and image dropped, image tokens kept
    row.update(visual_start=0, visual_len=0, visual_topk_ids=row["visual_topk_ids"][:0],
               visual_topk_logprobs=row["visual_topk_logprobs"][:0], relation=None, relation_norm=None)


def image_dropped_tokens_kept(row):
    image_sample_made_text_only(row)
    row.update(image=None, image_sha256=None)


def shorter_visual_span(row):                  # a consistent sample of 5 visual rows (the teacher has 6)
    row["input_ids"][START + L - 1] = 7
    row.update(visual_len=L - 1, visual_topk_ids=row["visual_topk_ids"][:-1],
               visual_topk_logprobs=row["visual_topk_logprobs"][:-1],
               relation=row["relation"][:schema.relation_size(L - 1)])


def repeated_topk_id(row):
    row["response_topk_ids"][1, 3] = row["response_topk_ids"][1, 0]


def swapped_response_rows(row):
    row["response_rows"][[0, 1]] = row["response_rows"][[1, 0]]


def repeated_response_row(row):
    row["response_rows"][1] = row["response_rows"][0]


def longer_than_max_length(row):
    row["input_ids"] = np.concatenate([row["input_ids"], np.full(MAX_LENGTH, 5, np.int32)])


def swapped_image(row):
    row["image"] = bytes(reversed(row["image"]))


# (case, sample to tamper, change, the column the refusal must name)
ROW_CASES = [
    ("nan_response_logprob", "s0", at("response_topk_logprobs", (0, 0), np.nan), "response_topk_logprobs"),
    ("inf_visual_logprob", "s0", at("visual_topk_logprobs", (1, 2), np.inf), "visual_topk_logprobs"),
    ("positive_logprob", "s1", at("response_topk_logprobs", (2, 1), 0.5), "response_topk_logprobs"),
    ("nan_relation_entry", "s0", at("relation", 3, np.nan), "relation"),
    ("inf_relation_norm", "s0", setter("relation_norm", math.inf), "relation_norm"),
    ("negative_relation_norm", "s0", setter("relation_norm", -2.0), "relation_norm"),
    ("relation_of_wrong_length", "s0", lambda row: row.update(relation=row["relation"][:-1]), "relation"),
    ("relation_missing_on_image_sample", "s0", lambda row: row.update(relation=None, relation_norm=None),
     "relation"),
    ("topk_id_beyond_vocabulary", "s0", at("response_topk_ids", (0, 0), VOCAB), "response_topk_ids"),
    ("negative_topk_id", "s0", at("visual_topk_ids", (0, 0), -1), "visual_topk_ids"),
    ("repeated_topk_id_in_a_row", "s1", repeated_topk_id, "response_topk_ids"),
    ("input_id_beyond_vocabulary", "s1", at("input_ids", 20, 5000), "input_ids"),
    ("negative_input_id", "s0", at("input_ids", 20, -3), "input_ids"),
    ("image_token_removed", "s0", at("input_ids", START + 1, 5), "input_ids"),
    ("image_token_outside_the_span", "s0", at("input_ids", 25, IMAGE_TOKEN), "input_ids"),
    ("image_token_in_text_only_sample", "s1", at("input_ids", 3, IMAGE_TOKEN), "input_ids"),
    ("visual_start_shifted_onto_text", "s0", setter("visual_start", START + 3), "input_ids"),
    ("negative_visual_start", "s0", setter("visual_start", -1), "visual_start"),
    ("visual_span_past_the_sequence", "s0", setter("visual_start", T - 2), "visual_len"),
    ("visual_len_zero_on_image_sample", "s0", image_sample_made_text_only, "image_sha256"),
    ("image_dropped_but_image_tokens_kept", "s0", image_dropped_tokens_kept, "input_ids"),
    ("visual_len_other_than_the_teachers", "s0", shorter_visual_span, "visual_len"),
    ("unsorted_response_rows", "s0", swapped_response_rows, "response_rows"),
    ("repeated_response_row", "s1", repeated_response_row, "response_rows"),
    ("response_row_predicting_past_the_end", "s0", at("response_rows", -1, T - 1), "response_rows"),
    ("sequence_longer_than_max_length", "s1", longer_than_max_length, "input_ids"),
    ("image_bytes_swapped", "s0", swapped_image, "image"),
    ("image_missing_in_an_embedded_cache", "s0", setter("image", None), "image"),
    ("image_on_text_only_sample", "s1", setter("image", b"not an image"), "image"),
]


def assert_names(message: str, cache: Path, shard: str, sample_id: str, column: str) -> None:
    assert "\n" not in message
    assert f"{cache}/{shard}" in message and f"sample {sample_id!r}" in message and column in message, message


# --- the row cases


def test_the_pristine_cache_reads_back_for_training_and_verifies(cache):
    reader = CacheReader(cache, verify=True, for_training=True)
    assert [reader.read_sample(i)["sample_id"] for i in range(len(reader))] == ["s0", "s1", "s2", "s3"]
    assert verify_cache(cache) == [] and verify_cache(cache, quick=True) == []
    result = CliRunner().invoke(app, ["verify", str(cache)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case, sample_id, change, column", ROW_CASES, ids=[case[0] for case in ROW_CASES])
def test_a_tampered_row_is_refused_by_the_reader_verify_and_the_cli_naming_shard_sample_and_column(
        cache, case, sample_id, change, column):
    tamper(cache, SHARD_0, sample_id, change)
    assert verify_cache(cache, quick=True) == []            # checksums, schema, ids and counts all agree

    reader = CacheReader(cache, verify=True, for_training=True)
    with pytest.raises(CacheError) as caught:
        reader.read_sample(["s0", "s1"].index(sample_id))
    assert_names(str(caught.value), cache, SHARD_0, sample_id, column)
    assert reader.read_sample(2)["sample_id"] == "s2"        # the other shard is untouched

    faults = verify_cache(cache)
    assert len(faults) == 1, faults
    assert_names(faults[0], cache, SHARD_0, sample_id, column)

    result = CliRunner().invoke(app, ["verify", str(cache)])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"FAULT: {faults[0]}"]
    assert CliRunner().invoke(app, ["verify", "--quick", str(cache)]).exit_code == 0


def test_a_sample_id_repeated_within_a_shard_is_refused_when_the_shard_is_opened(cache):
    tamper(cache, SHARD_0, "s1", setter("sample_id", "s0"))
    reader = CacheReader(cache, verify=True)
    with pytest.raises(CacheError) as caught:
        reader.read_sample(1)
    assert_names(str(caught.value), cache, SHARD_0, "s0", "sample_id")
    assert "appears 2 times" in str(caught.value)
    faults = verify_cache(cache, quick=True)
    assert faults == [str(caught.value)] and verify_cache(cache) == faults


def test_an_empty_sample_id_is_refused(cache):
    tamper(cache, SHARD_0, "s1", setter("sample_id", ""))
    with pytest.raises(CacheError, match=f"{SHARD_0}: column 'sample_id' holds an empty id"):
        CacheReader(cache, verify=True).read_sample(0)


def test_a_sample_id_in_two_shards_is_a_verify_fault_naming_both(cache):
    tamper(cache, SHARD_1, "s2", setter("sample_id", "s0"))
    faults = verify_cache(cache, quick=True)
    assert len(faults) == 1
    assert_names(faults[0], cache, SHARD_1, "s0", "sample_id")
    assert SHARD_0 in faults[0].split("also appears in")[1]


def corrupt_id_offset(cache: Path) -> None:
    """Shard 0 rewritten uncompressed (a reader accepts any compression), then the last offset of its
    sample_id column patched to point a gigabyte past the ids' data; resealed."""
    path = cache / SHARD_0
    with pa.OSFile(str(path), "rb") as source:
        shard_file = pa.ipc.open_file(source)
        file_schema, batch = shard_file.schema, shard_file.get_batch(0)
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, file_schema) as writer:
            writer.write_batch(batch)
    data = path.read_bytes()
    offsets = np.array([0, 2, 4], np.int32).tobytes()          # ids "s0", "s1"
    assert data.count(offsets) == 1
    patched = data.replace(offsets, np.array([0, 2, 1 << 30], np.int32).tobytes())
    path.write_bytes(patched)
    reseal(cache)


def test_a_corrupt_offset_in_the_sample_id_column_is_a_cache_error_not_a_crash(cache):
    """The id pass that runs whenever a shard is opened used to read ids without validating them (exit 139)."""
    corrupt_id_offset(cache)
    code = ("import sys; from kdcache.reader import CacheReader; from kdcache.errors import CacheError\n"
            "try:\n    CacheReader(sys.argv[1], verify=True).read_sample(0)\n"
            "except CacheError as e:\n    print(e)\n    sys.exit(3)")
    child = subprocess.run([sys.executable, "-c", code, str(cache)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 3, (child.returncode, child.stderr[-2000:])
    assert child.stdout.count("\n") == 1 and f"{cache}/{SHARD_0}" in child.stdout and "sample_id" in child.stdout
    faults = verify_cache(cache)
    assert len(faults) == 1 and f"{cache}/{SHARD_0}" in faults[0]


# --- the manifest cases


def test_a_manifest_listing_one_shard_twice_is_refused(cache):
    manifest = read_manifest(cache)
    manifest["shards"].append(dict(manifest["shards"][0]))
    manifest["num_samples"] += manifest["shards"][0]["num_samples"]
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match=rf"shards\[2\] 'path' '{SHARD_0}' is listed twice"):
        CacheReader(cache)
    assert any("listed twice" in fault for fault in verify_cache(cache))


def test_two_shard_paths_naming_one_file_are_refused(cache):
    os.symlink(cache / SHARD_0, cache / "alias.arrow")
    manifest = read_manifest(cache)
    manifest["shards"][1] = dict(manifest["shards"][0], path="alias.arrow")
    manifest["num_samples"] = 4
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match="name the same file"):
        CacheReader(cache)
    assert any("name the same file" in fault for fault in verify_cache(cache))


def test_a_sample_count_the_shard_bytes_cannot_hold_is_refused_before_anything_is_allocated(cache):
    manifest = read_manifest(cache)
    manifest["shards"][0]["num_samples"] = 10 ** 12
    manifest["num_samples"] = 10 ** 12 + 2
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match=r"claims 1000000000000 samples in \d+ bytes"):
        CacheReader(cache, verify=True)
    faults = verify_cache(cache)
    assert len(faults) == 1 and "claims 1000000000000 samples" in faults[0]


def test_a_sample_count_backed_by_a_false_byte_count_is_refused_without_verification_too(cache):
    manifest = read_manifest(cache)
    manifest["shards"][0].update(num_samples=10 ** 12, num_bytes=10 ** 14)
    manifest["num_samples"] = 10 ** 12 + 2
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match=f"{SHARD_0}: shard is \\d+ bytes, the manifest says {10 ** 14}"):
        CacheReader(cache)                    # a stat per local shard, no hashing
    with pytest.raises(CacheError, match="the manifest says"):
        CacheReader(cache, verify=True)


@pytest.mark.parametrize("manifest_text", ["[" * 100_000 + "]" * 100_000, '{"format": "kdcache", "format_version": 1e999}',
                                           '{"format": "kdcache", "format_version": 1, "topk": {"response": 2147483648, '
                                           '"visual": 3}, "num_samples": 0, "shards": []}'])
def test_a_pathological_manifest_is_a_one_line_cache_error(cache, manifest_text):
    (cache / schema.MANIFEST_NAME).write_text(manifest_text)
    with pytest.raises(CacheError) as caught:
        CacheReader(cache)
    assert "\n" not in str(caught.value)
    assert len(verify_cache(cache)) == 1
    result = CliRunner().invoke(app, ["inspect", str(cache)])
    assert result.exit_code == 1 and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("temperature", [0, -1, float("nan"), float("inf"), "1.0", None])
def test_manifest_temperatures_must_be_finite_and_positive(cache, temperature):
    manifest = read_manifest(cache)
    manifest["temperature"]["visual"] = temperature
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match="manifest 'temperature' must be") as caught:
        CacheReader(cache)
    assert "\n" not in str(caught.value)
    assert "temperature" in verify_cache(cache)[0]


@pytest.mark.parametrize("key", schema.TRAINING_MANIFEST_KEYS)
def test_training_refuses_a_manifest_without_what_it_reads_in_one_line(cache, key):
    manifest = read_manifest(cache)
    del manifest[key]
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match=f"lacks required key '{key}'"):
        CacheReader(cache, verify=True, for_training=True)
    reader = CacheReader(cache, verify=True)          # reading without training is fine, but no KeyError
    with pytest.raises(CacheError, match=f"manifest lacks key '{key}'"):
        reader.manifest[key]


@pytest.mark.parametrize("key, value", [
    ("vocab_size", "1000"), ("vocab_size", 0), ("tokenizer", "sha256:abc"), ("tokenizer", {"class": "X"}),
    ("teacher", "big-teacher"), ("image_token_id", VOCAB), ("visual_len", -6), ("max_length", 1.5),
    ("relation", "yes"), ("topk", {"response": K_R, "visual": "3"}), ("stats", {"bytes_per_sample": "big"}),
    ("skipped", ["s9"]), ("dataset", {"source": 3}), ("tokenizer_size", "1000"),
])
def test_inspect_and_verify_report_a_wrongly_typed_manifest_key_in_one_line(cache, key, value):
    manifest = read_manifest(cache)
    manifest[key] = value
    write_manifest(cache, manifest)
    result = CliRunner().invoke(app, ["inspect", str(cache)])
    assert result.exit_code == 1 and not isinstance(result.exception, (KeyError, ValueError, AttributeError))
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and repr(key) in lines[0], result.stderr
    faults = verify_cache(cache)
    assert len(faults) == 1 and repr(key) in faults[0]
    with pytest.raises(CacheError):
        CacheReader(cache)


def test_topk_larger_than_the_vocabulary_is_refused(cache):
    manifest = read_manifest(cache)
    manifest["vocab_size"] = K_V
    manifest["image_token_id"] = manifest["pad_token_id"] = manifest["eos_token_id"] = 0
    write_manifest(cache, manifest)
    with pytest.raises(CacheError, match=f"'topk' response is {K_R}, more than vocab_size {K_V}"):
        CacheReader(cache)


def test_a_padded_head_admits_topk_ids_past_the_tokenizer_but_not_such_input_ids(cache):
    """vocab_size (the teacher's head rows) bounds top-k ids; tokenizer_size, where recorded, bounds input ids."""
    write_manifest(cache, {**read_manifest(cache), "vocab_size": VOCAB + 64, "tokenizer_size": VOCAB})
    tamper(cache, SHARD_0, "s0", at("response_topk_ids", (0, 0), VOCAB + 10))
    assert CacheReader(cache, verify=True, for_training=True).read_sample(0)["response_topk_ids"][0, 0] == VOCAB + 10
    assert verify_cache(cache) == []
    tamper(cache, SHARD_0, "s1", at("input_ids", 20, VOCAB + 10))
    with pytest.raises(CacheError, match=rf"sample 's1': input_ids holds ids outside \[0, {VOCAB}\) "
                                         r"\(the manifest's tokenizer_size\)"):
        CacheReader(cache, verify=True, for_training=True).read_sample(1)


def test_a_tokenizer_larger_than_the_teachers_head_is_refused(cache):
    write_manifest(cache, {**read_manifest(cache), "tokenizer_size": VOCAB + 1})
    with pytest.raises(CacheError, match=f"'tokenizer_size' is {VOCAB + 1}, more than vocab_size {VOCAB}"):
        CacheReader(cache)
