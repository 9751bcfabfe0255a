"""One job per directory, and the jobs' OS errors as one line (docs/design.md §8).

`job_lock(directory, job=...)` holds `DIRECTORY/.kdcache.lock` for the whole of a `dump` (on its
`--out`) or a `train` (on its run directory): a second job on the same directory fails at once
with a `LockHeld` error naming the lock file and its holder (job, pid, host, start time). The lock
is `fcntl.flock(LOCK_EX | LOCK_NB)` on that file, held open for the job's lifetime; the kernel
drops it when the process dies, so a SIGKILLed job leaves a file but no lock, and the next job
takes it over (saying so on stderr). A job that ends, normally or by an exception, removes the
file (and the directory, if the lock created it and nothing else was written there). The lock file
is not content: the jobs' "is this directory empty" checks ignore `LOCK_NAME`, and it never
appears in a manifest (`finalize_cache` and `verify_cache` list shards, not directory entries).
Advisory locks are only as good as the file system: local file systems and NFSv4 honour flock;
where flock is not supported the job runs unlocked after a warning.

Under torchrun only rank 0 takes the lock; `on_main_rank` runs such a rank-0-only step and raises
its error on every rank, so no rank waits at a barrier for a rank 0 that already failed.

`storage_errors(root)` turns an OSError of the jobs' own file writes (disk full, quota, read-only
file system, permission, a path component that is a file) into a one-line KdcacheError naming the
path.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from kdcache.errors import KdcacheError

LOCK_NAME = ".kdcache.lock"      # in the locked directory; not content (see `entries`)

T = TypeVar("T")

# errnos of a file system that refuses a write: turned into one line by `storage_errors`
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                            errno.EISDIR, errno.EFBIG, errno.EIO})
# a full or read-only disk as some libraries word it without an errno (pyarrow, safetensors)
STORAGE_MESSAGES = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded",
                    "Read-only file system", "ReadOnlyFilesystem")
_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
_held_fds: set[int] = set()      # lock files this process holds; closed in forked children (DataLoader workers)


class LockHeld(KdcacheError):
    """Another live job holds the directory's lock."""


def entries(directory: Path) -> list[Path]:
    """What a directory holds, its lock file left out (a stale lock from a killed job is not content)."""
    return [p for p in Path(directory).iterdir() if p.name != LOCK_NAME]


