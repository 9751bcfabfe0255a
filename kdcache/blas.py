"""numpy's BLAS on one thread for a block of code (docs/decisions.md, "BLAS threads").

Decoding `lowrank8` (kdcache.codecs) is a float32 matmul through numpy's BLAS. With OpenBLAS's default
threads (one per core), the idle helper threads spin after each call and their CPU time is the decode's:
on the 2-core machine of benchmarks/README.md (issue 10) a compact cache read 112 samples per CPU second
instead of 441 single-threaded. A reader already runs one decode per DataLoader worker, so one BLAS thread
per decode is what it wants. Environment variables (OPENBLAS_NUM_THREADS=1) work only before numpy loads,
which a library cannot arrange, and threadpoolctl is not a dependency; so `one_thread` finds the OpenBLAS
numpy loaded (its wheel's bundled `scipy_openblas`, or a system `openblas`) and sets its thread count to 1
for the block, restoring it after. The count is the process's: a numpy BLAS call that another thread makes
during the block also runs on one thread (torch's BLAS is a separate library and is not touched). Where
numpy's BLAS is not OpenBLAS (MKL, Accelerate), `one_thread` does nothing and `available()` is False.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os

import numpy as np

_UNSET = object()
_setter = _UNSET


def _candidates() -> list[str]:
    """Paths of the OpenBLAS numpy may have loaded: its wheel's bundled copy, then what this process mapped."""
    base = os.path.dirname(np.__file__)
    paths = sorted(glob.glob(os.path.join(base, os.pardir, "numpy.libs", "*openblas*"))
                   + glob.glob(os.path.join(base, ".dylibs", "*openblas*")))
    try:
        with open("/proc/self/maps") as maps:
            paths += sorted({line.split()[-1] for line in maps if "openblas" in line.rsplit("/", 1)[-1]})
    except OSError:
        pass
    return paths


# (get, set) pairs: numpy >= 2 wheels' scipy-openblas (64-bit ints), then OpenBLAS's own names
_NAMES = (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
          ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
          ("openblas_get_num_threads", "openblas_set_num_threads"))


def _find_setter():
    """(get() -> n, set(n)) of the OpenBLAS numpy loaded (None when there is none)."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))             # numpy's BLAS loaded (it is, once numpy is imported)
    for path in _candidates():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _NAMES:
            get, set_ = getattr(library, get_name, None), getattr(library, set_name, None)
            if get is not None and set_ is not None:
                get.argtypes, get.restype = [], ctypes.c_int
                set_.argtypes, set_.restype = [ctypes.c_int], None
                return get, set_
    return None


def _get_setter():
    global _setter
    if _setter is _UNSET:
        _setter = _find_setter()
    return _setter


def available() -> bool:
    """Whether `one_thread` can limit numpy's BLAS here."""
    return _get_setter() is not None


def threads() -> int | None:
    """numpy's BLAS thread count now (None where `available()` is False)."""
    found = _get_setter()
    return None if found is None else found[0]()


@contextlib.contextmanager
def one_thread():
    """numpy's BLAS calls made by this thread inside the block run on this thread alone."""
    found = _get_setter()
    if found is None:
        yield
        return
    get, set_ = found
    previous = get()
    set_(1)
    try:
        yield
    finally:
        set_(previous)
