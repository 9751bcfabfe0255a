"""`kdcache dump` end to end on a tiny teacher: targets against a dense float64 reference, bad samples,
resume after SIGKILL, and a 2-process torchrun dump equal to a 1-process one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from kdcache import models, samples, targets
from kdcache.errors import KdcacheError, SampleError
from kdcache.reader import CacheReader, verify_cache
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump

REPO = Path(__file__).resolve().parents[1]


def run_dump(teacher, data, images, out, **overrides) -> dict:
    cfg = DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), device="cpu",
                     dtype="float32", progress=False, **overrides)
    return dump(cfg)


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
    assert manifest["format"] == "kdcache" and manifest["format_version"] == 1
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
        run_dump("toy-teacher", data, images, tmp_path / "cache")


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