def refuse_non_directory(path: Path, flag: str = "--out") -> None:
    """A job directory that exists as a file (or under one) is refused before anything is done."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                what = "is" if parent == path else f"is under {parent}, which is"
                raise KdcacheError(f"{flag} {path} {what} an existing file, not a directory; choose another {flag}")
            return


class DirLock:
    """The lock of one directory (see the module docstring). `acquire()` then `release()`."""

    def __init__(self, directory, *, job: str, flag: str = "--out"):
        self.directory, self.job, self.flag = Path(directory), job, flag
        self.path = self.directory / LOCK_NAME
        self.stale: dict | None = None          # what a killed holder had written, when this lock took over
        self._fd: int | None = None
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, wait_for_dead_s: float = 15.0) -> DirLock:
        """Take the lock, creating the directory if needed; LockHeld if a live job holds it.

        A holder on this host whose pid is gone (its forked children may hold the lock a few
        seconds longer) is waited for, up to `wait_for_dead_s`.
        """
        refuse_non_directory(self.directory, self.flag)
        self._make_directory()
        deadline = time.monotonic() + wait_for_dead_s
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise self._cannot_write(e) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _dead_here(holder) and time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                raise LockHeld(self._held_message(holder)) from None
            except OSError as e:
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    warnings.warn(f"{self.path}: file locks are not supported here ({e.strerror}); running without "
                                  f"one: do not start a second job on {self.directory}", stacklevel=2)
                    return self
                raise self._cannot_write(e) from e
            # A holder that released between our open and our flock unlinked the file we opened:
            # the lock is on the file at the path now, so start over with that one.
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            if current is None or not os.path.samestat(os.fstat(fd), current):
                os.close(fd)
                continue
            self._fd = fd
            _held_fds.add(fd)
            break
        self.stale = _read_holder(self._fd, tries=1) or None
        try:
            self._write_holder()
        except OSError as e:
            self.release()
            raise self._cannot_write(e) from e
        if self.stale:
            print(f"kdcache: {self.path}: taking over the lock of a {self.stale.get('job', 'job')} that stopped "
                  f"without releasing it ({_holder_words(self.stale)})", file=sys.stderr)
        return self

    def release(self) -> None:
        """Remove the lock file, then unlock; removes the directory too if the lock made it and it is empty."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)           # still locked: a job that opened this file retries on a new one
        except OSError:
            pass
        _held_fds.discard(self._fd)
        os.close(self._fd)                 # closing the last descriptor drops the flock
        self._fd = None
        if self._created_dir:
            try:
                self.directory.rmdir()     # only when empty: a failed job's directory keeps what it wrote
            except OSError:
                pass

    def _make_directory(self) -> None:
        if self.directory.is_dir():
            return
        try:
            self.directory.mkdir(parents=True)
            self._created_dir = True
        except FileExistsError:
            refuse_non_directory(self.directory, self.flag)      # made by someone else meanwhile
        except OSError as e:
            raise self._cannot_write(e, self.directory) from e

    def _write_holder(self) -> None:
        info = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        data = (json.dumps(info) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _held_message(self, holder: dict) -> str:
        who = _holder_words(holder) if holder else "a process that has not written its pid yet"
        return (f"{self.directory} is in use by another kdcache {holder.get('job', 'job')} ({who}; lock file "
                f"{self.path}): wait for it to finish or stop it, or choose another {self.flag}")

    def _cannot_write(self, e: OSError, path: Path | None = None) -> KdcacheError:
        return KdcacheError(f"cannot write in {self.flag} {self.directory} ({path or self.path}: "
                            f"{e.strerror or e}); it must be a writable directory")


def _read_holder(fd: int, *, tries: int = 5) -> dict:
    """The holder's {"job", "pid", "host", "started"}; {} for an empty or unreadable (half-written) file."""
    for attempt in range(tries):
        try:
            data = os.pread(fd, 4096, 0)
            if data.strip():
                holder = json.loads(data)
                if isinstance(holder, dict):
                    return holder
        except (OSError, ValueError):
            pass
        if attempt + 1 < tries:
            time.sleep(0.05)          # the holder writes its pid just after taking the lock
    return {}


def _dead_here(holder: dict) -> bool:
    """The holder ran on this host and its pid is gone (its DataLoader workers may still be exiting)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _holder_words(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _close_held_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock's open file description: were it to keep
    # it, the lock would outlive a killed job by as long as its workers take to notice.
    for fd in list(_held_fds):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_held_in_child)



# --- locks on single files (the shard cache, kdcache/shardcache.py)


def lock_file(path, *, exclusive: bool, blocking: bool = True, poll_s: float = 0.05) -> int | None:
    """An open descriptor holding `flock` on `path` (created if missing): exclusive or shared.

    Blocking waits by polling (so Ctrl-C still works); not blocking, None when another process holds
    a conflicting lock. Release with `unlock_file`, which unlocks for every process that inherited the
    descriptor; a forked child closes its inherited copy without unlocking (see `_held_fds`).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    while True:
        try:
            fcntl.flock(fd, mode)
            break
        except BlockingIOError:
            if not blocking:
                os.close(fd)
                return None
            time.sleep(poll_s)
        except OSError:
            os.close(fd)
            raise
    _held_fds.add(fd)
    return fd


def unlock_file(fd: int | None) -> None:
    """Release a `lock_file` lock (LOCK_UN first: a forked child's copy must not keep it) and close it."""
    if fd is None or fd not in _held_fds:
        return
    _held_fds.discard(fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- the rank-0-only steps of a torchrun job


def _distributed():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def on_main_rank(fn: Callable[[], T], *, is_main: bool) -> T | None:
    """Run `fn` on rank 0 only; if it fails, every rank raises (rank 0 its own error, the others a
    KdcacheError with its message). Returns fn's result on rank 0, None on the others. A collective
    under a process group (every rank must call it), a plain call without one."""
    dist = _distributed()
    result, failure, message = None, None, None
    if is_main:
        try:
            result = fn()
        except Exception as e:      # noqa: BLE001 - told to every rank, then re-raised
            failure, message = e, (str(e) if isinstance(e, KdcacheError) else f"rank 0 failed: {type(e).__name__}: {e}")
    if dist is not None:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if failure is not None:
        raise failure
    if message is not None:
        raise KdcacheError(message)
    return result


@contextmanager
def job_lock(directory, *, job: str, is_main: bool = True, check: Callable[[], None] | None = None,
             flag: str = "--out") -> Iterator[DirLock | None]:
    """Hold `directory`'s lock for the block (rank 0 only under torchrun; every rank calls this).

    `check()` runs on rank 0 right after the lock is taken, e.g. the job's refusals of a used
    directory: they then see the directory as no other job can change it. A refusal or a held lock
    raises on every rank. Yields the DirLock on rank 0, None on the others.
    """
    lock = DirLock(directory, job=job, flag=flag) if is_main else None

    def take() -> None:
        lock.acquire()
        try:
            if check is not None:
                check()
        except BaseException:
            lock.release()
            raise

    on_main_rank(take, is_main=is_main)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


# --- OS errors of the jobs' own writes


def storage_error(e: BaseException, root: Path, flag: str = "--out") -> KdcacheError | None:
    """A one-line KdcacheError for an exception that says the file system refused a write; None otherwise."""
    if isinstance(e, KdcacheError):
        return None
    text = str(e)
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
        reason = e.strerror or text
    elif any(m in text for m in STORAGE_MESSAGES):
        reason = next(m for m in STORAGE_MESSAGES if m in text)
    else:
        return None
    filename = getattr(e, "filename", None)
    where = Path(os.fsdecode(filename)) if filename else None
    reason = " ".join(str(reason).split())          # one line
    root = Path(root)
    if where is not None and not _inside(where, root):
        return KdcacheError(f"{where}: {reason}")
    return KdcacheError(f"{where or root}: {reason} ({flag} {root} must be a writable directory with free space)")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


@contextmanager
def storage_errors(root, flag: str = "--out") -> Iterator[None]:
    """Re-raise an OSError that says the file system refused a write as a one-line KdcacheError."""
    try:
        yield
    except Exception as e:
        error = storage_error(e, Path(root), flag)
        if error is None:
            raise
        raise error from e
