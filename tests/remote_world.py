"""The remote tests' world (test_remote.py, test_remote_transfer.py): moto's S3 server and `http.server` on
127.0.0.1 (tests/servers.py), a 24-sample cache of the tiny teacher in 6 shards, and the helpers that push
it, train from it and run the CLI on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from conftest import write_toy_dataset
from servers import Server

from kdcache.remote import RemoteConfig
from kdcache.transfer import push_cache
from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump

REPO = Path(__file__).resolve().parents[1]

BUCKET = "labs"
KEY, SECRET = "lab-key", "lab-secret"        # moto accepts any credentials


@contextmanager
def s3_server():
    """moto's S3 server on 127.0.0.1 and a free port, with an empty bucket; stopped at the end."""
    server = Server.start("s3")
    try:
        request = urllib.request.Request(f"{server.url}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()
        server.reset()
        yield server
    finally:
        server.stop()


@contextmanager
def http_server(tmp_path):
    """A directory served by http.server (no Range support) on 127.0.0.1: (server, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    server = Server.start("http", root)
    try:
        yield server, root
    finally:
        server.stop()


def build_world(tiny_teacher_dir, tiny_student_dir, tmp_path_factory) -> dict:
    """A cache of 24 samples in 6 shards (4 samples each: 16 in the sampler's first window of 4 shards)."""
    root = tmp_path_factory.mktemp("remote")
    data, images = write_toy_dataset(root, count=24, text_only=2)
    dump(DumpConfig(teacher=str(tiny_teacher_dir), data=str(data), images=str(images), out=str(root / "cache"),
                    device="cpu", dtype="float32", progress=False, topk_response=4, topk_visual=4,
                    shard_size_mb=1e-6))
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 6
    return dict(root=root, cache=root / "cache", manifest=manifest, student=tiny_student_dir, data=data,
                images=images)


def s3_options(server: Server) -> tuple[str, ...]:
    return (f"endpoint_url={server.url}", f"key={KEY}", f"secret={SECRET}")


def remote_config(tmp_path, server: Server | None = None, **overrides) -> RemoteConfig:
    settings = dict(storage_option=s3_options(server) if server is not None and server.kind == "s3" else (),
                    cache_dir=str(tmp_path / "shard-cache"), net_timeout=5.0, net_retries=1, net_backoff=0.1)
    return RemoteConfig(**{**settings, **overrides})


def shard_gets(server: Server, prefix: str) -> dict[str, int]:
    counts = server.requests()["counts"]
    return {key.split("/")[-1]: n for key, n in counts.items() if key.startswith(f"GET {prefix}/shard-")}


def pushed(world, s3, tmp_path, url=f"s3://{BUCKET}/kd") -> str:
    push_cache(world["cache"], url, remote=remote_config(tmp_path / "push", s3), verify=False)
    s3.reset()
    return url


def run_train(world, out, cache, remote: RemoteConfig, **overrides) -> Path:
    settings = dict(stage="dpt", batch_size=2, global_batch=2, lr=1e-3, seed=3, device="cpu", num_workers=0,
                    progress=False, max_steps=2)
    fields = {f.name: getattr(remote, f.name) for f in dataclasses.fields(RemoteConfig)}
    return train(TrainConfig(student=str(world["student"]), out=str(out), cache=str(cache),
                             **{**settings, **fields, **overrides}))


def cli(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=environment,
                          capture_output=True, text=True, timeout=timeout)


def the_error(result) -> str:
    """The CLI's one error line (stderr holds nothing else but progress bars)."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def identity_of_cache(cache: Path) -> str:
    return "sha256:" + hashlib.sha256((cache / "manifest.json").read_bytes()).hexdigest()
