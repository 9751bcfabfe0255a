"""`kdcache dump --fidelity-sample N` and the manifest's bytes per role, on a tiny teacher: the dump's KL and
relation cosine against a dense float64 reference from the cache read back, encoded bytes per role against
the shards' columns, malformed entries refused, `kdcache inspect` showing them."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from kdcache import codecs, fidelity, models, samples, schema, targets
from kdcache.errors import CacheError, KdcacheError
from kdcache.reader import CacheReader
from kdcache.audit import describe_cache
from kdcache.writer import completed_sample_ids, merged_fidelity, write_manifest

from train_runs import run_dump

NO_TAIL = 1e-6       # the loss's threshold below which a row has no tail outcome (kdcache.losses.NO_TAIL)


def reference_logits(teacher_dir, images, record, stored) -> np.ndarray:
    """The teacher's full logits (T, V) of one stored sample, in float64."""
    model = LlavaForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    bundle = models.load_bundle(str(teacher_dir))
    ids = torch.from_numpy(stored["input_ids"].astype(np.int64))[None]
    pixels = None
    if record.image is not None:
        pixels = samples.pixel_values([Image.open(images / record.image)], bundle.image_processor).double()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits[0].numpy()


def reference_kl(logits: np.ndarray, ids: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """(R,) the bucket KL of stored top-k rows against the full softmax, dense float64, written out here:
    sum_j p̂_j (log p̂_j - log p_j) + p̂_tail (log p̂_tail - log p_tail) where p̂_tail = 1 - sum p̂ > NO_TAIL."""
    log_p = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)                                             # (R, V)
    out = []
    for row in range(len(ids)):
        p_hat = np.exp(stored[row].astype(np.float64))
        at = log_p[row, ids[row]]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(p_hat > 0, p_hat * (np.log(p_hat) - at), 0.0).sum()
        outside = np.ones(log_p.shape[1], bool)
        outside[ids[row]] = False
        tail_hat = 1.0 - p_hat.sum()
        if tail_hat > NO_TAIL and outside.any():
            kl += tail_hat * (np.log(tail_hat) - np.log(np.exp(log_p[row, outside]).sum()))
        out.append(kl)
    return np.asarray(out)


def reference_report(teacher_dir, data, images, cache, count: int) -> dict:
    """Per role all rows' KL and per sample the relation cosine, of the first `count` samples read back."""
    reader = CacheReader(cache, verify=True)
    stored_by_id = {s["sample_id"]: s for s in reader}
    kls, cosines = {"response": [], "visual": []}, []
    for record in samples.load_records(data)[:count]:
        stored = stored_by_id[record.sample_id]
        logits = reference_logits(teacher_dir, images, record, stored)
        vs, vl = stored["visual_start"], stored["visual_len"]
        for role, rows in (("response", stored["response_rows"]), ("visual", np.arange(vs, vs + vl))):
            ids_column, logprobs_column = schema.TOPK_COLUMNS[role]
            kls[role].append(reference_kl(logits[np.asarray(rows, np.int64)], stored[ids_column].astype(np.int64),
                                          stored[logprobs_column]))
        if stored["relation"] is not None:
            y = logits[vs: vs + vl]
            exact = y @ y.T
            full = np.zeros((vl, vl))
            upper = np.triu_indices(vl)
            full[upper] = stored["relation"].astype(np.float64)
            full.T[upper] = stored["relation"].astype(np.float64)
            cosines.append(float((full * exact).sum() / (np.linalg.norm(full) * np.linalg.norm(exact))))
    return {"kl": {role: np.concatenate(v) for role, v in kls.items()}, "cosine": np.asarray(cosines)}


def dump_five(teacher_dir, toy_dataset, cache, **overrides):
    """4 image samples and a text-only one dumped 2 per batch into `cache`: (data, images, manifest)."""
    data, images = toy_dataset(count=5, text_only=1)
    return data, images, run_dump(teacher_dir, data, images, cache, batch_size=2, **overrides)


@pytest.mark.parametrize("codec", ["lossless", "compact"])
def test_fidelity_matches_a_dense_float64_reference(tiny_teacher_dir, toy_dataset, tmp_path, codec):
    cache = tmp_path / "cache"
    data, images, manifest = dump_five(tiny_teacher_dir, toy_dataset, cache, topk_response=16, topk_visual=8,
                                       codec=codec, fidelity_sample=3)
    fidelity = manifest["fidelity"]
    assert json.loads((cache / schema.MANIFEST_NAME).read_text())["fidelity"] == fidelity
    ref = reference_report(tiny_teacher_dir, data, images, cache, 3)
    assert fidelity["num_samples"] == 3 and fidelity["codec"] == codec
    for role in schema.ROLES:
        kl = ref["kl"][role]
        assert fidelity[role]["rows"] == len(kl) > 0
        assert fidelity[role]["kl_mean_nats"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-8)
        assert fidelity[role]["kl_max_nats"] == pytest.approx(kl.max(), rel=1e-3, abs=1e-8)
    assert fidelity["relation"]["samples"] == len(ref["cosine"]) == 3
    assert fidelity["relation"]["cosine_min"] == pytest.approx(ref["cosine"].min(), abs=1e-7)
    assert fidelity["relation"]["cosine_mean"] == pytest.approx(ref["cosine"].mean(), abs=1e-7)
    # compact's quantised log-probs cost visibly more than lossless's float16 rounding (float32 noise ~1e-7)
    assert all((fidelity[role]["kl_mean_nats"] > 1e-6) == (codec == "compact") for role in schema.ROLES)


