"""kdcache.blas: numpy's BLAS on one thread for a block (lowrank8's decode), restored after."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from kdcache import blas, codecs

needs_openblas = pytest.mark.skipif(not blas.available(), reason="numpy's BLAS is not an OpenBLAS here")


@pytest.fixture
def two_threads():
    get, set_ = blas._get_setter()
    before = get()
    set_(2)
    yield
    set_(before)


@needs_openblas
def test_one_thread_limits_numpy_blas_inside_the_block_and_restores_it_even_on_error(two_threads):
    assert blas.threads() == 2
    with blas.one_thread():
        assert blas.threads() == 1
        np.ones((64, 64), np.float32) @ np.ones((64, 64), np.float32)
    assert blas.threads() == 2
    with pytest.raises(RuntimeError), blas.one_thread():
        raise RuntimeError("inside")
    assert blas.threads() == 2


@needs_openblas
def test_lowrank8_decodes_with_one_blas_thread_and_the_same_values(two_threads, monkeypatch):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((60, 8))
    relation = y @ y.T
    packed = (relation / np.linalg.norm(relation))[np.triu_indices(60)].astype(np.float16)
    payload = np.frombuffer(codecs.encode(codecs.LOWRANK8, packed), np.uint8)
    expected = codecs.decode(codecs.LOWRANK8, payload)
    seen = []
    real = blas.one_thread

    @contextlib.contextmanager
    def recording():
        with real():
            seen.append(blas.threads())
            yield

    monkeypatch.setattr(blas, "one_thread", recording)
    got = codecs.decode(codecs.LOWRANK8, payload)
    assert seen == [1] and blas.threads() == 2
    np.testing.assert_array_equal(got, expected)


def test_without_an_openblas_one_thread_does_nothing(monkeypatch):
    monkeypatch.setattr(blas, "_setter", None)
    assert not blas.available() and blas.threads() is None
    with blas.one_thread():
        assert np.ones(3) @ np.ones(3) == 3.0
