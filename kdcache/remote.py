"""Caches behind URLs: storage options, timeouts, bounded retries, one-line network errors (docs/design.md §13).

`RemoteConfig` holds what every command that reads or writes a cache URL takes (`kdcache train`
inherits it, `inspect`, `verify`, `check`, `push` and `pull` take it as flags): fsspec storage
options (`--storage-option KEY=VALUE`, repeatable), the network timeout, retries and backoff, and the
local shard cache (`--cache-dir`, `--cache-size-gb`, `--prefetch-shards`, kdcache/shardcache.py),
and the manifest pin `--expect-manifest`. The standard variables of each backend apply as well
(for S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_DEFAULT_REGION, AWS_PROFILE, read by botocore); a storage option overrides them.

`Remote` is one cache URL: an fsspec filesystem made per process (a forked DataLoader worker makes
its own), with the timeouts set where the backend has them (S3: botocore's connect/read timeouts;
HTTP: aiohttp's socket connect/read timeouts) and the backends' own retries turned off, so that the
retries are ours: bounded (`net_retries`), with exponential backoff, for transient faults only
(timeouts, refused or dropped connections, 5xx, throttling). Every failure is a `RemoteError`, one
line naming the URL and the cause; a missing file is a `RemoteMissing`.

Module-level imports are the standard library and kdcache.errors only: `student_train/config.py`
imports this module, and `kdcache --help` must not import torch (fsspec is imported when a URL is used).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from kdcache.errors import CacheError, one_line

T = TypeVar("T")

MAX_BACKOFF_S = 30.0
MAX_MANIFEST_BYTES = 256 << 20       # a manifest of a million shards is ~200 MB; anything larger is refused
SHA256_PATTERN = r"(sha256:)?[0-9a-f]{64}"
STORAGE_OPTION_PATTERN = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=.*"
# storage options whose values are secrets: never written to RUN/config.yaml or printed
SECRET_KEYS = ("secret", "password", "token", "key", "session_token", "aws_secret_access_key",
               "aws_session_token", "aws_access_key_id", "sas_token", "account_key", "credentials")
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(location) -> bool:
    """A cache location that is a URL other than file:// (those go through fsspec)."""
    text = os.fspath(location)
    return bool(URL_PATTERN.match(text)) and not text.startswith("file://")


def default_cache_dir() -> Path:
    """$KDCACHE_CACHE_DIR, else $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache."""
    if os.environ.get("KDCACHE_CACHE_DIR"):
        return Path(os.environ["KDCACHE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdcache"


@dataclass(frozen=True, kw_only=True)
class RemoteConfig:
    """How a cache URL is reached, and the local shard cache that holds its shards (flags of every
    command that reads or writes a cache URL; `TrainConfig` inherits them)."""

    storage_option: tuple[str, ...] = field(default=(), metadata={
        "help": "KEY=VALUE for the cache URL's fsspec filesystem, repeatable: endpoint_url=http://host:9000, "
                "key=..., secret=..., anon=true; a dotted KEY sets a nested one (client_kwargs.region_name=eu-west-1). "
                "The backend's environment variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) apply too.",
        "pattern": STORAGE_OPTION_PATTERN, "pattern_help": "KEY=VALUE", "shown_default": "none",
        "metavar": "KEY=VALUE"})
    net_timeout: float = field(default=30.0, metadata={
        "help": "Seconds a network connection or read may stall before that attempt fails.", "gt": 0})
    net_retries: int = field(default=3, metadata={
        "help": "Retries of a failed network request (timeouts, refused or dropped connections, 5xx), "
                "with exponential backoff.", "ge": 0, "le": 100})
    net_backoff: float = field(default=1.0, metadata={
        "help": f"Seconds before the first retry, doubled for each next one (at most {MAX_BACKOFF_S:g}).",
        "ge": 0, "le": MAX_BACKOFF_S})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Local shard cache of cache URLs, shared by every rank, worker and run on this machine "
                "(one folder per cache, named by its manifest's sha256).", "local": True,
        "shown_default": "$KDCACHE_CACHE_DIR, else $XDG_CACHE_HOME/kdcache, else ~/.cache/kdcache"})
    cache_size_gb: float = field(default=100.0, metadata={
        "help": "Size limit of the shard cache: least recently used shards not needed soon are evicted "
                "beyond it.", "gt": 0})
    prefetch_shards: int = field(default=8, metadata={
        "help": "Shards of a cache URL fetched ahead of training, in the sampler's order.", "ge": 0})
    expect_manifest: str | None = field(default=None, metadata={
        "help": "Refuse the cache unless its manifest.json has this sha256 (its identity, printed by "
                "`kdcache verify` and `kdcache push`).", "pattern": SHA256_PATTERN,
        "pattern_help": "sha256:<64 hex digits>"})

    def __post_init__(self) -> None:
        from kdcache.config import check_fields       # stdlib-only, as this module

        check_fields(self)
        parse_storage_options(self.storage_option)

    def remote_config(self) -> RemoteConfig:
        """Just these fields (of a `TrainConfig`, say): what a reader pickles into DataLoader workers."""
        return RemoteConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RemoteConfig)})

    def storage_options(self) -> dict:
        return parse_storage_options(self.storage_option)

    def shard_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    def expected_identity(self) -> str | None:
        if self.expect_manifest is None:
            return None
        return self.expect_manifest if self.expect_manifest.startswith("sha256:") else "sha256:" + self.expect_manifest


