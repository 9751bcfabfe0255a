"""Caches behind URLs (issue 11), continued: push, pull and check against moto's S3 server; a server killed
mid-training (one line; --resume continues loss for loss); the prefetcher's order. Real loopback servers,
nothing of the network mocked (tests/remote_world.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from kdcache import models
from kdcache.errors import KdcacheError
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.sampler import ResumableSampler
from kdcache.shardcache import Prefetcher
from kdcache.transfer import pull_cache, push_cache

from remote_world import (BUCKET, REPO, cli, identity_of_cache, pushed, remote_config,
                          run_train, s3_options, shard_gets, the_error)


# --- F. push, pull, check


def test_push_uploads_shards_then_seal_then_manifest_resumes_and_refuses_another_cache(remote_cache, s3, tmp_path):
    url = f"s3://{BUCKET}/kd"
    config = remote_config(tmp_path, s3)
    identity = push_cache(remote_cache["cache"], url, remote=config)                       # then verifies the copy
    puts = [key for key in s3.requests()["counts"] if key.startswith("PUT ")]
    assert puts[-2:] == [f"PUT /{BUCKET}/kd/manifest.sha256", f"PUT /{BUCKET}/kd/manifest.json"], puts
    assert shard_gets(s3, f"/{BUCKET}/kd") == {e["path"]: 1 for e in remote_cache["manifest"]["shards"]}  # the check
    assert identity == identity_of_cache(remote_cache["cache"])
    s3.reset()
    assert push_cache(remote_cache["cache"], url, remote=config, verify=False) == identity    # already there: no upload
    assert not [key for key in s3.requests()["counts"] if key.startswith("PUT ")]
    small = tmp_path / "small"
    pull_cache(remote_cache["cache"], small, shards=2)
    with pytest.raises(KdcacheError, match="already holds another cache"):
        push_cache(small, url, remote=config)


def test_pull_mirrors_or_cuts_a_valid_smaller_cache_and_resumes(remote_cache, s3, tmp_path):
    url = pushed(remote_cache, s3, tmp_path)
    config = remote_config(tmp_path, s3)
    mirror = tmp_path / "mirror"
    assert pull_cache(url, mirror, remote=config)["num_samples"] == 24
    assert identity_of_cache(mirror) == identity_of_cache(remote_cache["cache"]) and verify_cache(mirror) == []
    part = tmp_path / "part"
    manifest = pull_cache(url, part, remote=config, samples=10)                      # 4 + 4 + 2 of the third
    assert manifest["num_samples"] == 10 and [e["num_samples"] for e in manifest["shards"]] == [4, 4, 2]
    assert manifest["origin"] == {"url": url, "manifest_sha256": identity_of_cache(remote_cache["cache"]),
                                  "num_samples": 24, "shards": 6}
    assert verify_cache(part) == [] and len(CacheReader(part, for_training=True)) == 10
    ids = [CacheReader(part).read_sample(i)["sample_id"] for i in range(10)]
    assert ids == [CacheReader(remote_cache["cache"]).read_sample(i)["sample_id"] for i in range(10)]

    resumed = tmp_path / "resumed"                                    # an interrupted pull: 2 shards, one cut short
    resumed.mkdir()
    plan = {"origin": url, "manifest_sha256": identity_of_cache(remote_cache["cache"]), "shards": 4, "samples": None}
    (resumed / "_pull.json").write_text(json.dumps(plan))
    for entry in remote_cache["manifest"]["shards"][:2]:
        shutil.copy(remote_cache["cache"] / entry["path"], resumed / entry["path"])
    (resumed / remote_cache["manifest"]["shards"][1]["path"]).write_bytes(b"cut")
    s3.reset()
    assert pull_cache(url, resumed, remote=config, shards=4)["num_samples"] == 16
    first = remote_cache["manifest"]["shards"][0]["path"]
    assert first not in shard_gets(s3, f"/{BUCKET}/kd") and len(shard_gets(s3, f"/{BUCKET}/kd")) == 3
    assert verify_cache(resumed) == [] and not (resumed / "_pull.json").exists()
    with pytest.raises(KdcacheError, match="not empty"):
        pull_cache(url, mirror, remote=config)


def test_check_reads_only_the_manifest_and_says_whether_a_student_fits(remote_cache, s3, tmp_path):
    url = pushed(remote_cache, s3, tmp_path)
    flags = [arg for option in s3_options(s3) for arg in ("--storage-option", option)]
    fits = cli("check", "--student", remote_cache["student"], "--cache", url, *flags)
    assert fits.returncode == 0 and "fits this cache" in fits.stdout, fits.stderr[-3000:]
    misfit = tmp_path / "misfit"                                      # another image size: other pixels
    bundle = models.load_bundle(str(remote_cache["student"]))
    bundle.image_processor.size = {"height": 48, "width": 48}
    models.save_bundle(bundle, misfit, stages=bundle.stages)
    error = the_error(cli("check", "--student", misfit, "--cache", url, *flags))
    assert "does not match student" in error and "image processor size" in error
    counts = s3.requests()["counts"]
    assert not [key for key in counts if "shard-" in key], counts       # no shard was touched


# --- G. the server dies mid-training: one line; once it is back, --resume continues loss for loss


def test_a_server_killed_mid_training_is_one_line_and_the_resumed_run_equals_an_uninterrupted_one(
        remote_cache, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    url = f"{server.url}/kd"
    settings = dict(batch_size=2, global_batch=2, lr=1e-3, seed=3, save_every=2, max_steps=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as in the subprocesses (OMP_NUM_THREADS=1): same arithmetic
    try:                                           # the uninterrupted reference, from the local copy
        run_train(remote_cache, tmp_path / "whole", remote_cache["cache"], remote_config(tmp_path), **settings)
    finally:
        torch.set_num_threads(threads)
    args = ["train", "--stage", "dpt", "--student", remote_cache["student"], "--cache", url, "--out", tmp_path / "run",
            "--batch-size", "2", "--global-batch", "2", "--lr", "1e-3", "--seed", "3", "--save-every", "2",
            "--device", "cpu", "--num-workers", "0", "--prefetch-shards", "0", "--cache-dir", tmp_path / "c",
            "--net-timeout", "2", "--net-retries", "1", "--net-backoff", "0.1", "--no-progress"]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.01)
    server.stop()                                  # after step 1: later steps need shards not fetched yet
    stdout, stderr = proc.communicate(timeout=120)
    error = the_error(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    assert f"{url}/shard-r000-" in error and "cannot download: cannot connect" in error, error
    steps_done = metrics.read_text().count("\n")
    assert 1 <= steps_done < 12 and not (tmp_path / "run" / "final").exists()

    back = server.restart()                        # the same files on the same port
    try:
        resumed = cli(*args, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    finally:
        back.stop()
    expected = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in got] == list(range(1, 13))
    for a, b in zip(expected, got):                # CPU, one thread: bit-identical
        for key in ("loss", "ce", "kl_response", "kl_visual", "relation", "lr", "samples_seen"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])


def test_the_prefetcher_follows_this_ranks_sampler_order_from_where_the_loader_is(remote_cache, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    reader = CacheReader(f"{server.url}/kd", remote=remote_config(tmp_path))
    sampler = ResumableSampler([e["num_samples"] for e in reader.shards], seed=5, rank=1, world_size=2, batch_size=2)
    prefetcher = Prefetcher(reader, sampler, depth=3)              # not started: its choice only

    def next_shards(order: list[int]) -> list[int]:
        shards = [reader.locate(i)[0] for i in order]
        return list(dict.fromkeys(shards))[:3]

    assert prefetcher.upcoming() == next_shards(list(sampler))
    sampler.advance(10)                                            # the loader handed out 10 samples (all ranks)
    assert prefetcher.upcoming() == next_shards(list(sampler))
    sampler.advance(sampler.epoch_samples - 10 - 2)                # into the epoch's last step: then the next epoch
    following = ResumableSampler(sampler.shard_sizes, seed=5, rank=1, world_size=2, batch_size=2)
    following.set_epoch(1)
    assert prefetcher.upcoming() == next_shards(list(sampler) + list(following))
