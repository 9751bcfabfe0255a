"""Cache format 2 (issue 10) in caches: every codec's round trip of adversarial samples, the kept version-1
cache, equal losses for `lossless`, `compact` within its documented bounds (tests/codec_bounds.py),
corrupted payloads, manifests. The codecs themselves: test_codec_payloads.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import codec_samples as cs
from codec_bounds import (LOGQ8_HALF_STEP, LOGQ8_RANGE, LOWRANK_COSINE, assert_logq8_within_bound,
                          assert_relation_within_bound, bits, logq8_bound, relation_cosine, renormalised_kl)
from kdcache import codecs, schema, writer
from kdcache.errors import CacheError, KdcacheError
from kdcache.losses import relation_loss, sparse_kl
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.writer import COMPRESSION, ShardWriter, finalize_cache, write_rank_report

KEPT_V1 = Path(__file__).parent / "data" / "cache-v1"   # written by kdcache at 23efb16 (before format 2)
KEPT_V1_PYARROW = "26.0.1"                              # the pyarrow that wrote it: same bytes expected
SHARD = "shard-r000-00000.arrow"
ALL_CODECS = ("v1", "lossless", "compact")
# the codecs of the presets before issue 10's second part: caches written with them exist and must stay readable
EARLIER_PRESETS = {"lossless": {"ids": "shuffle32", "logprobs": "delta16", "relation": "shuffle16"},
                   "compact": {"ids": "shuffle32", "logprobs": "logq8", "relation": "int8col"}}


def write(cache: Path, codec: str, samples=None) -> dict:
    """A cache of `samples` (default: codec_samples') with the preset `codec`; "<preset>@earlier" writes the
    preset as it was before issue 10's second part (shuffle32 ids, int8col relation), as old caches hold it."""
    if codec.endswith("@earlier"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(codecs, "PRESETS", EARLIER_PRESETS)
            return write(cache, codec.removesuffix("@earlier"), samples)
    with ShardWriter(cache, rank=0, k_response=cs.K_R, k_visual=cs.K_V, codec=codec) as shard_writer:
        for sample in samples if samples is not None else cs.samples():
            shard_writer.write(sample)
    write_rank_report(cache, 0, skipped=[])
    return finalize_cache(cache, dict(cs.MANIFEST))


def read_all(cache: Path) -> list[dict]:
    return list(CacheReader(cache, verify=True, for_training=True))


# --- caches of every codec


@pytest.mark.parametrize("codec", ALL_CODECS + ("lossless@earlier", "compact@earlier"))
def test_every_codec_round_trips_adversarial_samples_through_a_cache(tmp_path, codec):
    manifest = write(tmp_path / "cache", codec)
    codec, earlier = codec.removesuffix("@earlier"), codec.endswith("@earlier")
    assert manifest["format_version"] == (1 if codec == "v1" else 2)
    assert ("codecs" in manifest) == (codec != "v1") and manifest.get("codec") == (None if codec == "v1" else codec)
    if codec != "v1":
        presets = EARLIER_PRESETS if earlier else {"lossless": {"ids": "freqdict", "relation": "shuffle16"},
                                                   "compact": {"ids": "freqdict", "relation": "lowrank8"}}
        assert manifest["codecs"]["visual_topk_ids"] == presets[codec]["ids"]
        assert manifest["codecs"]["relation"] == presets[codec]["relation"]
    assert verify_cache(tmp_path / "cache") == []
    with pa.OSFile(str(tmp_path / "cache" / SHARD), "rb") as source:       # a real Arrow file of the format
        assert pa.ipc.open_file(source).schema.equals(schema.manifest_shard_schema(manifest), check_metadata=True)
    for got, sample in zip(read_all(tmp_path / "cache"), cs.samples(), strict=True):
        for column in ("input_ids", "response_rows", "response_topk_ids", "visual_topk_ids"):
            assert np.array_equal(got[column], sample[column]), column     # ids exact, in the written order
        for column in ("response_topk_logprobs", "visual_topk_logprobs"):
            stored = np.asarray(sample[column], np.float16)
            if codec == "compact":
                assert_logq8_within_bound(got[column], stored)
            else:
                assert np.array_equal(bits(got[column]), bits(stored)), column
        if sample["relation"] is None:
            assert got["relation"] is None and got["relation_norm"] is None
        elif codec == "compact":
            assert_relation_within_bound(manifest["codecs"]["relation"], got["relation"],
                                         np.asarray(sample["relation"], np.float16))
        else:
            assert np.array_equal(bits(got["relation"]), bits(sample["relation"]))
        assert got["relation_norm"] == (None if sample["relation_norm"] is None
                                        else float(np.float32(sample["relation_norm"])))


def test_the_kept_version_1_cache_reads_back_unchanged_and_v1_still_writes_its_bytes(tmp_path):
    kept = read_all(KEPT_V1)
    assert json.loads((KEPT_V1 / schema.MANIFEST_NAME).read_text())["format_version"] == 1
    assert verify_cache(KEPT_V1) == []
    for got, sample in zip(kept, cs.samples(), strict=True):
        for column in ("input_ids", "response_topk_ids", "visual_topk_ids"):
            assert np.array_equal(got[column], sample[column])
        for column in ("response_topk_logprobs", "visual_topk_logprobs", "relation"):
            if sample[column] is not None:
                assert np.array_equal(bits(got[column]), bits(sample[column])), column
    write(tmp_path / "v1", "v1")
    assert (tmp_path / "v1" / schema.MANIFEST_NAME).read_bytes() == (KEPT_V1 / schema.MANIFEST_NAME).read_bytes()
    if pa.__version__ == KEPT_V1_PYARROW:        # another Arrow may lay out the same file differently
        assert (tmp_path / "v1" / SHARD).read_bytes() == (KEPT_V1 / SHARD).read_bytes()


def test_lossless_targets_give_the_v1_losses_and_compact_stays_within_its_bounds(tmp_path):
    read = {codec: (write(tmp_path / codec, codec), read_all(tmp_path / codec))[1] for codec in ALL_CODECS}
    student = torch.Generator().manual_seed(0)
    for i, sample in enumerate(read["v1"]):
        for role in ("response", "visual"):
            ids_column, logprobs_column = schema.TOPK_COLUMNS[role]
            logits = torch.randn(len(sample[ids_column]), cs.V, generator=student, dtype=torch.float64)
            losses = {codec: sparse_kl(logits, torch.from_numpy(rows[i][ids_column]).long(),
                                       torch.from_numpy(rows[i][logprobs_column].astype(np.float32)).double())
                      for codec, rows in read.items()}
            assert torch.allclose(losses["lossless"], losses["v1"], rtol=1e-6, atol=0)
            kl = renormalised_kl(read["compact"][i][logprobs_column], sample[logprobs_column])
            assert (kl <= compact_kl_bound(sample[logprobs_column])).all()
        if sample["relation"] is not None:
            student_relation = torch.randn(1, cs.L, cs.L, generator=student, dtype=torch.float64)
            student_relation = student_relation @ student_relation.transpose(1, 2)
            teacher = {codec: torch.from_numpy(read[codec][i]["relation"].astype(np.float64))[None]
                       for codec in ALL_CODECS}
            v1, lossless, compact = (relation_loss(student_relation, teacher[codec]) for codec in ALL_CODECS)
            assert torch.allclose(lossless, v1, rtol=1e-6, atol=0)
            # 1 - cos: moved by at most |unit(R read) - unit(R)| = sqrt(2 (1 - cosine)) (+ float16 rounding)
            assert abs(float(compact - v1)) <= np.sqrt(2 * (1 - LOWRANK_COSINE)) + 1e-3


def compact_kl_bound(stored: np.ndarray) -> np.ndarray:
    """Per row: a tilt of the distribution by log-ratios within [-a, a] moves it by KL <= (2a)^2 / 8; a is the
    largest `logq8_bound` of the row (rows whose entries all lie within logq8's 15.875 nats of the largest)."""
    x = stored.astype(np.float64)
    x = x[np.isfinite(x).any(axis=1)]
    finite = np.where(np.isfinite(x), x, np.nan)
    top = np.nanmax(finite, axis=1)
    a = np.nanmax(logq8_bound(finite, top[:, None]), axis=1)
    inside = np.nanmin(finite, axis=1) >= top - LOGQ8_RANGE
    return np.where(inside, a ** 2 / 2, np.inf)     # past the floor: bounded by probability instead (above)


# --- corrupted payloads and manifests


def rewrite_payload(cache: Path, column: str, sample_id: str, change) -> None:
    """Rewrite the shard with `change(payload bytes)` for one sample's `column`, same schema and compression,
    then recompute its sha256 in the manifest and reseal it: only decoding can catch what changed."""
    path = cache / SHARD
    with pa.OSFile(str(path), "rb") as source:
        shard = pa.ipc.open_file(source)
        batches = [shard.get_batch(b) for b in range(shard.num_record_batches)]
        file_schema = shard.schema
    rewritten = []
    for batch in batches:
        ids = batch.column(schema.SAMPLE_ID).to_pylist()
        payloads = batch.column(column).to_pylist()
        payloads = [change(p) if sample == sample_id else p for sample, p in zip(ids, payloads)]
        arrays = [pa.array(payloads, pa.binary()) if name == column else batch.column(name) for name in schema.COLUMNS]
        rewritten.append(pa.RecordBatch.from_arrays(arrays, schema=file_schema))
    with pa.OSFile(str(path), "wb") as sink:
        with pa.ipc.new_file(sink, file_schema, options=pa.ipc.IpcWriteOptions(compression=COMPRESSION)) as out:
            for batch in rewritten:
                out.write_batch(batch)
    manifest = json.loads((cache / schema.MANIFEST_NAME).read_text())
    data = path.read_bytes()
    manifest["shards"][0].update(num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    writer.write_manifest(cache, manifest)


def flip_sign_of_first_logprob(payload: bytes) -> bytes:     # delta16: the first entry's high byte plane
    data = bytearray(payload)
    data[len(data) // 2] ^= 0x80
    return bytes(data)


def first_lowrank_weight(value: float):
    """lowrank8: replace the first column weight (after the 8-byte header)."""
    return lambda p: p[:8] + np.array([value], np.float32).tobytes() + p[12:]


def all_indices_zero(payload: bytes) -> bytes:
    """freqdict: every entry the dictionary's first id (adv-01: 5 response rows of 8, uint16 indices)."""
    return payload[:-5 * cs.K_R * 2] + b"\0" * (5 * cs.K_R * 2)


@pytest.mark.parametrize("codec, column, change, why", [
    ("lossless", "visual_topk_ids", lambda p: p[:-1], "payload (freqdict) holds"),
    ("lossless", "visual_topk_ids", lambda p: np.array([99], np.uint32).tobytes() + p[4:],
     "payload (freqdict) has a dictionary of 99 ids"),
    ("lossless@earlier", "visual_topk_ids", lambda p: p[:-1], "payload (shuffle32) holds"),
    ("lossless", "response_topk_logprobs", lambda p: p + b"\0", "payload (delta16) holds"),
    ("lossless", "relation", lambda p: p[:-2], "relation has 9 values, expected 10"),
    ("compact", "relation", lambda p: p[:-1], "payload (lowrank8) holds"),
    ("compact", "relation", first_lowrank_weight(np.inf), "payload (lowrank8) has a non-finite column weight"),
    ("compact", "relation", lambda p: np.array([5], np.uint32).tobytes() + p[4:],
     "for side L = 5 and rank r"),
    ("compact", "relation", lambda p: np.array([1 << 20], np.uint32).tobytes() + p[4:],
     "payload (lowrank8) has side L = 1048576"),
    ("compact@earlier", "relation", lambda p: np.array([np.inf], np.float32).tobytes() + p[4:],
     "payload (int8col) has scale inf"),
    ("compact", "visual_topk_logprobs", lambda p: p[:-3], "payload (logq8) holds"),
    # payloads that decode, to values the row checks refuse
    ("lossless", "response_topk_logprobs", flip_sign_of_first_logprob, "NaN or values > 0"),
    ("lossless", "response_topk_ids", all_indices_zero, "repeats a token id"),
    ("lossless@earlier", "response_topk_ids", lambda p: b"\0" * len(p), "repeats a token id"),
    ("compact", "relation", first_lowrank_weight(1e30), "NaN or infinite"),
    ("compact@earlier", "relation", lambda p: np.array([1e30], np.float32).tobytes() + p[4:], "NaN or infinite"),
])
def test_a_corrupted_payload_is_one_line_naming_shard_sample_and_column(tmp_path, codec, column, change, why):
    cache = tmp_path / "cache"
    write(cache, codec)
    rewrite_payload(cache, column, "adv-01", change)
    faults = verify_cache(cache)
    assert len(faults) == 1 and "\n" not in faults[0], faults
    assert SHARD in faults[0] and "'adv-01'" in faults[0] and column in faults[0] and why in faults[0], faults[0]
    assert verify_cache(cache, quick=True) == []          # sha256 and schema are intact: only decoding sees it
    reader = CacheReader(cache, verify=True)
    with pytest.raises(CacheError, match="adv-01") as raised:
        list(reader)
    assert str(raised.value) == faults[0]


def test_manifests_name_known_codecs_for_every_encoded_column_and_only_in_format_2(tmp_path):
    manifest = write(tmp_path / "cache", "compact")
    assert schema.manifest_faults(manifest, "c") == []
    for change, message in [
        (lambda m: m.pop("codecs"), "manifest 'codecs' must map exactly"),
        (lambda m: m["codecs"].update(relation="zip"),
         "'relation' is 'zip', expected one of ['shuffle16', 'int8col', 'lowrank8']"),
        (lambda m: m["codecs"].update(response_topk_ids="logq8"), "expected one of ['shuffle32', 'freqdict']"),
        (lambda m: m["codecs"].update(input_ids="shuffle32"), "must map exactly"),
        (lambda m: m.update(format_version=1), "'codecs' is not part of format_version 1"),
        (lambda m: m.update(codec="gzip"), "manifest 'codec' must be one of"),
    ]:
        broken = json.loads(json.dumps(manifest))
        change(broken)
        faults = schema.manifest_faults(broken, "c")
        assert any(message in fault for fault in faults), (message, faults)
    shutil.copytree(tmp_path / "cache", tmp_path / "no-codecs")
    broken = json.loads((tmp_path / "no-codecs" / schema.MANIFEST_NAME).read_text())
    broken["codecs"]["relation"] = "shuffle16"             # another codec of the same kind: the schema agrees
    writer.write_manifest(tmp_path / "no-codecs", broken)
    assert any("relation" in fault and "adv-00" in fault for fault in verify_cache(tmp_path / "no-codecs"))


def test_a_partial_dump_resumes_only_with_its_codec(tmp_path):
    cache = tmp_path / "cache"
    with ShardWriter(cache, rank=0, k_response=cs.K_R, k_visual=cs.K_V, codec="compact") as shard_writer:
        shard_writer.write(cs.samples()[0])
    with pytest.raises(CacheError, match="written with --codec compact, not lossless"):
        ShardWriter(cache, rank=1, k_response=cs.K_R, k_visual=cs.K_V, codec="lossless")
    with ShardWriter(cache, rank=0, k_response=cs.K_R, k_visual=cs.K_V, codec="compact") as shard_writer:
        shard_writer.write(cs.samples()[1])
    write_rank_report(cache, 0, skipped=[])
    assert finalize_cache(cache, dict(cs.MANIFEST))["codec"] == "compact"
    assert len(read_all(cache)) == 2


def test_dump_codec_is_a_literal_field(tmp_path):
    from teacher_dump.config import DumpConfig

    assert DumpConfig(teacher="t", data="d", out="o").codec == "lossless"
    with pytest.raises(KdcacheError, match="codec"):
        DumpConfig(teacher="t", data="d", out="o", codec="zip")


def test_kdcache_dump_codecs_store_the_same_targets(tiny_teacher_dir, toy_dataset, tmp_path):
    """The real dump with --codec v1 | lossless | compact: lossless reads back exactly what v1 stores (and the
    v1 cache is format 1), compact within its bounds."""
    from teacher_dump.config import DumpConfig
    from teacher_dump.dump import dump

    data, images = toy_dataset(count=3, text_only=1)
    read = {}
    for codec in ALL_CODECS:
        cfg = DumpConfig(teacher=str(tiny_teacher_dir), data=str(data), images=str(images), out=str(tmp_path / codec),
                         device="cpu", dtype="float32", progress=False, topk_response=6, topk_visual=4, codec=codec)
        manifest = dump(cfg)
        assert manifest["format_version"] == (1 if codec == "v1" else 2) and manifest.get("codec", "v1") == codec
        read[codec] = {s["sample_id"]: s for s in read_all(tmp_path / codec)}
    for sample_id, v1 in read["v1"].items():
        lossless, compact = read["lossless"][sample_id], read["compact"][sample_id]
        for column in schema.COLUMNS:
            if isinstance(v1[column], np.ndarray):
                assert np.array_equal(lossless[column].view(np.uint8), v1[column].view(np.uint8)), column
            else:
                assert lossless[column] == v1[column], column
        for role in schema.ROLES:
            ids_column, logprobs_column = schema.TOPK_COLUMNS[role]
            assert np.array_equal(compact[ids_column], v1[ids_column])
            assert_logq8_within_bound(compact[logprobs_column], v1[logprobs_column])
        if v1["relation"] is not None:
            assert relation_cosine(compact["relation"], v1["relation"]) >= LOWRANK_COSINE


def test_a_format_2_cache_is_pulled_whole_and_cut_like_any_other(tmp_path):
    from kdcache.transfer import pull_cache

    source = write(tmp_path / "cache", "compact")
    whole = pull_cache(str(tmp_path / "cache"), tmp_path / "whole")
    part = pull_cache(str(tmp_path / "cache"), tmp_path / "part", samples=4)
    assert whole == source and part["codecs"] == source["codecs"] and part["format_version"] == 2
    for pulled, count in ((tmp_path / "whole", 9), (tmp_path / "part", 4)):
        assert verify_cache(pulled) == []
        rows = read_all(pulled)
        assert len(rows) == count
        for got, want in zip(rows, read_all(tmp_path / "cache")):
            assert np.array_equal(bits(got["visual_topk_logprobs"]), bits(want["visual_topk_logprobs"]))


def test_a_student_trains_from_a_compact_cache_as_from_a_lossless_one(tiny_teacher_dir, tiny_student_dir,
                                                                       toy_dataset, tmp_path):
    """Dump with --codec lossless and compact, train two distillation steps from each (the relation loss on):
    every loss term finite, the same steps, and compact's terms within its bounds of lossless's."""
    from student_train.config import TrainConfig
    from student_train.train import train
    from teacher_dump.config import DumpConfig
    from teacher_dump.dump import dump

    data, images = toy_dataset(count=4, text_only=1)
    steps = {}
    for codec in ("lossless", "compact"):
        dump(DumpConfig(teacher=str(tiny_teacher_dir), data=str(data), images=str(images), out=str(tmp_path / codec),
                        device="cpu", dtype="float32", progress=False, batch_size=2, codec=codec))
        assert verify_cache(tmp_path / codec) == []
        train(TrainConfig(stage="dpt", student=str(tiny_student_dir), cache=str(tmp_path / codec),
                          out=str(tmp_path / f"run-{codec}"), device="cpu", num_workers=0, progress=False,
                          batch_size=2, global_batch=2, max_steps=2))
        lines = (tmp_path / f"run-{codec}" / "metrics.jsonl").read_text().splitlines()
        steps[codec] = [json.loads(line) for line in lines]
    assert [m["step"] for m in steps["compact"]] == [m["step"] for m in steps["lossless"]] == [1, 2]
    first = {codec: runs[0] for codec, runs in steps.items()}       # the same student: only the targets differ
    for key in ("loss", "kl_response", "kl_visual", "relation"):
        assert all(np.isfinite(m[key]) for runs in steps.values() for m in runs), key
    assert first["compact"]["relation"] > 0
    assert abs(first["compact"]["relation"] - first["lossless"]["relation"]) <= np.sqrt(2 * (1 - LOWRANK_COSINE))
    for role in ("kl_response", "kl_visual"):                        # logq8: within 1/32 nat per log-prob
        assert abs(first["compact"][role] - first["lossless"][role]) <= 2 * LOGQ8_HALF_STEP + 1e-3, role
