"""The cache format: writer -> finalize -> reader, resume, verify, and refusal of untrusted caches."""

from __future__ import annotations

import hashlib
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pytest

from kdcache import schema
from kdcache.encoding import DecodedBatch
from kdcache.records import coerce_sample, record_batch
from kdcache.errors import CacheError, SampleError
from kdcache.reader import CacheReader
from kdcache.audit import describe_cache, verify_cache
from kdcache.writer import ShardWriter, completed_sample_ids, finalize_cache, write_rank_report

K_R, K_V = 8, 4


def make_sample(sample_id: str, *, seed: int = 0, T: int = 30, L: int = 6, R: int = 5, image: bool = True) -> dict:
    """A synthetic sample with an image of L visual rows (or text-only), R response rows."""
    rng = np.random.default_rng(seed)
    L = L if image else 0
    image_bytes = rng.bytes(50) if image else None

    def topk(rows, k):
        logits = rng.normal(size=(rows, k)).astype(np.float32) * 3
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.1   # leaves some tail mass
        return rng.integers(0, 1000, size=(rows, k)).astype(np.int64), logprobs

    response_ids, response_logprobs = topk(R, K_R)
    visual_ids, visual_logprobs = topk(L, K_V)
    return {
        "sample_id": sample_id,
        "input_ids": rng.integers(0, 1000, size=T),
        "response_rows": np.sort(rng.choice(np.arange(L, T - 1), size=R, replace=False)),
        "visual_start": 0,
        "visual_len": L,
        "image": image_bytes,
        "image_sha256": hashlib.sha256(image_bytes).digest() if image else None,
        "response_topk_ids": response_ids, "response_topk_logprobs": response_logprobs,
        "visual_topk_ids": visual_ids, "visual_topk_logprobs": visual_logprobs,
        "relation": rng.normal(size=L * (L + 1) // 2).astype(np.float32) / L if image else None,
        "relation_norm": float(rng.uniform(1, 100)) if image else None,
    }


def write_rank(cache, samples, *, rank: int = 0, **kw) -> ShardWriter:
    with ShardWriter(cache, rank=rank, k_response=K_R, k_visual=K_V, **kw) as writer:
        for sample in samples:
            writer.write(sample)
    write_rank_report(cache, rank, skipped=[])
    return writer


def write_cache(cache, samples, **kw) -> dict:
    write_rank(cache, samples, **kw)
    return finalize_cache(cache, {"teacher": {"source": "toy-teacher"}, "template": "plain",
                                  "temperature": {"response": 1.0, "visual": 1.0}})


def assert_same_sample(read: dict, written: dict) -> None:
    assert set(read) == set(schema.COLUMNS)
    for key in ("input_ids", "response_rows", "response_topk_ids", "visual_topk_ids"):
        assert read[key].dtype == np.int32 and np.array_equal(read[key], written[key]), key
    for key in ("response_topk_logprobs", "visual_topk_logprobs", "relation"):
        if written[key] is None:
            assert read[key] is None
        else:      # float16 round trip is exact: compare bit patterns
            assert read[key].dtype == np.float16
            assert np.array_equal(read[key].view(np.uint16), written[key].astype(np.float16).view(np.uint16)), key
    for key in ("sample_id", "visual_start", "visual_len", "image", "image_sha256"):
        assert read[key] == written[key], key
    if written["relation_norm"] is None:
        assert read["relation_norm"] is None
    else:
        assert read["relation_norm"] == pytest.approx(written["relation_norm"], rel=1e-6)


def rewrite_manifest(cache, **changes) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(changes)
    (cache / "manifest.json").write_text(json.dumps(manifest))


# --- round trip


def test_round_trip_returns_every_value_exactly(tmp_path):
    samples = [make_sample(f"s{i}", seed=i, image=i != 2) for i in range(6)]
    manifest = write_cache(tmp_path, samples)
    reader = CacheReader(tmp_path, verify=True)
    assert len(reader) == manifest["num_samples"] == 6
    for i, sample in enumerate(samples):
        assert_same_sample(reader.read_sample(i), sample)
    assert [s["sample_id"] for s in reader] == [s["sample_id"] for s in samples]
    assert verify_cache(tmp_path) == []


def test_text_only_sample_has_no_image_no_visual_rows_and_no_relation(tmp_path):
    write_cache(tmp_path, [make_sample("text", image=False)])
    sample = CacheReader(tmp_path).read_sample(0)
    assert sample["image"] is None and sample["image_sha256"] is None
    assert sample["visual_len"] == 0 and sample["visual_topk_ids"].shape == (0, K_V)
    assert sample["relation"] is None and sample["relation_norm"] is None


def test_read_samples_are_writable_copies(tmp_path):
    write_cache(tmp_path, [make_sample("a"), make_sample("b", seed=1)])
    reader = CacheReader(tmp_path)
    first = reader.read_sample(0)
    first["visual_topk_logprobs"][:] = 0
    assert not np.all(reader.read_sample(0)["visual_topk_logprobs"] == 0)


def test_shards_roll_over_once_they_reach_shard_size_bytes(tmp_path):
    samples = [make_sample(f"s{i}", seed=i) for i in range(5)]
    manifest = write_cache(tmp_path, samples, shard_size_bytes=1, samples_per_batch=2)
    assert [s["path"] for s in manifest["shards"]] == [schema.shard_name(0, i) for i in range(3)]
    assert [s["num_samples"] for s in manifest["shards"]] == [2, 2, 1]
    reader = CacheReader(tmp_path)
    assert [reader.locate(i) for i in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert_same_sample(reader.read_sample(3), samples[3])


def test_record_batches_hold_at_most_four_samples(tmp_path):
    write_cache(tmp_path, [make_sample(f"s{i}", seed=i) for i in range(9)])
    shard = pa.ipc.open_file(str(tmp_path / schema.shard_name(0, 0)))
    assert [shard.get_batch(b).num_rows for b in range(shard.num_record_batches)] == [4, 4, 1]
    assert shard.schema.equals(schema.shard_schema(K_R, K_V), check_metadata=False)
    with pytest.raises(ValueError, match="samples_per_batch"):
        ShardWriter(tmp_path / "other", k_response=K_R, k_visual=K_V, samples_per_batch=5)


def test_writer_refuses_malformed_samples_naming_them(tmp_path):
    bad_shape = make_sample("bad-shape")
    bad_shape["response_topk_ids"] = bad_shape["response_topk_ids"][:, :3]
    bad_relation = make_sample("bad-relation")
    bad_relation["relation"] = bad_relation["relation"][:-1]
    logits = make_sample("logits")
    logits["visual_topk_logprobs"] = np.abs(logits["visual_topk_logprobs"])
    with ShardWriter(tmp_path, k_response=K_R, k_visual=K_V) as writer:
        for sample, message in ((bad_shape, "response_topk_ids has shape"), (bad_relation, "relation has shape"),
                                (logits, "not logits")):
            with pytest.raises(SampleError, match=message) as caught:
                writer.write(sample)
            assert caught.value.sample_id == sample["sample_id"]


# --- failure and resume


def test_exception_inside_the_writer_leaves_no_visible_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path, k_response=K_R, k_visual=K_V, samples_per_batch=1) as writer:
            writer.write(make_sample("a"))
            raise RuntimeError("teacher crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_parts"]
    assert list((tmp_path / "_parts").iterdir()) == []
    assert completed_sample_ids(tmp_path) == set()


def test_resume_after_a_kill_continues_numbering_and_knows_what_is_done(tmp_path):
    done = [make_sample(f"s{i}", seed=i) for i in range(3)]
    with ShardWriter(tmp_path, k_response=K_R, k_visual=K_V) as writer:
        for sample in done:
            writer.write(sample)
    # the kill: a half-written shard and sidecar left under temporary names
    (tmp_path / "shard-r000-00001.arrow.tmp").write_bytes(b"half a shard")
    (tmp_path / "_parts" / "shard-r000-00001.json.tmp").write_text("{")
    assert completed_sample_ids(tmp_path) == {"s0", "s1", "s2"}

    rest = [make_sample(f"s{i}", seed=i) for i in range(3, 5)]
    writer = write_rank(tmp_path, rest)
    assert writer.shards_written == ["shard-r000-00001.arrow"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert completed_sample_ids(tmp_path) == {f"s{i}" for i in range(5)}
    manifest = finalize_cache(tmp_path, {})
    assert [s["path"] for s in manifest["shards"]] == ["shard-r000-00000.arrow", "shard-r000-00001.arrow"]
    assert [CacheReader(tmp_path).read_sample(i)["sample_id"] for i in range(5)] == [f"s{i}" for i in range(5)]


def test_a_sidecar_without_its_shard_counts_as_unfinished(tmp_path):
    with ShardWriter(tmp_path, k_response=K_R, k_visual=K_V) as writer:
        writer.write(make_sample("s0"))
    # killed between the sidecar and the rename of the next shard
    (tmp_path / "_parts" / "shard-r000-00001.json").write_text(json.dumps({"sample_ids": ["s1"]}))
    assert completed_sample_ids(tmp_path) == {"s0"}
    writer = write_rank(tmp_path, [make_sample("s1", seed=1)])
    assert writer.shards_written == ["shard-r000-00001.arrow"]
    assert finalize_cache(tmp_path, {})["num_samples"] == 2


def test_two_ranks_merge_in_rank_then_index_order(tmp_path):
    write_rank(tmp_path, [make_sample(f"b{i}", seed=i) for i in range(3)], rank=1, shard_size_bytes=1,
               samples_per_batch=2)
    write_rank(tmp_path, [make_sample(f"a{i}", seed=i) for i in range(3)], rank=0, shard_size_bytes=1,
               samples_per_batch=2)
    manifest = finalize_cache(tmp_path, {"world_size": 2})
    assert [s["path"] for s in manifest["shards"]] == [
        "shard-r000-00000.arrow", "shard-r000-00001.arrow", "shard-r001-00000.arrow", "shard-r001-00001.arrow"]
    assert [s["sample_id"] for s in CacheReader(tmp_path)] == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert not (tmp_path / "_parts").exists()


def test_finalize_waits_for_every_rank_report(tmp_path):
    write_rank(tmp_path, [make_sample("a")], rank=0)
    with pytest.raises(CacheError, match=r"rank\(s\) \[1\] have not reported"):
        finalize_cache(tmp_path, {"world_size": 2})
    assert not (tmp_path / "manifest.json").exists()


def test_finalize_refuses_duplicate_sample_ids(tmp_path):
    write_rank(tmp_path, [make_sample("same")], rank=0)
    write_rank(tmp_path, [make_sample("same", seed=1)], rank=1)
    with pytest.raises(CacheError, match="'same' is in both shard-r000-00000.arrow and shard-r001-00000.arrow"):
        finalize_cache(tmp_path, {})
    assert not (tmp_path / "manifest.json").exists()


def test_finalize_records_skipped_samples_and_statistics(tmp_path):
    with ShardWriter(tmp_path, k_response=K_R, k_visual=K_V) as writer:
        writer.write(make_sample("a"))
        writer.write(make_sample("b", image=False))
    write_rank_report(tmp_path, 0, skipped=[{"sample_id": "c", "reason": "image missing"}])
    manifest = finalize_cache(tmp_path, {})
    assert manifest["skipped"] == [{"sample_id": "c", "reason": "image missing"}]
    stats = manifest["stats"]
    assert stats["rows"] == {"response": 10, "visual": 6} and stats["tokens"] == 60
    assert 0.05 < stats["mean_tail_mass"]["visual"] < 0.2          # the synthetic logprobs leave 1 - e^-0.1
    assert stats["bytes_per_sample"] == manifest["shards"][0]["num_bytes"] / 2
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest


# --- untrusted caches


def test_reader_refuses_unknown_format_version(tmp_path):
    write_cache(tmp_path, [make_sample("a")])
    rewrite_manifest(tmp_path, format_version=4)
    with pytest.raises(CacheError) as caught:
        CacheReader(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cache format_version 4 is newer than this kdcache understands (3); upgrade kdcache"
    rewrite_manifest(tmp_path, format_version=1, format="something-else")
    with pytest.raises(CacheError, match="not a kdcache cache"):
        CacheReader(tmp_path)


def test_reader_refuses_a_missing_manifest(tmp_path):
    write_rank(tmp_path, [make_sample("a")])
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path)


@pytest.mark.parametrize("path", ["../evil.arrow", "/etc/passwd", "sub/../../evil.arrow", "link.arrow"])
def test_reader_refuses_shard_paths_outside_the_cache(tmp_path, path):
    cache = tmp_path / "cache"
    write_cache(cache, [make_sample("a")])
    (tmp_path / "evil.arrow").write_bytes((cache / schema.shard_name(0, 0)).read_bytes())
    os.symlink(tmp_path / "evil.arrow", cache / "link.arrow")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["shards"][0]["path"] = path
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="shard path"):
        CacheReader(cache)
    assert any("shard path" in fault for fault in verify_cache(cache))


def test_reader_refuses_a_shard_with_another_schema(tmp_path):
    write_cache(tmp_path, [make_sample("a")])
    rewrite_manifest(tmp_path, topk={"response": K_R + 1, "visual": K_V})
    reader = CacheReader(tmp_path)
    with pytest.raises(CacheError, match="schema does not match"):
        reader.read_sample(0)


@pytest.mark.parametrize("last_row", [29, 35])                 # T = 30: row 29 would predict token 30
def test_decoded_rows_refuse_response_rows_past_the_sequence(last_row):
    record = coerce_sample(make_sample("s0"), k_response=K_R, k_visual=K_V)
    record["response_rows"] = np.append(record["response_rows"][:-1], last_row).astype(np.int32)
    batch = record_batch([record], schema.shard_schema(K_R, K_V))
    with pytest.raises(CacheError, match=r"'s0'.*response_rows outside \[0, 29\)"):
        DecodedBatch(batch, "shard-x").sample(0)


def test_verify_cache_catches_a_flipped_byte_and_names_the_shard(tmp_path):
    write_cache(tmp_path, [make_sample(f"s{i}", seed=i) for i in range(3)])
    shard = tmp_path / schema.shard_name(0, 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    faults = verify_cache(tmp_path)
    assert len(faults) == 1 and schema.shard_name(0, 0) in faults[0] and "sha256" in faults[0]
    with pytest.raises(CacheError, match="corrupt shard"):
        CacheReader(tmp_path, verify=True)


def test_verify_cache_catches_a_missing_shard(tmp_path):
    write_cache(tmp_path, [make_sample(f"s{i}", seed=i) for i in range(3)], shard_size_bytes=1, samples_per_batch=1)
    (tmp_path / schema.shard_name(0, 1)).unlink()
    faults = verify_cache(tmp_path)
    assert faults == [f"{tmp_path}/{schema.shard_name(0, 1)}: shard is missing"]
    reader = CacheReader(tmp_path)
    assert reader.read_sample(0)["sample_id"] == "s0"
    with pytest.raises(CacheError, match="cannot open shard"):
        reader.read_sample(1)


def test_verify_cache_reports_a_bad_manifest_instead_of_raising(tmp_path):
    assert "no manifest.json" in verify_cache(tmp_path)[0]
    assert "cannot open cache" in verify_cache("nosuchprotocol://bucket/cache")[0]
    (tmp_path / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in verify_cache(tmp_path)[0]


# --- where readers run


def test_reader_survives_the_trip_to_a_dataloader_worker(tmp_path):
    samples = [make_sample(f"s{i}", seed=i) for i in range(3)]
    write_cache(tmp_path, samples)
    reader = CacheReader(tmp_path)
    reader.read_sample(0)                                   # holds an open memory map now
    worker_copy = pickle.loads(pickle.dumps(reader))        # what DataLoader does with the dataset
    assert_same_sample(worker_copy.read_sample(2), samples[2])


def test_reader_reads_a_cache_behind_an_fsspec_url(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    samples = [make_sample(f"s{i}", seed=i) for i in range(3)]
    write_cache(tmp_path, samples)
    fs = fsspec.filesystem("memory")
    for path in tmp_path.iterdir():
        fs.pipe(f"/kdcache-test/{path.name}", path.read_bytes())
    try:
        reader = CacheReader("memory://kdcache-test", verify=True)
        assert_same_sample(reader.read_sample(1), samples[1])
        assert verify_cache("memory://kdcache-test") == []
    finally:
        fs.rm("/kdcache-test", recursive=True)


def test_describe_cache_mentions_samples_and_tail_mass(tmp_path):
    write_rank(tmp_path, [make_sample("a"), make_sample("b", seed=1)])
    write_rank_report(tmp_path, 0, skipped=[{"sample_id": f"bad{i}", "reason": "corrupt image"} for i in range(12)])
    finalize_cache(tmp_path, {"teacher": {"source": "toy-teacher"}, "tokenizer": {"fingerprint": "sha256:abc"}})
    text = describe_cache(tmp_path)
    assert "2 in 1 shards" in text and "mean tail mass" in text
    assert "toy-teacher" in text and "sha256:abc" in text
    assert "bad9: corrupt image" in text and "bad10" not in text and "2 more" in text
