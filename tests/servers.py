"""Loopback servers for the remote-cache tests: moto's S3 server and a plain `http.server`, each run as a
subprocess on 127.0.0.1 (so a test can freeze it with SIGSTOP or kill it) and each counting the requests
it answers, per method and path.

    python tests/servers.py s3 [--port N]          moto's S3 API (werkzeug, threaded)
    python tests/servers.py http DIR [--port N]    DIR over HTTP/1.1, no Range support (200 and the whole file)

The server prints ``PORT <n>`` on stdout once it listens (port 0, the default, picks a free one).
``GET /_requests`` answers the counts as JSON ``{"GET /bucket/key": n, ...}`` and bytes sent per path
(``{"counts": {...}, "bytes": {...}}``); ``DELETE /_requests`` resets them. Neither is counted.

In a test, `Server.start(...)` runs one and `Server.stop()` ends it (both bounded in time); the
fixtures in the test modules wrap them.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

COUNTS_PATH = "/_requests"
STARTUP_S = 60.0


class Tally:
    """Requests and bytes sent per ``METHOD /path``, shared by the server's threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.bytes: Counter = Counter()

    def add(self, key: str, sent: int = 0) -> None:
        with self.lock:
            self.counts[key] += 1
            self.bytes[key] += sent

    def add_bytes(self, key: str, sent: int) -> None:
        with self.lock:
            self.bytes[key] += sent

    def snapshot(self) -> bytes:
        with self.lock:
            return json.dumps({"counts": dict(self.counts), "bytes": dict(self.bytes)}).encode()

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.bytes.clear()


def counting_app(app, tally: Tally):
    """WSGI middleware: count each request by method and path, and the body bytes sent for it."""

    def wrapped(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == COUNTS_PATH:
            if environ["REQUEST_METHOD"] == "DELETE":
                tally.reset()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [tally.snapshot()]
        key = f"{environ['REQUEST_METHOD']} {path}"
        tally.add(key)
        return counted(app(environ, start_response), key)

    def counted(body, key: str):
        for chunk in body:
            tally.add_bytes(key, len(chunk))
            yield chunk

    return wrapped


def serve_s3(port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    tally = Tally()
    server = make_server("127.0.0.1", port, counting_app(DomainDispatcherApplication(create_backend_app), tally),
                         threaded=True)
    announce(server.server_address[1])
    server.serve_forever()


class NoRangeHandler(http.server.SimpleHTTPRequestHandler):
    """The standard library's file handler (which ignores Range headers), counting requests; quiet."""

    protocol_version = "HTTP/1.1"
    tally = Tally()

    def do_GET(self):
        if self.path == COUNTS_PATH:
            return self._answer_counts()
        key = f"GET {self.path}"
        self.tally.add(key)
        before = self.wfile_bytes()
        super().do_GET()
        self.tally.add_bytes(key, self.wfile_bytes() - before)

    def do_HEAD(self):
        self.tally.add(f"HEAD {self.path}")
        super().do_HEAD()

    def do_DELETE(self):
        if self.path == COUNTS_PATH:
            self.tally.reset()
            return self._answer_counts()
        self.send_error(405)

    def _answer_counts(self):
        body = self.tally.snapshot()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def wfile_bytes(self) -> int:
        return getattr(self.wfile, "sent", 0)

    def setup(self):
        super().setup()
        self.wfile = _CountingWriter(self.wfile)

    def log_message(self, *args):
        pass


class _CountingWriter:
    def __init__(self, raw):
        self.raw, self.sent = raw, 0

    def write(self, data):
        self.sent += len(data)
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


def serve_http(directory: str, port: int) -> None:
    handler = lambda *a, **kw: NoRangeHandler(*a, directory=directory, **kw)   # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    announce(server.server_address[1])
    server.serve_forever()


def announce(port: int) -> None:
    print(f"PORT {port}", flush=True)


# --- the test side


class Server:
    """One server subprocess: its port, URL, request counts; stopped by `stop()` (also when frozen)."""

    def __init__(self, proc: subprocess.Popen, port: int, kind: str, args: list[str]):
        self.proc, self.port, self.kind, self.args = proc, port, kind, args

    @classmethod
    def start(cls, kind: str, *args: str, port: int = 0) -> Server:
        command = [sys.executable, str(Path(__file__).resolve()), kind, *map(str, args), "--port", str(port)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + STARTUP_S
        line = ""
        while time.monotonic() < deadline and not line.startswith("PORT "):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"{kind} server did not start: {proc.stderr.read()[-2000:]}")
        if not line.startswith("PORT "):
            proc.kill()
            raise RuntimeError(f"{kind} server did not announce its port within {STARTUP_S} s")
        return cls(proc, int(line.split()[1]), kind, [kind, *map(str, args)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> dict:
        """{"counts": {"METHOD /path": n}, "bytes": {"METHOD /path": n}} since the last reset."""
        with urllib.request.urlopen(self.url + COUNTS_PATH, timeout=10) as r:
            return json.loads(r.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.url + COUNTS_PATH, method="DELETE"), timeout=10).read()

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Kill the server (SIGCONT first: a frozen process only dies once it runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()

    def restart(self) -> Server:
        """The same server again on the same port (an S3 server comes back empty; HTTP serves the same files)."""
        self.stop()
        return Server.start(self.args[0], *self.args[1:], port=self.port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["s3", "http"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.kind == "s3":
        serve_s3(args.port)
    else:
        if args.directory is None:
            parser.error("http needs a DIR")
        serve_http(args.directory, args.port)


if __name__ == "__main__":
    main()
