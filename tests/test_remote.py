"""Caches behind URLs (issue 11), against real loopback servers started and stopped here: moto's S3 server
and the standard library's `http.server` (no Range support), each a subprocess on 127.0.0.1 that counts
the requests it answers (tests/servers.py). Nothing of the network is mocked. The servers, the cache and
the helpers: tests/remote_world.py (the fixtures s3, http_dir, remote_cache: tests/conftest.py); push, pull, check and a
server killed mid-training: test_remote_transfer.py."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
import s3fs
from remote_world import (BUCKET, KEY, REPO, SECRET, cli, identity_of_cache, pushed, remote_config, run_train,
                          s3_options, shard_gets, the_error)
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.errors import CacheError, KdcacheError
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.remote import RemoteConfig, parse_storage_options, redacted
from kdcache.transfer import pull_cache



# --- A. the servers themselves


def test_the_http_server_ignores_range_and_both_servers_count_requests_per_path(s3, http_dir):
    server, root = http_dir
    (root / "blob.bin").write_bytes(bytes(range(256)) * 64)
    request = urllib.request.Request(f"{server.url}/blob.bin", headers={"Range": "bytes=0-9"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and len(response.read()) == 256 * 64      # the whole file: no Range
    urllib.request.urlopen(f"{server.url}/blob.bin", timeout=10).read()
    assert server.requests()["counts"] == {"GET /blob.bin": 2}
    server.reset()
    assert server.requests()["counts"] == {}

    fs = s3fs.S3FileSystem(endpoint_url=s3.url, key=KEY, secret=SECRET, skip_instance_cache=True)
    fs.pipe(f"{BUCKET}/a/b.txt", b"hello")
    assert fs.cat(f"{BUCKET}/a/b.txt") == b"hello"
    seen = s3.requests()
    assert seen["counts"][f"PUT /{BUCKET}/a/b.txt"] == 1 and seen["counts"][f"GET /{BUCKET}/a/b.txt"] == 1
    assert seen["bytes"][f"GET /{BUCKET}/a/b.txt"] == 5


# --- B. storage options


def test_storage_options_are_parsed_nested_and_redacted_and_bad_ones_refused_in_one_line():
    assert parse_storage_options(["endpoint_url=http://h:1/x=y", "anon=TRUE", "client_kwargs.region_name=eu",
                                  'config_kwargs={"max_pool_connections": 4}', "key=0123"]) == {
        "endpoint_url": "http://h:1/x=y", "anon": True, "client_kwargs": {"region_name": "eu"},
        "config_kwargs": {"max_pool_connections": 4}, "key": "0123"}
    assert redacted(["key=AKIA", "secret=xyz", "endpoint_url=http://h", "client_kwargs.token=t"]) == [
        "key=***", "secret=***", "endpoint_url=http://h", "client_kwargs.token=***"]
    with pytest.raises(KdcacheError, match="KEY=VALUE"):
        RemoteConfig(storage_option=("no-equals-sign",))
    result = CliRunner().invoke(app, ["inspect", "s3://b/c", "--storage-option", "=x"])
    assert result.exit_code == 1 and "expected KEY=VALUE" in result.output


def test_push_with_flags_then_inspect_and_verify_with_the_standard_environment_variables(remote_cache, s3, tmp_path):
    url = f"s3://{BUCKET}/kd"
    flags = [arg for option in s3_options(s3) for arg in ("--storage-option", option)]
    pushed_ = cli("push", remote_cache["cache"], url, *flags, "--cache-dir", tmp_path / "c1")
    assert pushed_.returncode == 0, pushed_.stderr[-3000:]
    identity = "sha256:" + hashlib.sha256((remote_cache["cache"] / "manifest.json").read_bytes()).hexdigest()
    assert identity in pushed_.stdout
    env = {"AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1"}
    inspected = cli("inspect", url, env=env)
    assert inspected.returncode == 0 and identity in inspected.stdout, inspected.stderr[-3000:]
    verified = cli("verify", url, "--cache-dir", tmp_path / "c2", "--expect-manifest", identity, env=env)
    assert verified.returncode == 0 and f"ok (manifest {identity})" in verified.stdout, verified.stderr[-3000:]
    # the run record and config.yaml never hold a secret
    run = tmp_path / "run"
    run_train(remote_cache, run, url, remote_config(tmp_path, s3, storage_option=(*s3_options(s3),)))
    assert SECRET not in (run / "config.yaml").read_text() and SECRET not in (run / "run.json").read_text()


# --- C. network faults: one line naming the URL and the cause, within the configured time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_http_server_is_a_connection_error_after_bounded_retries_not_a_missing_manifest():
    url = f"http://127.0.0.1:{free_port()}/caches/kd"              # nothing listens there
    start = time.monotonic()
    result = cli("inspect", url, "--net-retries", "2", "--net-backoff", "0.2")
    error = the_error(result)
    assert f"{url}/manifest.json: cannot read: cannot connect" in error and "after 3 attempts" in error, error
    assert "no manifest.json" not in error
    assert 0.6 <= time.monotonic() - start < 60                      # backoff 0.2 + 0.4 s between the 3 attempts
    assert "no manifest.json" in the_error(cli("inspect", str(REPO / "nowhere")))


def test_a_frozen_server_ends_inspect_verify_and_train_within_the_timeout(remote_cache, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    url = f"{server.url}/kd"
    server.freeze()
    for command in (["inspect", url], ["verify", url, "--cache-dir", tmp_path / "c"],
                    ["train", "--stage", "dpt", "--student", remote_cache["student"], "--cache", url, "--out",
                     tmp_path / "run", "--device", "cpu", "--num-workers", "0", "--cache-dir", tmp_path / "c"]):
        start = time.monotonic()
        result = cli(*command, "--net-timeout", "1", "--net-retries", "1", "--net-backoff", "0.1", timeout=120)
        elapsed = time.monotonic() - start
        error = the_error(result)
        assert f"{url}/manifest.json" in error and "no answer within 1 s" in error, error
        assert elapsed < 2 * 1 + 0.1 + 30, (command[0], elapsed)     # 2 attempts of 1 s, a backoff, start-up


def test_a_frozen_server_mid_download_and_a_stopped_s3_server_are_one_line_errors(remote_cache, s3, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    config = remote_config(tmp_path, net_timeout=1.0, net_retries=1)
    reader = CacheReader(f"{server.url}/kd", remote=config)          # the manifest is read ...
    server.freeze()                                                   # ... then the server stops answering
    start = time.monotonic()
    with pytest.raises(CacheError) as caught:
        reader.read_sample(0)
    assert time.monotonic() - start < 2 * 1 + 0.1 + 5
    assert f"{server.url}/kd/shard-r000-00000.arrow: cannot download: no answer within 1 s" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not [p for p in (tmp_path / "shard-cache").rglob("*") if p.suffix in (".arrow", ".part")]   # none kept

    url = pushed(remote_cache, s3, tmp_path)
    s3.stop()
    error = the_error(cli("verify", url, *[a for o in s3_options(s3) for a in ("--storage-option", o)],
                          "--net-retries", "1", "--net-backoff", "0.1", "--cache-dir", tmp_path / "c"))
    assert f"{url}/manifest.json: cannot read: cannot connect" in error, error


# --- D. the shard cache: once per machine, verified before first use, bounded, shared


def test_training_with_two_workers_from_s3_fetches_each_shard_once_then_none_from_a_warm_cache(remote_cache, s3, tmp_path):
    url = pushed(remote_cache, s3, tmp_path)
    config = remote_config(tmp_path, s3)
    run_train(remote_cache, tmp_path / "cold", url, config, num_workers=2, max_steps=12)     # one epoch: every shard
    counts, sent = shard_gets(s3, f"/{BUCKET}/kd"), s3.requests()["bytes"]
    assert counts == {entry["path"]: 1 for entry in remote_cache["manifest"]["shards"]}, counts
    moved = sum(n for key, n in sent.items() if key.startswith("GET "))
    assert moved <= 1.05 * remote_cache["manifest"]["stats"]["num_bytes"] + 64 * 1024          # + the manifest
    identity = "sha256:" + hashlib.sha256((remote_cache["cache"] / "manifest.json").read_bytes()).hexdigest()
    cached = tmp_path / "shard-cache" / identity.removeprefix("sha256:") / "shards"
    assert sorted(p.name for p in cached.glob("*.arrow")) == [e["path"] for e in remote_cache["manifest"]["shards"]]
    s3.reset()
    run_train(remote_cache, tmp_path / "warm", url, config, num_workers=2, max_steps=12)
    assert shard_gets(s3, f"/{BUCKET}/kd") == {}                       # another run, same machine: nothing moves
    metrics = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("cold", "warm")]
    assert [json.loads(m)["loss"] for m in metrics[0]] == [json.loads(m)["loss"] for m in metrics[1]]


def test_a_corrupted_shard_on_the_server_is_refused_in_one_line_and_not_kept(remote_cache, s3, tmp_path):
    url = pushed(remote_cache, s3, tmp_path)
    fs = s3fs.S3FileSystem(endpoint_url=s3.url, key=KEY, secret=SECRET, skip_instance_cache=True)
    first = remote_cache["manifest"]["shards"][0]["path"]
    data = bytearray(fs.cat(f"{BUCKET}/kd/{first}"))
    data[len(data) // 2] ^= 0x01                                        # same size, one bit
    fs.pipe(f"{BUCKET}/kd/{first}", bytes(data))
    config = remote_config(tmp_path, s3)
    with pytest.raises(CacheError) as caught:
        CacheReader(url, remote=config).read_sample(0)
    message = str(caught.value)
    assert f"{url}/{first}: downloaded" in message and "sha256" in message and "nothing was kept" in message
    assert "\n" not in message and not [p for p in (tmp_path / "shard-cache").rglob("*") if p.suffix in (".arrow", ".part")]
    faults = verify_cache(url, quick=True, remote=config)
    assert len(faults) == 1 and first in faults[0] and "sha256" in faults[0]


def test_the_shard_cache_evicts_least_recently_used_unpinned_shards_beyond_its_limit(remote_cache, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    entries = remote_cache["manifest"]["shards"]
    largest = max(e["num_bytes"] for e in entries)
    config = remote_config(tmp_path, cache_size_gb=2.5 * largest / 2**30)   # room for two shards
    reader = CacheReader(f"{server.url}/kd", remote=config)
    cache = reader.shard_cache
    _, pin = cache.acquire(entries[0])                                  # in use: never evicted
    for entry in entries[1:4]:
        cache.fetch(entry)
    assert [cache.present(e) for e in entries[:4]] == [True, False, False, True]
    pin.release()
    cache.fetch(entries[4])
    assert [cache.present(e) for e in entries[:5]] == [False, False, False, True, True]
    assert shard_gets(server, "/kd") == {e["path"]: 1 for e in entries[:5]}


def test_a_plain_http_server_without_range_serves_training_and_verify(remote_cache, http_dir, tmp_path):
    server, root = http_dir
    shutil.copytree(remote_cache["cache"], root / "kd")
    url = f"{server.url}/kd"
    run_train(remote_cache, tmp_path / "run", url, remote_config(tmp_path), num_workers=2, max_steps=12)
    assert shard_gets(server, "/kd") == {entry["path"]: 1 for entry in remote_cache["manifest"]["shards"]}
    assert verify_cache(url, remote=remote_config(tmp_path)) == []      # from the warm shard cache
    assert shard_gets(server, "/kd") == {entry["path"]: 1 for entry in remote_cache["manifest"]["shards"]}


# --- E. identity: the manifest's sha256, sealed, pinned, recorded in checkpoints


def test_verify_catches_an_edited_manifest_and_the_pin_refuses_another_cache(remote_cache, tmp_path):
    cache = Path(shutil.copytree(remote_cache["cache"], tmp_path / "cache"))
    identity = identity_of_cache(cache)
    assert (cache / "manifest.sha256").read_text() == f"{identity[7:]}  manifest.json\n"   # sha256sum's format
    assert verify_cache(cache, remote=RemoteConfig(expect_manifest=identity)) == []
    for edit in (lambda m: m["shards"].pop(), lambda m: m["shards"][0].update(sha256="0" * 64),
                 lambda m: m.update(num_samples=m["num_samples"])):              # even a rewrite of the same values
        manifest = json.loads((cache / "manifest.json").read_text())
        edit(manifest)
        if manifest["shards"] and len(manifest["shards"]) < 6:
            manifest["num_samples"] = sum(e["num_samples"] for e in manifest["shards"])
        (cache / "manifest.json").write_text(json.dumps(manifest))
        faults = verify_cache(cache, quick=True)
        assert any("differs from the" in f and "manifest.sha256" in f for f in faults), faults
    shutil.copy(remote_cache["cache"] / "manifest.json", cache / "manifest.json")
    (cache / "manifest.sha256").unlink()
    assert "manifest.sha256: missing" in verify_cache(cache, quick=True)[0]

    other = "sha256:" + "1" * 64
    with pytest.raises(CacheError, match="not the 1111.* that --expect-manifest pins"):
        CacheReader(remote_cache["cache"], remote=RemoteConfig(expect_manifest=other))
    error = the_error(cli("train", "--stage", "dpt", "--student", remote_cache["student"], "--cache", remote_cache["cache"],
                          "--out", tmp_path / "run", "--device", "cpu", "--expect-manifest", other))
    assert "--expect-manifest pins" in error and not (tmp_path / "run" / "checkpoints").exists()


def test_checkpoints_record_the_cache_and_a_resume_from_another_cache_is_refused(remote_cache, s3, tmp_path):
    url = pushed(remote_cache, s3, tmp_path)
    run = tmp_path / "run"
    run_train(remote_cache, run, url, remote_config(tmp_path, s3), max_steps=1)              # from the URL
    state = json.loads((run / "checkpoints" / "step-000000001" / "state.json").read_text())
    assert state["cache"] == identity_of_cache(remote_cache["cache"])
    # the same cache elsewhere (a local copy, another shard cache) is the same cache: the resume goes on
    run_train(remote_cache, run, remote_cache["cache"], remote_config(tmp_path / "other"), max_steps=2, resume=True)
    other = tmp_path / "other-cache"                                  # another cache: its first shards only
    pull_cache(remote_cache["cache"], other, shards=3)
    (run / "run.json").unlink()                                       # even without the run record
    with pytest.raises(KdcacheError, match="checkpoint .* was taken while training from the cache whose manifest"):
        run_train(remote_cache, run, other, remote_config(tmp_path), max_steps=3, resume=True)