def test_fidelity_is_absent_when_off_and_leaves_the_shards_unchanged(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=3)
    off = run_dump(tiny_teacher_dir, data, images, tmp_path / "off", topk_response=4, topk_visual=3, batch_size=2)
    on = run_dump(tiny_teacher_dir, data, images, tmp_path / "on", topk_response=4, topk_visual=3, batch_size=2,
                  fidelity_sample=10)
    assert "fidelity" not in off and on["fidelity"]["num_samples"] == 3      # N beyond the data: all of it
    v1 = run_dump(tiny_teacher_dir, data, images, tmp_path / "v1", topk_response=4, topk_visual=3, codec="v1")
    assert "encoded_bytes" not in v1["stats"]         # format 1's manifest stays what it was, byte for byte
    assert [s["sha256"] for s in off["shards"]] == [s["sha256"] for s in on["shards"]]


def column_bytes(cache) -> dict[str, int]:
    """Every column's Arrow bytes summed over the shards' record batches, read back from the files."""
    totals = dict.fromkeys(schema.COLUMNS, 0)
    for path in sorted(cache.glob("shard-*.arrow")):
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                for name in schema.COLUMNS:
                    totals[name] += batch.column(name).nbytes
    return totals


@pytest.mark.parametrize("codec", ["lossless", "compact"])
def test_bytes_per_role_sum_to_the_shards_column_bytes(tiny_teacher_dir, toy_dataset, tmp_path, codec):
    cache = tmp_path / "cache"
    _, images, manifest = dump_five(tiny_teacher_dir, toy_dataset, cache, topk_response=4, topk_visual=3,
                                    codec=codec, shard_size_mb=0.002)
    assert len(manifest["shards"]) > 1
    columns = column_bytes(cache)
    by_role = manifest["stats"]["encoded_bytes"]
    assert by_role == {
        "response_topk": columns["response_topk_ids"] + columns["response_topk_logprobs"],
        "visual_topk": columns["visual_topk_ids"] + columns["visual_topk_logprobs"],
        "relation": columns["relation"] + columns["relation_norm"],
        "image": columns["image"],
        "other": sum(columns[c] for c in ("sample_id", "input_ids", "response_rows", "visual_start",
                                          "visual_len", "image_sha256"))}
    assert sum(by_role.values()) == sum(columns.values())
    assert by_role["image"] >= sum(p.stat().st_size for p in images.glob("*.png"))


BAD_ENTRIES = [
    ("fidelity", lambda f: f.update(num_samples=-1)),
    ("fidelity", lambda f: f["response"].update(kl_mean_nats=float("nan"))),
    ("fidelity", lambda f: f["visual"].update(kl_max_nats="0.1")),
    ("fidelity", lambda f: f["relation"].update(cosine_min=1.5)),
    ("fidelity", lambda f: f.pop("relation")),
    ("fidelity", lambda f: f.update(codec="zip")),
    ("stats", lambda s: s["encoded_bytes"].update(relation=-3)),
    ("stats", lambda s: s["encoded_bytes"].pop("image")),
    ("stats", lambda s: s.update(encoded_bytes=[1, 2])),
]


@pytest.mark.parametrize("codec", ["lossless", "compact"])
def test_a_non_finite_relation_under_the_fidelity_report_names_its_sample_and_keeps_earlier_ones(
        tiny_teacher_dir, toy_dataset, tmp_path, monkeypatch, codec):
    """The report skips a non-finite relation (compact's lowrank8 would refuse it without the sample id) and the
    dump's own check refuses it in one line naming the sample; the finished shards before it are kept (the first
    record batch of four here), so a resume redoes only the rest."""
    data, images = toy_dataset(count=6)
    relation, calls = targets.relation_from_hidden, []

    def fifth_overflows(hidden, gram):
        calls.append(1)
        return relation(hidden, gram) * (float("inf") if len(calls) == 5 else 1.0)

    monkeypatch.setattr(targets, "relation_from_hidden", fifth_overflows)
    out = tmp_path / "cache"
    with pytest.raises(KdcacheError) as caught:
        run_dump(tiny_teacher_dir, data, images, out, batch_size=1, topk_response=4, topk_visual=4, codec=codec,
                 fidelity_sample=6, shard_size_mb=0.001)
    message = str(caught.value)
    assert "\n" not in message and message == f"sample 'sample-4': {targets.NON_FINITE_RELATION}", message
    assert completed_sample_ids(out) == {f"sample-{i}" for i in range(4)}   # one record batch


