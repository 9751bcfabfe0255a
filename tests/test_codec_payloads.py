"""Cache format 2's codecs themselves (issue 10): round trips of adversarial rows and relations, freqdict's
table, lowrank8's rank choice and refusals, malformed payloads. Caches of every codec: test_codecs.py."""

from __future__ import annotations

import numpy as np
import pytest

import codec_samples as cs
from codec_bounds import (LOWRANK_COSINE, LOWRANK_QUANT_SHARE, assert_logq8_within_bound, assert_relation_within_bound,
                          bits, full_matrix, relation_cosine)
from kdcache import codecs


# --- the codecs themselves


@pytest.mark.parametrize("codec", [codecs.SHUFFLE32, codecs.FREQDICT, codecs.DELTA16, codecs.LOGQ8])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_topk_codecs_round_trip_every_special_value(codec, rows):
    special = np.concatenate([cs.SPECIAL_ROWS, -np.abs(np.random.default_rng(rows).normal(size=(7, cs.V)) * 5)])
    values = special[:rows].astype(np.float16) if codec not in (codecs.SHUFFLE32, codecs.FREQDICT) else \
        np.random.default_rng(rows).integers(0, 2 ** 31 - 1, size=(rows, cs.V)).astype(np.int32)
    payload = np.frombuffer(codecs.encode(codec, values), np.uint8)
    decoded = codecs.decode(codec, payload, cs.V)
    assert decoded.shape == (rows, cs.V) and decoded.dtype == values.dtype
    if codec == codecs.LOGQ8:
        assert len(payload) == rows * (cs.V + 2)
        assert_logq8_within_bound(decoded, values)
    else:
        assert np.array_equal(decoded.view(np.uint8), values.view(np.uint8))     # bit for bit, -0.0 included


