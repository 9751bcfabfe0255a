"""Caches behind URLs (issue 11), against real loopback servers started and stopped here: moto's S3 server
and the standard library's `http.server` (no Range support), each a subprocess on 127.0.0.1 that counts
the requests it answers (tests/servers.py). Nothing of the network is mocked."""

from __future__ import annotations

import urllib.request

import pytest
import s3fs
from servers import Server

BUCKET = "labs"
KEY, SECRET = "lab-key", "lab-secret"        # moto accepts any credentials


@pytest.fixture
def s3():
    """moto's S3 server on 127.0.0.1 and a free port, with an empty bucket; stopped at the end."""
    server = Server.start("s3")
    try:
        request = urllib.request.Request(f"{server.url}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()
        server.reset()
        yield server
    finally:
        server.stop()


@pytest.fixture
def http_dir(tmp_path):
    """A directory served by http.server (no Range support) on 127.0.0.1: (server, directory)."""
    root = tmp_path / "www"
    root.mkdir()
    server = Server.start("http", root)
    try:
        yield server, root
    finally:
        server.stop()


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