def test_the_cosine_of_a_non_finite_relation_is_nan_and_is_not_reported():
    exact = torch.ones(2, 2)
    packed = torch.tensor([1.0, float("nan"), 0.5], dtype=torch.float16)
    assert math.isnan(fidelity.cosine(packed.numpy(), exact))
    assert math.isnan(fidelity.cosine(np.ones(3, np.float16), exact * float("inf")))
    assert fidelity.cosine(np.ones(3, np.float16), exact) == pytest.approx(1.0)
    report = fidelity.Fidelity(1, "compact")
    report.add_relation(packed, exact)
    report.add_relation(torch.ones(3, dtype=torch.float16), exact * float("nan"))
    assert report.relation == {"cosine_sum": 0.0, "cosine_min": None, "samples": 0}
    report.add_relation(torch.tensor([1.0, 0.5, 1.0], dtype=torch.float16), exact)
    assert report.relation["samples"] == 1 and 0.9 < report.relation["cosine_min"] < 1.0


@pytest.fixture(scope="module")
def measured_cache(tiny_teacher_dir, tmp_path_factory):
    from conftest import write_toy_dataset
    root = tmp_path_factory.mktemp("measured")
    data, images = write_toy_dataset(root, count=3, text_only=1)
    run_dump(tiny_teacher_dir, data, images, root / "cache", topk_response=4, topk_visual=3, codec="compact",
             fidelity_sample=2)
    return root / "cache"


@pytest.mark.parametrize("key, edit", BAD_ENTRIES)
def test_a_malformed_fidelity_or_bytes_entry_is_refused_in_one_line(measured_cache, tmp_path, key, edit):
    manifest = json.loads((measured_cache / schema.MANIFEST_NAME).read_text())
    edit(manifest[key])
    write_manifest(tmp_path, manifest)
    with pytest.raises(CacheError) as caught:
        describe_cache(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and f"manifest {key!r}" in message


def test_inspect_shows_codec_bytes_per_role_and_fidelity(measured_cache):
    manifest = json.loads((measured_cache / schema.MANIFEST_NAME).read_text())
    text = describe_cache(measured_cache)
    preset = codecs.PRESETS["compact"]
    assert "codec           compact (" in text and f"relation {preset['relation']}" in text
    assert f"response_topk_logprobs {preset['logprobs']}" in text and f"response_topk_ids {preset['ids']}" in text
    assert "bytes by role   response_topk " in text and "(encoded, before zstd)" in text
    fidelity = manifest["fidelity"]
    assert "fidelity        2 samples, codec compact" in text
    for role in schema.ROLES:
        line = next(line for line in text.splitlines() if line.startswith(f"  {role:<14}mean "))
        assert f"mean {fidelity[role]['kl_mean_nats']:.3g}" in line and f"{fidelity[role]['rows']} rows" in line
    assert f"min {fidelity['relation']['cosine_min']:.7f}" in text


def test_ranks_reports_merge_into_the_pooled_numbers():
    """Two ranks' sums (as `Fidelity.sums` writes them) give the mean, max and min over all their rows and samples."""
    kls = {0: {"response": [0.1, 0.3], "visual": []}, 1: {"response": [0.5], "visual": [0.2, 0.4, 0.9]}}
    cosines = {0: [0.99, 0.97], 1: []}

    def sums(rank):
        roles = {role: {"kl_sum": sum(v), "kl_max": max(v) if v else None, "rows": len(v)}
                 for role, v in kls[rank].items()}
        c = cosines[rank]
        return {"num_samples": 2, "codec": "compact", "roles": roles,
                "relation": {"cosine_sum": sum(c), "cosine_min": min(c) if c else None, "samples": len(c)}}

    merged = merged_fidelity([sums(0), None, sums(1)])
    assert merged["num_samples"] == 4 and merged["codec"] == "compact"
    assert merged["response"] == {"kl_mean_nats": pytest.approx(0.3), "kl_max_nats": 0.5, "rows": 3}
    assert merged["visual"] == {"kl_mean_nats": pytest.approx(0.5), "kl_max_nats": 0.9, "rows": 3}
    assert merged["relation"] == {"cosine_min": 0.97, "cosine_mean": pytest.approx(0.98), "samples": 2}
    assert merged_fidelity([None]) is None
    schema.check_manifest({"format": "kdcache", "format_version": 2, "topk": {"response": 1, "visual": 1},
                           "num_samples": 0, "shards": [], "codec": "compact",
                           "codecs": schema.column_codecs("compact"), "fidelity": merged}, "merged")