@pytest.mark.parametrize("codec", [codecs.SHUFFLE16, codecs.INT8COL, codecs.LOWRANK8])
@pytest.mark.parametrize("L", [1, 2, 7, 40])
def test_relation_codecs_round_trip(codec, L):
    rng = np.random.default_rng(L)
    m = L * (L + 1) // 2
    values = (rng.normal(size=m) * rng.choice([1e-6, 1.0, 100.0], size=m)).astype(np.float16)
    values[0] = -0.0
    decoded = codecs.decode(codec, np.frombuffer(codecs.encode(codec, values), np.uint8))
    assert decoded.dtype == np.float16 and decoded.shape == values.shape
    if codec == codecs.SHUFFLE16:
        assert np.array_equal(bits(decoded), bits(values))
    else:
        assert_relation_within_bound(codec, decoded, values)
    zeros = np.zeros(L * (L + 1) // 2, np.float16)
    assert not codecs.decode(codec, np.frombuffer(codecs.encode(codec, zeros), np.uint8)).any()


def freqdict_table(payload: bytes) -> np.ndarray:
    """The dictionary of a freqdict payload (its documented layout: uint32 D, then D uint32 differences in 4
    byte planes), read here without the codec."""
    size = int(np.frombuffer(payload[:4], np.uint32)[0])
    planes = np.frombuffer(payload[4: 4 + 4 * size], np.uint8).reshape(4, size)
    return np.cumsum(np.ascontiguousarray(planes.T).view(np.uint32).reshape(-1), dtype=np.uint32).view(np.int32)


@pytest.mark.parametrize("case", ["k = V", "duplicates in a row", "one id everywhere", "int32 extremes",
                                  "no rows", "over 65536 distinct ids"])
def test_freqdict_round_trips_any_int32_ids_in_their_order(case):
    rng = np.random.default_rng(len(case))
    ids = {"k = V": np.array([rng.permutation(cs.V) for _ in range(6)]),
           "duplicates in a row": rng.integers(0, 3, size=(5, 8)),
           "one id everywhere": np.full((4, 3), 151935),
           "int32 extremes": np.array([[-2 ** 31, 2 ** 31 - 1, 0, -1], [2 ** 31 - 1, -2 ** 31, 1, 0]]),
           "no rows": np.zeros((0, 64)),
           "over 65536 distinct ids": rng.permutation(70_003 * 3).reshape(3, 70_003)}[case].astype(np.int32)
    payload = codecs.encode(codecs.FREQDICT, ids)
    decoded = codecs.decode(codecs.FREQDICT, np.frombuffer(payload, np.uint8), ids.shape[1])
    assert decoded.dtype == np.int32 and decoded.shape == ids.shape and np.array_equal(decoded, ids)
    table = freqdict_table(payload)
    assert np.array_equal(np.sort(table), np.unique(ids))                # each distinct id once
    classes = np.floor(np.log2([(ids == t).sum() for t in table[:300]]))
    assert (np.diff(classes) <= 0).all()                                 # most frequent class first
    for c in np.unique(classes):                                         # then by ascending id (as uint32)
        assert (np.diff(table[:300][classes == c].view(np.uint32).astype(np.int64)) > 0).all()
    width = 2 if len(table) <= 1 << 16 else 4
    assert len(payload) == 4 + 4 * len(table) + width * ids.size


def random_relation(rng: np.random.Generator, L: int, eigenvalues: np.ndarray) -> np.ndarray:
    """(L, L) float64 `V diag(eigenvalues) Vᵀ / ‖·‖_F` with a random orthogonal V."""
    vectors, _ = np.linalg.qr(rng.standard_normal((L, L)))
    matrix = (vectors * eigenvalues) @ vectors.T
    matrix = 0.5 * (matrix + matrix.T)
    return matrix / np.linalg.norm(matrix)


SPECTRA = {"power 0.5": lambda n: n ** -0.5, "power 1": lambda n: 1.0 / n, "power 2": lambda n: n ** -2.0,
           "exponential": lambda n: np.exp(-n / 8), "rank 3": lambda n: (n <= 3) * 1.0,
           "flat": lambda n: np.ones_like(n), "indefinite": lambda n: (-1.0) ** n / n,
           "constant mode + power 1": lambda n: np.where(n == 1, 30.0, 1.0 / n)}


@pytest.mark.parametrize("spectrum", SPECTRA)
@pytest.mark.parametrize("L", [3, 60, 240])
def test_lowrank8_reaches_its_cosine_bound_at_the_smallest_rank_its_budget_allows(spectrum, L):
    rng = np.random.default_rng(L)
    exact = random_relation(rng, L, SPECTRA[spectrum](np.arange(1, L + 1, dtype=np.float64)))
    stored = exact[np.triu_indices(L)].astype(np.float16)            # what the dump gives the encoder
    payload = codecs.encode(codecs.LOWRANK8, stored)
    decoded = codecs.decode(codecs.LOWRANK8, np.frombuffer(payload, np.uint8))
    assert decoded.dtype == np.float16 and decoded.shape == stored.shape
    assert relation_cosine(decoded, stored) >= LOWRANK_COSINE
    side, rank = (int(v) for v in np.frombuffer(payload[:8], np.uint32))
    assert side == L and len(payload) == 8 + rank * (4 + L)
    energy = np.sort(np.linalg.eigvalsh(full_matrix(stored)) ** 2)[::-1]
    left_out = np.append(energy.sum() - np.cumsum(energy)[:-1], 0.0)            # by truncating at rank 1, 2, ...
    budget = (1 - LOWRANK_QUANT_SHARE) * (1 - LOWRANK_COSINE ** 2) * energy.sum()
    needed = int(np.flatnonzero(left_out <= budget)[0]) + 1
    assert needed <= rank <= min(L, needed + max(1, needed // 16))   # at most one step past the eigenvalues' rank
    if spectrum == "rank 3":
        assert rank == min(L, 3)


@pytest.mark.parametrize("L, values", [
    (0, []), (1, [0.0]), (1, [-0.25]), (5, [0.0] * 15),
    (4, np.diag([1.0, -1e-3, 0.5, 1e-7])[np.triu_indices(4)]),          # spiky eigenvectors, tiny and negative values
    (3, np.full(6, 1e-7)),                                               # float16 subnormals
])
def test_lowrank8_round_trips_degenerate_relations(L, values):
    stored = np.asarray(values, np.float16)
    payload = codecs.encode(codecs.LOWRANK8, stored)
    decoded = codecs.decode(codecs.LOWRANK8, np.frombuffer(payload, np.uint8))
    assert decoded.dtype == np.float16 and decoded.shape == (L * (L + 1) // 2,) and np.isfinite(decoded).all()
    assert relation_cosine(decoded, stored) >= LOWRANK_COSINE
    if not stored.any():
        assert len(payload) == 8 and not decoded.any()                   # rank 0: the header alone


def test_lowrank8_refuses_what_it_cannot_store():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or inf"):
            codecs.encode(codecs.LOWRANK8, np.array([1.0, bad, 0.5], np.float16))
    with pytest.raises(codecs.CodecError, match=r"not L \(L \+ 1\) / 2"):
        codecs.encode(codecs.LOWRANK8, np.zeros(4, np.float16))
    try:                                              # at float16's limit: refused, or decoded finite
        payload = codecs.encode(codecs.LOWRANK8, np.full(3, 65504, np.float16))
    except ValueError as e:
        assert "normalise it first" in str(e)
    else:
        assert np.isfinite(codecs.decode(codecs.LOWRANK8, np.frombuffer(payload, np.uint8))).all()


def header(L: int, rank: int) -> bytes:
    return np.array([L, rank], np.uint32).tobytes()


@pytest.mark.parametrize("codec, payload, k, message", [
    (codecs.SHUFFLE32, b"\0" * 10, 2, "not a whole number of rows"),
    (codecs.DELTA16, b"\0" * 3, 1, "not a whole number of rows"),
    (codecs.LOGQ8, b"\0" * 5, 2, "not a whole number of rows"),
    (codecs.SHUFFLE16, b"\0" * 5, None, "not a multiple of 2"),
    (codecs.INT8COL, b"\0" * 3, None, "less than its float32 scale"),
    (codecs.INT8COL, np.array([np.nan], np.float32).tobytes() + b"\0", None, "expected a finite number > 0"),
    (codecs.INT8COL, np.array([1.0], np.float32).tobytes() + b"\0" * 4, None, r"not L \(L \+ 1\) / 2"),
    (codecs.FREQDICT, b"\0" * 3, 2, "less than its uint32 dictionary size"),
    (codecs.FREQDICT, np.array([5], np.uint32).tobytes() + b"\0" * 8, 2, "a dictionary of 5 ids, more than its 8"),
    (codecs.FREQDICT, np.array([1, 7], np.uint32).tobytes() + b"\0" * 3, 1, "not a whole number of rows"),
    (codecs.FREQDICT, np.array([1, 7], np.uint32).tobytes() + bytes([0, 1, 0, 0]), 1,   # indices 0, 1
     "has index 1, past its dictionary of 1 ids"),
    (codecs.LOWRANK8, b"\0" * 7, None, "less than its header"),
    (codecs.LOWRANK8, header(3, 4), None, "rank r = 4, expected r <= L"),
    (codecs.LOWRANK8, header(1 << 20, 0), None, "expected r <= L <= 16384"),
    (codecs.LOWRANK8, header(3, 1) + b"\0" * 6, None, r"holds 14 bytes, expected 8 \+ r \(4 \+ L\) = 15"),
    (codecs.LOWRANK8, header(1, 1) + np.array([np.nan], np.float32).tobytes() + b"\1", None, "non-finite column weight"),
])
def test_malformed_payloads_raise_codec_errors(codec, payload, k, message):
    with pytest.raises(codecs.CodecError, match=message):
        codecs.decode(codec, np.frombuffer(payload, np.uint8), k)
