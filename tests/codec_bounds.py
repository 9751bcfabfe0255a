"""The documented bounds of the `compact` codecs (kdcache/codecs.py, docs/design.md §4), written out here
rather than read from kdcache.codecs, and checked against a plain float64 reference; shared by
test_codecs.py (caches) and test_codec_payloads.py (the codecs themselves)."""

from __future__ import annotations

import numpy as np


# compact's documented bounds (docs/design.md §4), written out here rather than read from kdcache.codecs
LOGQ8_HALF_STEP = 1 / 32          # nats, within LOGQ8_RANGE of the row's largest log-prob
LOGQ8_RANGE = 15.875              # nats below it: further down, the value decodes to largest - LOGQ8_RANGE
LOWRANK_COSINE = 0.9995           # lowrank8: cosine of the decoded relation to the one encoded
LOWRANK_QUANT_SHARE = 0.1         # lowrank8: share of the error energy 1 - cos² left for quantising, not truncation


def bits(values) -> np.ndarray:
    return np.asarray(values, np.float16).view(np.uint16)


def logq8_bound(stored: np.ndarray, row_max: np.ndarray) -> np.ndarray:
    """Worst case |decoded - stored| of an entry within 254 steps of its row's largest: half a step plus
    the float16 rounding of the decoded value (half its spacing, <= 2^-11 |x|) and of the row's largest."""
    return LOGQ8_HALF_STEP + (np.abs(stored) + np.abs(row_max)) * 2.0 ** -11


def assert_logq8_within_bound(decoded: np.ndarray, stored: np.ndarray) -> None:
    x, y = stored.astype(np.float64), decoded.astype(np.float64)
    assert np.array_equal(np.isneginf(x), np.isneginf(y))
    finite = np.isfinite(x)
    top = np.broadcast_to(np.max(np.where(finite, x, -1e9), axis=1, initial=-1e9)[:, None], x.shape)
    floor = top - LOGQ8_RANGE
    near = finite & (x >= floor - LOGQ8_HALF_STEP)
    assert (np.abs(y[near] - x[near]) <= logq8_bound(x[near], top[near])).all()
    far = finite & ~near                            # stored at the floor: a probability error < e^-15.875 p_max
    assert (np.abs(y[far] - floor[far]) <= logq8_bound(floor[far], top[far])).all()
    assert (np.abs(np.exp(y[far]) - np.exp(x[far])) <= np.exp(floor[far] + 2 * LOGQ8_HALF_STEP)).all()


def assert_int8col_within_bound(decoded: np.ndarray, stored: np.ndarray) -> None:
    x = stored.astype(np.float64)
    step = np.abs(x).max() / 127
    assert (np.abs(decoded.astype(np.float64) - x) <= step / 2 + np.abs(x) * 2.0 ** -10 + 1e-12).all()


def full_matrix(packed: np.ndarray) -> np.ndarray:
    """The symmetric (L, L) float64 matrix of a packed upper triangle (row-major, diagonal included)."""
    L = int((np.sqrt(8 * len(packed) + 1) - 1) // 2)
    matrix = np.zeros((L, L))
    matrix[np.triu_indices(L)] = np.asarray(packed, np.float64)
    return matrix + np.triu(matrix, 1).T


def relation_cosine(decoded: np.ndarray, stored: np.ndarray) -> float:
    """Cosine of two packed triangles as full symmetric matrices (1 when both are zero)."""
    a, b = full_matrix(decoded), full_matrix(stored)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float((a * b).sum() / norms) if norms > 0 else float(not a.any() and not b.any())


def assert_relation_within_bound(codec: str, decoded: np.ndarray, stored: np.ndarray) -> None:
    """`compact`'s relation as its preset stores it: int8col's per-value bound, lowrank8's cosine bound."""
    if codec == "int8col":
        assert_int8col_within_bound(decoded, stored)
    else:
        assert relation_cosine(decoded, stored) >= LOWRANK_COSINE


def renormalised_kl(stored: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """KL(stored || exact) per row, both renormalised over the row's k entries (rows with some mass)."""
    q, p = np.exp(stored.astype(np.float64)), np.exp(exact.astype(np.float64))
    keep = (q.sum(1) > 0) & (p.sum(1) > 0)
    q, p = q[keep] / q[keep].sum(1, keepdims=True), p[keep] / p[keep].sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0).sum(1)