def parse_storage_options(items) -> dict:
    """["endpoint_url=http://h:9000", "anon=true", "client_kwargs.region_name=x"] -> an fsspec kwargs dict.

    true/false become booleans and a value starting with { or [ is read as JSON; every other value
    stays text (an access key of digits is still a key).
    """
    import json

    options: dict = {}
    for item in items or ():
        if not isinstance(item, str) or not re.fullmatch(STORAGE_OPTION_PATTERN, item, re.DOTALL):
            raise CacheError(f"storage option {item!r} must be KEY=VALUE")
        key, value = item.split("=", 1)
        parsed: object = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        elif value[:1] in ("{", "["):
            try:
                parsed = json.loads(value)
            except ValueError as e:
                raise CacheError(f"storage option {key}: {value!r} is not valid JSON ({e})") from None
        *parents, last = key.split(".")
        target = options
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise CacheError(f"storage option {key}: {parent} is set both as a value and as a group")
        target[last] = parsed
    return options


def redacted(items) -> list[str]:
    """Storage options as they may be written down: the values of secrets replaced by ***."""
    out = []
    for item in items or ():
        key, _, value = str(item).partition("=")
        secret = key.rsplit(".", 1)[-1].lower() in SECRET_KEYS
        out.append(f"{key}=***" if secret and value else str(item))
    return out


class RemoteError(CacheError):
    """A network or storage failure reaching a cache URL: one line naming the URL and the cause."""


class RemoteMissing(RemoteError):
    """The URL answered that the file does not exist."""


# --- classifying failures: (cause in a few words, worth retrying?)


_TRANSIENT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                               errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE, errno.ENETDOWN, errno.EAGAIN})
_TIMEOUT_NAMES = ("Timeout", "TimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "FSTimeoutError",
                  "ServerTimeoutError")
_CONNECT_NAMES = ("ClientConnectorError", "EndpointConnectionError", "ConnectionRefusedError", "ClientConnectionError",
                  "ConnectionClosedError")
_DROPPED_NAMES = ("ServerDisconnectedError", "ClientPayloadError", "IncompleteRead", "ConnectionResetError",
                  "ClientOSError", "ResponseStreamingError", "ProtocolError", "BrokenPipeError")
_THROTTLED = ("SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError", "503", "500", "502",
              "504", "429")


