"""Background stages with bounded queues: a producer run ahead of its consumer, a consumer behind its producer.

The dump (`teacher_dump/dump.py`) keeps its accelerator busy with three threads: samples are read,
decoded, tokenised and batched `Ahead` of the teacher forward, and the cache records are encoded,
compressed, hashed and written `Behind` it. Threads, not processes (docs/decisions.md): the heavy
parts (PIL decoding and resizing, zstd, sha256, file writes, CUDA calls) release the GIL, and
threads share the tokenizer, image processor and writer without pickling or shared memory.

Both keep the order of their items and hand an exception over as it is (the same object, so a
SampleError still names its sample): `Ahead` re-raises the producer's exception where it occurred
in the order, `Behind` stops at the consumer's first exception and re-raises it from the next
`put` or from `drain`/`finish`. Neither thread outlives `close` / `drain` / `cancel`; every blocking
call polls a stop flag, so a failure anywhere never leaves a thread waiting on a full queue.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

POLL_S = 0.05            # how often a blocked put/get looks at the stop flag
_DONE = object()


@dataclass
class StageTimes:
    """Where a stage's time went: its own work (wall and its thread's CPU seconds) and time spent waiting."""

    busy_s: float = 0.0
    busy_cpu_s: float = 0.0
    wait_s: float = 0.0
    items: int = 0

    @contextmanager
    def busy(self):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - wall
            self.busy_cpu_s += time.thread_time() - cpu
            self.items += 1

    @contextmanager
    def waiting(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wait_s += time.perf_counter() - start


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item` unless `stop` is set first; True when it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


class Ahead:
    """Iterate `source` in a background thread, at most `depth` items ahead of the consumer, in order.

    Iterating yields the items; an exception raised by `source` is re-raised at its place in the
    order. `close()` (also on leaving a `with` block) stops the thread, closes `source` if it is a
    generator, and waits for it. `times` holds the producer's busy time; `waited` the consumer's.
    """

    def __init__(self, source: Iterable, *, depth: int, name: str):
        self.times, self.waited = StageTimes(), StageTimes()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(source),), name=name, daemon=True)
        self._thread.start()

    def _run(self, items: Iterator) -> None:
        try:
            while not self._stop.is_set():
                with self.times.busy():
                    item = next(items, _DONE)
                if item is _DONE or not _put(self._queue, ("item", item), self._stop):
                    break
            _put(self._queue, ("done", None), self._stop)
        except BaseException as error:          # handed to the consumer, raised there
            _put(self._queue, ("error", error), self._stop)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> Iterator:
        while True:
            with self.waited.waiting():
                kind, value = self._get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"{self._thread.name} ended without a result") from None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


class Behind:
    """Call `consume(item)` in a background thread for each item `put`, in order, through a queue of `depth`.

    The consumer stops at its first exception; `put` re-raises it from then on. `finish()` waits until
    every item put so far is consumed and re-raises a consumer error; `drain()` does the same but returns
    the error instead; `cancel()` drops what is queued. `times` holds the consumer's busy time,
    `waited` the producer's time blocked on a full queue.
    """

    def __init__(self, consume: Callable, *, depth: int, name: str):
        self.times, self.waited = StageTimes(), StageTimes()
        self.error: BaseException | None = None
        self._consume = consume
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=POLL_S)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            try:
                with self.times.busy():
                    self._consume(item)
            except BaseException as error:
                self.error = error
                return

    def put(self, item) -> None:
        with self.waited.waiting():
            while True:
                if self.error is not None:
                    raise self.error
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self._thread.name} is not running")
                try:
                    self._queue.put(item, timeout=POLL_S)
                    return
                except queue.Full:
                    continue

    def drain(self) -> BaseException | None:
        """Wait until everything put is consumed (or the consumer failed); the consumer's error, or None."""
        while self._thread.is_alive() and self.error is None:
            try:
                self._queue.put(_DONE, timeout=POLL_S)
                break
            except queue.Full:
                continue
        self._thread.join()
        return self.error

    def finish(self) -> None:
        error = self.drain()
        if error is not None:
            raise error

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
