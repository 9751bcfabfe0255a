"""`kdcache dump` end to end on a tiny teacher: targets against a dense float64 reference, bad samples,
resume after SIGKILL, and a 2-process torchrun dump equal to a 1-process one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from kdcache import models, samples, targets
from kdcache import writer as writer_module
from kdcache.errors import KdcacheError, SampleError
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.writer import completed_sample_ids
from teacher_dump import dump as dump_module
from teacher_dump import forward, prepare
from teacher_dump.config import DumpConfig

from train_runs import run_dump

REPO = Path(__file__).resolve().parents[1]


def by_id(cache) -> dict[str, dict]:
    reader = CacheReader(cache, verify=True)
    return {s["sample_id"]: s for s in reader}


def test_dump_targets_match_a_dense_float64_reference(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=5, text_only=1)
    run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=16, topk_visual=8, batch_size=2)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_teacher_dir, dtype=torch.float64).eval()
    bundle = models.load_bundle(str(tiny_teacher_dir))
    for record in samples.load_records(data):
        stored = by_id(tmp_path / "cache")[record.sample_id]
        ids = torch.from_numpy(stored["input_ids"].astype(np.int64))[None]
        pixels = None
        if record.image is not None:
            image = Image.open(images / record.image)
            pixels = samples.pixel_values([image], bundle.image_processor).double()
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0]            # (T, V) float64
        logprobs = torch.log_softmax(logits, dim=-1)
        for rows, key in ((stored["response_rows"], "response"),
                          (np.arange(stored["visual_start"], stored["visual_start"] + stored["visual_len"]), "visual")):
            got_ids = torch.from_numpy(stored[f"{key}_topk_ids"].astype(np.int64))
            got = torch.from_numpy(stored[f"{key}_topk_logprobs"].astype(np.float64))
            ref = logprobs[torch.from_numpy(np.asarray(rows, dtype=np.int64))]        # (R, V)
            k = got_ids.shape[1]
            assert got_ids.shape[0] == len(rows)
            # the stored values are the reference log-probs of the stored ids, to float16 rounding
            at_ids = ref.gather(1, got_ids)
            assert torch.allclose(got, at_ids, rtol=2 ** -10, atol=1e-3)
            # and the stored ids are a top-k set of the reference (descending)
            assert torch.allclose(at_ids, ref.topk(k, dim=-1).values, atol=1e-6)
            assert bool((got[:, :-1] >= got[:, 1:]).all())
        if record.image is None:
            assert stored["relation"] is None and stored["visual_len"] == 0
            continue
        vs, vl = stored["visual_start"], stored["visual_len"]
        y = logits[vs: vs + vl]                                                       # (L, V)
        exact = y @ y.T
        restored = targets.unpack_upper(torch.from_numpy(stored["relation"].astype(np.float64)), vl)
        cos = torch.nn.functional.cosine_similarity(restored.flatten(), exact.flatten(), dim=0)
        assert cos >= 0.9999
        assert stored["relation_norm"] == pytest.approx(float(exact.norm()), rel=1e-4)


def test_dump_writes_a_manifest_that_describes_the_cache(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=3)
    manifest = run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=4, topk_visual=3)
    on_disk = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert on_disk == manifest
    bundle = models.load_bundle(str(tiny_teacher_dir))
    assert manifest["format"] == "kdcache" and manifest["format_version"] == 2 and manifest["codec"] == "lossless"
    assert manifest["tokenizer"]["fingerprint"] == models.tokenizer_fingerprint(bundle.tokenizer)
    assert manifest["tokenizer_size"] == len(bundle.tokenizer) == manifest["vocab_size"] == 600   # an unpadded head
    assert manifest["visual_len"] == models.visual_len_of(bundle.model.config)
    assert manifest["topk"] == {"response": 4, "visual": 3}
    assert manifest["num_samples"] == 3 and manifest["dataset"]["fingerprint"].startswith("sha256:")
    assert 0 < manifest["stats"]["mean_tail_mass"]["response"] < 1
    assert not (tmp_path / "cache" / "_parts").exists()
    assert verify_cache(tmp_path / "cache") == []


def test_dump_refuses_a_teacher_with_an_untrained_projector(toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    with pytest.raises(KdcacheError, match="untrained projector"):
        run_dump("toy-student", data, images, tmp_path / "cache")      # a fresh projector (toy-teacher's is trained)


def test_dump_names_a_sample_with_a_missing_image(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=3)
    (images / "img-001.png").unlink()
    with pytest.raises(SampleError, match="sample-1"):
        run_dump(tiny_teacher_dir, data, images, tmp_path / "cache")


def test_dump_skips_bad_samples_and_lists_them_in_the_manifest(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=4)
    (images / "img-001.png").write_bytes(b"not a png")                      # corrupt image
    records = json.loads(data.read_text())
    records[2]["conversations"] = []                                         # empty conversation
    data.write_text(json.dumps(records))
    manifest = run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", skip_bad=True, max_length=4096)
    assert manifest["num_samples"] == 2
    assert sorted(s["sample_id"] for s in manifest["skipped"]) == ["sample-1", "sample-2"]
    assert all(s["reason"] for s in manifest["skipped"])


def test_dump_names_a_sample_over_the_length_limit(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    with pytest.raises(SampleError, match="sample-0.*max_length"):
        run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", max_length=20)


def test_dump_refuses_to_resume_with_different_settings(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    (tmp_path / "cache" / "_parts").mkdir(parents=True)
    (tmp_path / "cache" / "_parts" / "dump-config.json").write_text(json.dumps({"topk": {"response": 1}}))
    with pytest.raises(KdcacheError, match="different settings"):
        run_dump(tiny_teacher_dir, data, images, tmp_path / "cache")


def cli(*args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_dump_killed_with_sigkill_resumes_with_every_sample_exactly_once(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=60, text_only=4)
    out = tmp_path / "cache"
    args = ["dump", "--teacher", tiny_teacher_dir, "--data", data, "--images", images, "--out", out,
            "--batch-size", "1", "--shard-size", "0.001", "--device", "cpu", "--topk", "8"]
    proc = cli(*args)
    deadline = time.time() + 120
    while len(list(out.glob("shard-*.arrow"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the dump finished before it could be killed; make shards smaller"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    assert len(list(out.glob("shard-*.arrow"))) >= 2
    done = cli(*args)
    output = done.communicate(timeout=300)[0]
    assert done.returncode == 0, output
    stored = [s["sample_id"] for s in CacheReader(out, verify=True)]
    assert sorted(stored) == sorted(r.sample_id for r in samples.load_records(data))
    assert len(stored) == len(set(stored)) == 60
    assert verify_cache(out) == []
    assert not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_two_process_torchrun_dump_equals_one_process_dump(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=7, text_only=2)
    common = ["--teacher", tiny_teacher_dir, "--data", data, "--images", images, "--batch-size", "1",
              "--device", "cpu", "--topk", "8"]
    one = cli("dump", *common, "--out", tmp_path / "one")
    assert one.wait(timeout=300) == 0, one.stdout.read()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29533", "-m", "kdcache.cli", "dump", *map(str, common),
                          "--out", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {Path(s["path"]).name[:10] for s in manifest["shards"]} == {"shard-r000", "shard-r001"}
    a, b = by_id(tmp_path / "one"), by_id(tmp_path / "two")
    assert sorted(a) == sorted(b)
    for sample_id, left in a.items():
        right = b[sample_id]
        for key, value in left.items():
            if isinstance(value, np.ndarray) and value.dtype == np.float16:
                np.testing.assert_allclose(value.astype(np.float32), right[key].astype(np.float32),
                                           rtol=2 ** -9, atol=2e-3, err_msg=f"{sample_id} {key}")
            elif isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, right[key], err_msg=f"{sample_id} {key}")
            elif isinstance(value, float):
                assert value == pytest.approx(right[key], rel=1e-5)
            else:
                assert value == right[key], (sample_id, key)


# --- the overlapped dump: a serial dump's bytes, and a failure in any of its three stages


@pytest.fixture
def deadline():
    """Fail (not hang) a test whose background threads would wait forever: SIGALRM after 120 s."""
    def expired(*_):
        raise TimeoutError("the dump did not finish within 120 s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def dump_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("kdcache-")]


def slow_writer(monkeypatch, seconds: float = 0.2) -> None:
    """The writing thread takes `seconds` per sample: at a failure elsewhere, earlier batches are still queued."""
    coerce = writer_module.coerce_sample
    monkeypatch.setattr(writer_module, "coerce_sample", lambda sample, **kw: time.sleep(seconds) or coerce(sample, **kw))


def serial_dump(teacher, records, cfg, writer) -> list[dict]:
    """The dump loop as it was before its stages overlapped: prepare, forward, targets, write, one after another."""
    skipped, good = [], []
    for record in records:
        try:
            good.append(prepare.prepare(record, cfg, teacher))
        except SampleError as e:
            skipped.append({"sample_id": e.sample_id, "reason": e.reason})
    for batch in prepare.batched(good, cfg.batch_size):
        inputs = prepare.model_inputs(batch, teacher)
        pixels = inputs["pixel_values"]
        with torch.inference_mode():
            hidden = models.final_hidden_states(teacher.model, inputs["input_ids"].to(teacher.device),
                                                inputs["attention_mask"].to(teacher.device),
                                                None if pixels is None else pixels.to(teacher.device, teacher.dtype))
            rows = {"response": [hidden[b, p.sequence.response_rows] for b, p in enumerate(batch)],
                    "visual": [hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len]
                               for b, p in enumerate(batch)]}
            k = {"response": cfg.topk_response, "visual": cfg.topk_visual}
            per_role = {role: targets.topk_logprobs(torch.cat(r), teacher.lm_head, k=k[role], chunk_rows=cfg.chunk_rows)
                        for role, r in rows.items()}
            for b, p in enumerate(batch):
                sample = {"sample_id": p.sample_id, "input_ids": np.asarray(p.sequence.input_ids, np.int32),
                          "response_rows": np.asarray(p.sequence.response_rows, np.int32),
                          "visual_start": p.sequence.visual_start, "visual_len": p.sequence.visual_len,
                          "image": p.image_bytes, "relation": None, "relation_norm": None,
                          "image_sha256": None if p.image_bytes is None else hashlib.sha256(p.image_bytes).digest()}
                if p.sequence.visual_len:
                    packed, sample["relation_norm"] = targets.normalized_relation(
                        targets.relation_from_hidden(rows["visual"][b], teacher.gram))
                    sample["relation"] = packed.cpu().numpy()
                for role, (ids, logprobs) in per_role.items():
                    start, n = sum(r.shape[0] for r in rows[role][:b]), rows[role][b].shape[0]
                    sample[f"{role}_topk_ids"] = ids[start: start + n].to(torch.int32).cpu().numpy()
                    sample[f"{role}_topk_logprobs"] = logprobs[start: start + n].half().cpu().numpy()
                writer.write(sample)
    return skipped


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32),
    pytest.param("cuda", torch.float32, marks=CUDA),     # pinned inputs, non-blocking copies both ways
    pytest.param("cuda", torch.bfloat16, marks=CUDA),    # and the tensor-core LM head
])
def test_the_overlapped_dump_writes_the_bytes_of_a_serial_dump(device, dtype, tiny_teacher_dir, toy_dataset, tmp_path,
                                                               deadline):
    data, images = toy_dataset(count=11, text_only=2)
    (images / "img-004.png").write_bytes(b"not a png")                       # skipped, in the middle of a batch
    bundle = models.load_bundle(str(tiny_teacher_dir), dtype=dtype)
    teacher = forward.Teacher.from_bundle(bundle, device=torch.device(device), dtype=dtype, relation=True)
    records = samples.load_records(data)
    shards = {}
    for name, loop in (("overlapped", dump_module.dump_records), ("serial", serial_dump)):
        cfg = DumpConfig(teacher="t", data=str(data), images=str(images), out=str(tmp_path / name), batch_size=3,
                         topk_response=8, topk_visual=5, skip_bad=True, shard_size_mb=0.004, progress=False)
        with dump_module.open_writer(cfg, rank=0) as writer:
            skipped = loop(teacher, records, cfg, writer)
        assert [s["sample_id"] for s in skipped] == ["sample-4"]
        shards[name] = {p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("shard-*.arrow"))}
    assert len(shards["serial"]) >= 3
    assert shards["overlapped"] == shards["serial"]
    assert dump_threads() == []


def test_an_error_in_the_background_preparation_names_the_sample_and_leaves_a_resumable_cache(
        tiny_teacher_dir, toy_dataset, tmp_path, monkeypatch, deadline):
    data, images = toy_dataset(count=10)
    original, threads = prepare.read_image, set()

    def failing(record, cfg):                   # runs in the decoding threads, behind the preparing one
        threads.add(threading.current_thread().name)
        if record.sample_id == "sample-6":
            raise SampleError(record.sample_id, "image unreadable (injected)")
        return original(record, cfg)

    monkeypatch.setattr(prepare, "read_image", failing)
    slow_writer(monkeypatch)
    out = tmp_path / "cache"
    with pytest.raises(SampleError, match="'sample-6': image unreadable"):
        run_dump(tiny_teacher_dir, data, images, out, batch_size=1, topk_response=4, topk_visual=4,
                 shard_size_mb=0.001)
    assert threads and all(name.startswith("kdcache-decode") for name in threads)
    assert dump_threads() == []
    # as a serial dump: samples 0-3 filled a record batch and a shard; 4 and 5 were still buffered (discarded)
    assert completed_sample_ids(out) == {f"sample-{i}" for i in range(4)}
    assert not list(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    monkeypatch.setattr(prepare, "read_image", original)
    run_dump(tiny_teacher_dir, data, images, out, batch_size=1, topk_response=4, topk_visual=4, shard_size_mb=0.001)
    assert sorted(s["sample_id"] for s in CacheReader(out, verify=True)) == sorted(f"sample-{i}" for i in range(10))
    assert verify_cache(out) == []


@pytest.mark.parametrize("fault", ["sample", "arrow"])
def test_an_error_in_the_background_writer_names_the_sample_and_leaves_a_resumable_cache(
        fault, tiny_teacher_dir, toy_dataset, tmp_path, monkeypatch, deadline):
    data, images = toy_dataset(count=10)
    original, threads = writer_module.coerce_sample, set()

    def failing(sample, **kwargs):              # runs in the writing thread
        threads.add(threading.current_thread().name)
        if sample["sample_id"] == "sample-5":
            if fault == "sample":
                raise SampleError("sample-5", "a value out of range (injected)")
            raise pa.ArrowInvalid("buffer too small (injected)")
        return original(sample, **kwargs)

    monkeypatch.setattr(writer_module, "coerce_sample", failing)
    out = tmp_path / "cache"
    message = "'sample-5': a value out of range" if fault == "sample" else "'sample-5': writing its record failed: buffer"
    with pytest.raises(KdcacheError, match=message):
        run_dump(tiny_teacher_dir, data, images, out, batch_size=2, topk_response=4, topk_visual=4,
                 shard_size_mb=0.001)
    assert threads == {"kdcache-write"} and dump_threads() == []
    assert completed_sample_ids(out) == {f"sample-{i}" for i in range(4)}
    assert not list(out.glob("*.tmp"))
    monkeypatch.setattr(writer_module, "coerce_sample", original)
    run_dump(tiny_teacher_dir, data, images, out, batch_size=2, topk_response=4, topk_visual=4, shard_size_mb=0.001)
    assert len(CacheReader(out, verify=True)) == 10 and verify_cache(out) == []


def test_an_error_in_the_teacher_forward_names_the_batch_and_still_writes_the_batches_before_it(
        tiny_teacher_dir, toy_dataset, tmp_path, monkeypatch, deadline):
    data, images = toy_dataset(count=10)
    calls, forward = [], models.final_hidden_states

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 2.00 GiB (injected)")
        return forward(*args)

    monkeypatch.setattr(models, "final_hidden_states", failing)
    slow_writer(monkeypatch)
    out = tmp_path / "cache"
    with pytest.raises(KdcacheError, match=r"^samples \['sample-4', 'sample-5'\]: the teacher forward or its targets "
                                           r"failed: CUDA out of memory. Tried to allocate"):
        run_dump(tiny_teacher_dir, data, images, out, batch_size=2, topk_response=4, topk_visual=4,
                 shard_size_mb=0.001)
    assert dump_threads() == []
    assert completed_sample_ids(out) == {f"sample-{i}" for i in range(4)}    # batches 1 and 2 reached the shard


def test_a_non_finite_relation_names_its_sample(tiny_teacher_dir, toy_dataset, tmp_path, monkeypatch, deadline):
    data, images = toy_dataset(count=3)
    relation = targets.relation_from_hidden
    monkeypatch.setattr(targets, "relation_from_hidden", lambda h, g: relation(h, g) * float("inf"))
    with pytest.raises(KdcacheError, match="'sample-0': relation matrix has non-finite entries"):
        run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=4, topk_visual=4)
    assert dump_threads() == []