def classify(error: BaseException, timeout: float) -> tuple[str, bool]:
    """(what went wrong, in a few words; whether another attempt may succeed)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    text = one_line(error, limit=160)
    status = getattr(error, "status", None) or getattr(error, "code", None)
    if isinstance(error, FileNotFoundError):
        return "not found", False
    if isinstance(error, PermissionError) or any(n in text for n in ("AccessDenied", "InvalidAccessKeyId",
                                                                      "SignatureDoesNotMatch", "Forbidden")):
        return f"access denied ({text})", False
    if names & set(_TIMEOUT_NAMES) or isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s (timed out; is the server up and responsive?)", True
    if names & set(_CONNECT_NAMES) or (isinstance(error, OSError) and error.errno == errno.ECONNREFUSED):
        return f"cannot connect ({text})", True
    if names & set(_DROPPED_NAMES) or (isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS):
        return f"connection dropped ({text})", True
    if isinstance(status, int) and (status >= 500 or status == 429):
        return f"server error {status} ({text})", True
    if any(mark in text for mark in _THROTTLED):
        return f"server error ({text})", True
    return f"{type(error).__name__}: {text}" if text != type(error).__name__ else text, False


# --- one cache URL


class Remote:
    """One cache URL (a directory of objects): reads, downloads and uploads with timeouts and retries.

    Pickles without its filesystem; each process (a forked DataLoader worker too) makes its own.
    """

    def __init__(self, url: str, config: RemoteConfig | None = None):
        self.url = url.rstrip("/")
        self.config = (config or RemoteConfig()).remote_config()
        self.protocol = self.url.split("://", 1)[0].lower()
        self._fs, self._root, self._pid = None, None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": None}

    def where(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = make_filesystem(self.url, self.config)
            self._pid = os.getpid()
        return self._fs

    def path(self, relative: str) -> str:
        self.fs                                           # noqa: B018 - makes _root
        return f"{self._root}/{relative}" if relative else self._root

    def call(self, relative: str, action: str, fn: Callable[[], T]) -> T:
        """fn() with bounded retries and backoff for transient faults; any failure as one RemoteError line."""
        self.fs                                          # noqa: B018 - a bad URL or option fails here, in its own words
        attempts = self.config.net_retries + 1
        for attempt in range(attempts):
            try:
                return fn()
            except (CacheError, KeyboardInterrupt):
                raise
            except Exception as e:                       # noqa: BLE001 - every library's failure, classified
                cause, transient = classify(e, self.config.net_timeout)
                if cause == "not found":
                    raise RemoteMissing(f"{self.where(relative)}: not found") from None
                if not transient or attempt + 1 == attempts:
                    tries = f" (after {attempts} attempts)" if transient and attempts > 1 else ""
                    raise RemoteError(f"{self.where(relative)}: cannot {action}: {cause}{tries}") from None
                time.sleep(min(self.config.net_backoff * 2 ** attempt, MAX_BACKOFF_S))
        raise AssertionError("unreachable")

    def read(self, relative: str, *, limit: int = MAX_MANIFEST_BYTES) -> bytes:
        """A small file's bytes (a manifest), refused beyond `limit`."""
        data = self.call(relative, "read", lambda: self.fs.cat_file(self.path(relative)))
        if len(data) > limit:
            raise RemoteError(f"{self.where(relative)}: {len(data)} bytes, more than the {limit} a manifest may have")
        return data

    def exists(self, relative: str) -> bool:
        try:
            self.call(relative, "look up", lambda: self.fs.info(self.path(relative)))
            return True
        except RemoteMissing:
            return False

    def size(self, relative: str) -> int:
        return int(self.call(relative, "look up", lambda: self.fs.info(self.path(relative)))["size"])

    def download(self, relative: str, destination: Path, callback=None) -> None:
        """The whole object into `destination` (one streaming GET; no Range needed), retried as a whole."""
        def get():
            kwargs = {"callback": callback} if callback is not None else {}
            self.fs.get_file(self.path(relative), str(destination), **kwargs)

        self.call(relative, "download", get)

    def upload(self, source: Path, relative: str, callback=None) -> None:
        def put():
            kwargs = {"callback": callback} if callback is not None else {}
            self.fs.put_file(str(source), self.path(relative), **kwargs)

        self.call(relative, "upload", put)

    def write(self, relative: str, data: bytes) -> None:
        self.call(relative, "upload", lambda: self.fs.pipe_file(self.path(relative), data))


def make_filesystem(url: str, config: RemoteConfig):
    """(fsspec filesystem, root path) for a URL: storage options, timeouts, the backend's own retries off."""
    try:
        import fsspec
    except ImportError as e:
        raise CacheError(f"reading {url} needs fsspec: pip install 'kdcache[s3]' (or fsspec)") from e
    protocol = url.split("://", 1)[0].lower()
    options = {**backend_options(protocol, config), "skip_instance_cache": True}
    user = config.storage_options()
    for key, value in user.items():                      # nested groups (config_kwargs, ...) are merged
        options[key] = {**options[key], **value} if isinstance(value, dict) and isinstance(options.get(key), dict) \
            else value
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        package = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                   "http": "aiohttp", "https": "aiohttp"}.get(protocol, f"the fsspec backend for {protocol}://")
        raise CacheError(f"{url}: reading {protocol}:// URLs needs {package} (pip install {package}"
                         f"{' or kdcache[s3]' if package == 's3fs' else ''})") from e
    except (ValueError, TypeError) as e:
        raise CacheError(f"{url}: cannot open cache: bad URL or storage options {redacted(config.storage_option)} "
                         f"({one_line(e, limit=200)})") from e
    if protocol in ("s3", "s3a"):
        fs.retries = 1                                   # s3fs's own retry loop: one attempt, ours retry
    return fs, root.rstrip("/")


def backend_options(protocol: str, config: RemoteConfig) -> dict:
    """Timeouts where the backend takes them, and its own retries off (ours are bounded and logged)."""
    timeout = config.net_timeout
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"total_max_attempts": 1}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout,
                                                                    sock_read=timeout)}}
    return {}
