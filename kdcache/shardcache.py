"""The local shard cache of caches behind URLs: each shard downloaded once per machine, verified, shared.

    <cache_dir>/<manifest sha256 hex>/shards/<shard path>       verified shards
    <cache_dir>/<manifest sha256 hex>/shards/<shard path>.lock  its lock file (kept)

A cache is keyed by its manifest's sha256 (its identity, docs/design.md §13), so a pulled copy, a
mirror under another URL and the original share one folder. `ShardCache.fetch(entry)` returns the
local file of a manifest shard entry: if it is not there, the one process that takes the shard's
exclusive lock downloads it (one streaming GET into `<shard>.part`), checks its size and sha256
against the manifest entry and renames it into place; every other rank and DataLoader worker waits
on the lock and then uses that file. So every file at a shard's name has been verified, before its
first use. Readers hold a shared lock on a shard while they use it (`pin`), and the prefetcher pins
the next shards of its rank's order; above `cache_size_gb` the least recently used unpinned shards
(of any cache in `cache_dir`) are deleted before a download. A deleted shard that is still memory-
mapped somewhere stays readable there (the kernel keeps it until unmapped).

`Prefetcher` is a background thread of one rank's main process that keeps the next
`prefetch_shards` shards of the sampler's order fetched and pinned while training runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np

from kdcache import lock
from kdcache.errors import CacheError, KdcacheError
from kdcache.files import sha256_file
from kdcache.remote import Remote, RemoteConfig

SHARDS_DIR = "shards"
PART, LOCK = ".part", ".lock"
SCAN_AHEAD = 65536          # samples of the order the prefetcher looks at for its next shards


class Pin:
    """A shared lock on a cached shard: it is in use here, so it is not evicted. `release()` ends it (in
    the process that took it: a forked child's copy is not its own, and its descriptor is already closed)."""

    def __init__(self, fd: int | None):
        self.fd, self.pid = fd, os.getpid()

    def release(self) -> None:
        if self.fd is not None and self.pid == os.getpid():
            lock.unlock_file(self.fd)
        self.fd = None

    def __del__(self):
        self.release()


class ShardCache:
    """Verified local copies of one remote cache's shards (see the module docstring)."""

    def __init__(self, remote: Remote, identity: str, config: RemoteConfig):
        self.remote = remote
        self.base = config.shard_cache_dir()
        self.root = self.base / identity.removeprefix("sha256:")
        self.limit = int(config.cache_size_gb * (1 << 30))
        self._warned = False
        try:
            (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise KdcacheError(f"--cache-dir {self.base}: cannot write the shard cache there "
                               f"({e.strerror or e}); pass a writable --cache-dir") from e

    def local(self, entry: dict) -> Path:
        return self.root / SHARDS_DIR / entry["path"]

    def present(self, entry: dict) -> bool:
        """The shard is here (its size checked: whatever is at its name was verified when it came)."""
        try:
            return os.path.getsize(self.local(entry)) == entry["num_bytes"]
        except OSError:
            return False

    def fetch(self, entry: dict, *, wait: bool = True, progress: bool = False) -> Path | None:
        """The local, verified file of a shard, downloaded first if needed (by one process only).

        With `wait=False`, None when another process is downloading it right now.
        """
        final = self.local(entry)
        if self.present(entry):
            _touch(final)
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        while True:                # another process may be downloading it: wait until it is here, or ours to fetch
            fd = lock.lock_file(_with_suffix(final, LOCK), exclusive=True, blocking=False)
            if fd is not None:
                break
            if self.present(entry):                      # fetched meanwhile (and pinned by its users: no lock)
                _touch(final)
                return final
            if not wait:
                return None
            time.sleep(0.05)
        try:
            if not self.present(entry):                  # nobody fetched it while we waited
                self.make_room(entry["num_bytes"], keep=final)
                download_verified(self.remote, entry, final, progress=progress)
        finally:
            lock.unlock_file(fd)
        return final

    def acquire(self, entry: dict, *, wait: bool = True, progress: bool = False) -> tuple[Path, Pin] | None:
        """`fetch` then `pin`: the shard's file, present and pinned (None: being downloaded and not `wait`)."""
        for _ in range(3):
            path = self.fetch(entry, wait=wait, progress=progress)
            if path is None:
                return None
            pin = self.pin(entry)
            if self.present(entry):
                return path, pin
            pin.release()                                # evicted between the two: fetch it again
        raise CacheError(f"{self.remote.where(entry['path'])}: evicted from the shard cache {self.base} as soon as "
                         "it was fetched; raise --cache-size-gb")

    def pin(self, entry: dict) -> Pin:
        final = self.local(entry)
        final.parent.mkdir(parents=True, exist_ok=True)
        return Pin(lock.lock_file(_with_suffix(final, LOCK), exclusive=False))

    def make_room(self, needed: int, *, keep: Path | None = None) -> None:
        """Delete least recently used, unpinned shards (of any cache here) until `needed` more bytes fit."""
        files = list(_cached_shards(self.base))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total + needed <= self.limit:
                return
            if path == keep:
                continue
            fd = lock.lock_file(_with_suffix(path, LOCK), exclusive=True, blocking=False)
            if fd is None:
                continue                                 # pinned: in use, or next in some rank's order
            try:
                path.unlink(missing_ok=True)
                total -= size
            finally:
                lock.unlock_file(fd)
        if total + needed > self.limit and not self._warned:
            self._warned = True
            warnings.warn(f"shard cache {self.base} holds {total / 2**30:.2f} GiB of shards in use; "
                          f"going over --cache-size-gb {self.limit / 2**30:g} for one more", stacklevel=2)


def download_verified(remote: Remote, entry: dict, final: Path, *, progress=False) -> None:
    """A manifest shard entry's object into `final`: one streaming GET into `<final>.part`, its size and
    sha256 checked against the entry, then renamed into place (a mismatch keeps nothing: one-line CacheError).

    `progress`: True for a byte bar of its own (on a terminal), or an fsspec callback.
    """
    part = _with_suffix(final, PART)
    with _progress_bar(entry, progress) as callback:
        try:
            remote.download(entry["path"], part, callback)
            size, sha256 = sha256_file(part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    if size != entry["num_bytes"] or sha256 != entry["sha256"]:
        part.unlink(missing_ok=True)
        raise CacheError(f"{remote.where(entry['path'])}: downloaded {size} bytes with sha256 {sha256}, the manifest "
                         f"says {entry['num_bytes']} bytes with sha256 {entry['sha256']} (a corrupt or replaced shard "
                         "on the server); nothing was kept")
    os.replace(part, final)


def _cached_shards(base: Path):
    """(mtime, size, path) of every finished shard in every cache folder under `base`."""
    for cache in _scandir(base):
        if not cache.is_dir():
            continue
        stack = [Path(cache.path) / SHARDS_DIR]
        while stack:
            for item in _scandir(stack.pop()):
                if item.is_dir(follow_symlinks=False):
                    stack.append(Path(item.path))
                elif not item.name.endswith((PART, LOCK)):
                    try:
                        info = item.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    yield info.st_mtime, info.st_size, Path(item.path)


def _scandir(path) -> list:
    try:
        with os.scandir(path) as items:
            return list(items)
    except OSError:
        return []


def _with_suffix(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _touch(path: Path) -> None:
    try:
        os.utime(path)                                   # least recently used goes first
    except OSError:
        pass


class _progress_bar:
    """A tqdm byte bar as an fsspec callback when `enabled` (and stderr is a terminal), else no callback."""

    def __init__(self, entry: dict, enabled):
        self.entry, self.enabled = entry, enabled is True and sys.stderr.isatty()
        self.callback = enabled if enabled not in (True, False, None) else None     # a caller's own callback

    def __enter__(self):
        if self.enabled:
            from fsspec.callbacks import TqdmCallback

            self.callback = TqdmCallback(tqdm_kwargs={"desc": self.entry["path"], "unit": "B", "unit_scale": True,
                                                      "leave": False})
        return self.callback

    def __exit__(self, *exc):
        if self.enabled and self.callback is not None:
            self.callback.close()


# --- prefetching in the sampler's order


class Prefetcher:
    """Keeps the next `depth` shards of one rank's sample order fetched and pinned (a daemon thread).

    `reader` is a `CacheReader` over a cache URL; `sampler` a `ResumableSampler`, whose epoch and
    consumed-sample count (advanced by the loader) say where training is. A failed fetch is left to
    the reader, which fetches on demand and reports the error in one line.
    """

    def __init__(self, reader, sampler, depth: int, poll_s: float = 0.2):
        self.reader, self.sampler, self.depth, self.poll_s = reader, sampler, depth, poll_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._pins: dict[int, Pin] = {}
        self._orders: dict[int, np.ndarray] = {}
        # the thread holds only a weak reference: once training drops its dataset, the thread ends
        self._thread = threading.Thread(target=_prefetch_loop, args=(weakref.ref(self), self._stop, poll_s),
                                        name="kdcache-prefetch", daemon=True)

    def start(self) -> Prefetcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for pin in self._pins.values():
            pin.release()
        self._pins.clear()

    def __del__(self):
        self._stop.set()

    def upcoming(self) -> list[int]:
        """This rank's next `depth` distinct shards, in order, from its current position (into the next epoch)."""
        epoch, seen = self.sampler.epoch, self.sampler.samples_seen
        world, rank = self.sampler.world_size, self.sampler.rank
        first = seen + (rank - seen) % world
        ahead = np.concatenate([self._order(epoch)[first::world][:SCAN_AHEAD],
                                self._order(epoch + 1)[rank::world][:SCAN_AHEAD]])
        shards = np.searchsorted(self.reader.starts, ahead, side="right") - 1
        _, where = np.unique(shards, return_index=True)
        return [int(s) for s in shards[np.sort(where)][:self.depth]]

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = _epoch_order(self.sampler, epoch)
        return self._orders[epoch]

    def _step(self) -> None:
        wanted = self.upcoming()
        for shard in [s for s in self._pins if s not in wanted]:
            self._pins.pop(shard).release()
        for shard in wanted:
            if self._stop.is_set():
                return
            if shard not in self._pins:
                held = self.reader.shard_cache.acquire(self.reader.shards[shard], wait=False)
                if held is not None:
                    self._pins[shard] = held[1]


def _prefetch_loop(prefetcher: weakref.ref, stop: threading.Event, poll_s: float) -> None:
    while not stop.is_set():
        me = prefetcher()
        if me is None:
            return
        wait = poll_s
        try:
            me._step()
        except Exception as e:                           # noqa: BLE001 - the reader will meet it and report it
            me.error = e
            wait = max(poll_s, me.reader.remote_config.net_backoff * 4)
        del me
        stop.wait(wait)


def _epoch_order(sampler, epoch: int) -> np.ndarray:
    """The sampler's global order of `epoch` (computed as the sampler does; its own state is not changed)."""
    from kdcache.sampler import ResumableSampler

    twin = ResumableSampler(sampler.shard_sizes, seed=sampler.seed, rank=sampler.rank,
                            world_size=sampler.world_size, batch_size=sampler.batch_size, window=sampler.window)
    twin.epoch = epoch
    return twin.global_order()
