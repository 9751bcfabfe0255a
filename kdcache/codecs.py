"""Per-column codecs of cache format version 2 (docs/design.md §4): numpy only, no pyarrow, no torch.

A format-2 shard stores each encoded column as one `binary` payload per sample; the manifest's
`codecs` maps every encoded column to the codec that wrote it. Decoding gives back exactly the
arrays a version-1 shard holds (ids int32 (n, k), log-probs float16 (n, k), relation float16 (m,)),
and `kdcache.encoding.DecodedBatch` then runs every row check on those decoded values. Rows keep
the order the dump wrote (the teacher's top-k, by descending log-prob): measured smaller than
storing ids in ascending id order (docs/decisions.md, "Cache format v2").

Column codecs (the names are part of the format; each is a fixed layout, no parameters):

* `shuffle32` (top-k ids): the int32 ids, byte planes (all first bytes, then all second, ...).
* `freqdict` (top-k ids, exact for any int32): a per-sample dictionary of the distinct ids: uint32 `D`, then
  the D ids as uint32 differences from the previous one modulo 2^32 (4 byte planes), then every entry, rows
  and their order kept, as its index into the dictionary, uint16 if D <= 65536 else uint32 (byte planes).
  The encoder orders the dictionary by frequency class in the sample, `floor(log2(count))` descending, and
  within a class by ascending id as uint32 (runs of small differences); the decoder needs no order. Common ids get
  small indices (the high byte plane is mostly zero), ids recurring across a sample's rows are spelled out
  once. Duplicates within a row, k = V, any int32 round-trip.
* `delta16` (top-k log-probs, lossless): each row's float16 bit patterns as uint16, every entry
  after a row's first replaced by its difference from the previous one modulo 2^16 (descending
  log-probs have slowly rising bit patterns), then 2 byte planes. Exact for every bit pattern.
* `logq8` (top-k log-probs, lossy): per row its largest value `m` (float16, 2 byte planes), then one
  uint8 code per entry, `c = round((m - x) / LOGQ8_STEP)` clamped to 254, 255 for -inf, stored as
  differences along the row modulo 256. Decoded `m - c * LOGQ8_STEP` (float16). Worst case: an entry
  within 254 steps (15.875 nats) of its row's largest is off by at most LOGQ8_STEP / 2 = 1/32 nat in
  log-probability (+ float16 rounding); one further below is stored as `m - 15.875` nats, a probability
  error below e^-15.875 ~ 1.3e-7 times the row's largest probability; -inf stays -inf.
* `shuffle16` (relation, lossless): the float16 values, 2 byte planes.
* `int8col` (relation, lossy): a float32 scale `s = max|x| / 127`, then the int8 codes `X = round(x / s)`
  of the upper triangle, each (i >= 1) as its difference from the one above it in the matrix,
  `X[i,j] - X[i-1,j]` modulo 256 (neighbouring patches have similar relations; the one above is in the
  triangle too, so decoding is one cumulative sum down the columns), in the triangle's row-major order.
  Decoded `float16(c * s)`: an absolute error of at most s / 2 per value (+ float16 rounding).
* `lowrank8` (relation, lossy): `R ≈ Q diag(w) Qᵀ` with Q int8 (L, r), w float32 (r,): uint32 L, uint32 r,
  the r weights, then Q column by column (r x L int8), each column's codes as differences along the column
  modulo 256. The encoder takes the eigendecomposition of the (L, L) matrix of the triangle it is given,
  eigenvalues by magnitude. A cosine >= LOWRANK_COSINE allows an error energy of B = (1 - cos²) sum λ_i²;
  r is the smallest rank whose truncation leaves out at most (1 - LOWRANK_QUANT_SHARE) B (sum_{i>r} λ_i²),
  and column i is `round(v_i / step_i)` with the step that gives its rounding error (~2 λ_i² L step_i² / 12)
  an equal part of LOWRANK_QUANT_SHARE B, within [max|v_i| / 127, max|v_i|]: strong columns get fine steps,
  weak ones coarse (few distinct codes, which zstd packs); `w_i = λ_i step_i²`. If the decoded triangle's
  cosine to the given one falls short, r grows by max(1, r / 16) until it does (at full rank it is kept
  whatever it reaches). **Bound**: cosine of the decoded relation (full
  symmetric matrix) to the one encoded >= LOWRANK_COSINE = 0.9995, checked on the decoded float16 values
  (a reader's float32 matmul may round differently, by ~1e-7 relative). Negative eigenvalues (rounding, or a
  relation that is not PSD) get negative weights; where all weights are >= 0, `Z = Q diag(sqrt w)` is a
  factor with `R ≈ Z Zᵀ`. Decoded to the packed float16 triangle (`float32 Q diag(w) Qᵀ`), the layout of the
  other relation codecs. A zero matrix is rank 0 (the header alone); NaN / inf input is refused (ValueError).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from kdcache import blas

CodecName = Literal["v1", "lossless", "compact"]
CODEC_NAMES = ("v1", "lossless", "compact")

SHUFFLE32, DELTA16, LOGQ8, SHUFFLE16, INT8COL = "shuffle32", "delta16", "logq8", "shuffle16", "int8col"
FREQDICT, LOWRANK8 = "freqdict", "lowrank8"
LOGQ8_STEP = 1.0 / 16           # nats per code
LOGQ8_FLOOR_CODE, LOGQ8_NEG_INF = 254, 255
# lowrank8: the decoded relation's cosine to the one given to the encoder is at least this (checked on the
# decoded values); measured 0.99950-0.99952 to the exact float64 matrix at LLaVA shapes (docs/decisions.md)
LOWRANK_COSINE = 0.9995
# share of the error a cosine >= LOWRANK_COSINE allows (1 - cos² of the energy) given to quantising Q, the
# rest to truncation: 0.1 halves the payload of full int8 columns (docs/decisions.md)
LOWRANK_QUANT_SHARE = 0.1
LOWRANK_MAX_SIDE = 1 << 14      # a payload claiming a larger L is refused before anything is allocated

# column kind -> the codecs that may store it ("ids", "logprobs", "relation")
KIND_CODECS = {"ids": (SHUFFLE32, FREQDICT), "logprobs": (DELTA16, LOGQ8), "relation": (SHUFFLE16, INT8COL, LOWRANK8)}
# codec preset (kdcache dump --codec) -> column kind -> codec; "v1" encodes nothing
PRESETS = {"lossless": {"ids": FREQDICT, "logprobs": DELTA16, "relation": SHUFFLE16},
           "compact": {"ids": FREQDICT, "logprobs": LOGQ8, "relation": LOWRANK8}}


class CodecError(ValueError):
    """A payload that cannot be decoded (the caller names the shard, sample and column)."""


# --- byte planes


def shuffle(values: np.ndarray) -> bytes:
    """The bytes of a contiguous array as byte planes (byte 0 of every value, then byte 1, ...)."""
    flat = np.ascontiguousarray(values).reshape(-1)
    return flat.view(np.uint8).reshape(len(flat), flat.itemsize).T.tobytes()


def unshuffle(data: np.ndarray, dtype) -> np.ndarray:
    """Inverse of `shuffle`: (n,) values of `dtype` from n * itemsize uint8 bytes."""
    size = np.dtype(dtype).itemsize
    if len(data) % size:
        raise CodecError(f"holds {len(data)} bytes, not a multiple of {size}")
    n = len(data) // size
    out = np.empty(len(data), np.uint8)
    for plane in range(size):                         # strided copies: faster than a transposed copy
        out[plane::size] = data[plane * n: (plane + 1) * n]
    return out.view(dtype)


def _rows(data: np.ndarray, per_row: int, k: int, what: str) -> int:
    if len(data) % per_row:
        raise CodecError(f"holds {len(data)} bytes, not a whole number of rows of {k} {what} ({per_row} bytes each)")
    return len(data) // per_row


# --- top-k ids and log-probs ((n, k) per sample)


def encode_ids(ids: np.ndarray) -> bytes:
    return shuffle(ids.astype(np.int32, copy=False))


def decode_ids(data: np.ndarray, k: int) -> np.ndarray:
    n = _rows(data, 4 * k, k, "int32 ids")
    return unshuffle(data, np.int32).reshape(n, k)


def encode_freqdict(ids: np.ndarray) -> bytes:
    values = np.ascontiguousarray(ids, np.int32).reshape(-1).view(np.uint32)
    table, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    classes = np.frexp(counts)[1]                   # floor(log2(count)) + 1: the frequency class
    order = np.lexsort((table, -classes))           # most frequent class first; within a class by ascending id
    rank = np.empty(len(table), np.uint32)
    rank[order] = np.arange(len(table), dtype=np.uint32)
    table = table[order]
    delta = table.copy()
    delta[1:] -= table[:-1]                         # uint32 arithmetic: modulo 2^32
    index = rank[inverse.reshape(-1)].astype(_index_dtype(len(table)))
    return np.array([len(table)], np.uint32).tobytes() + shuffle(delta) + shuffle(index)


def decode_freqdict(data: np.ndarray, k: int) -> np.ndarray:
    if len(data) < 4:
        raise CodecError(f"holds {len(data)} bytes, less than its uint32 dictionary size")
    size = int(data[:4].view(np.uint32)[0])
    if size > (len(data) - 4) // 4:
        raise CodecError(f"has a dictionary of {size} ids, more than its {len(data) - 4} bytes hold")
    table = np.cumsum(unshuffle(data[4: 4 + 4 * size], np.uint32), dtype=np.uint32).view(np.int32)
    dtype = _index_dtype(size)
    rest = data[4 + 4 * size:]
    n = _rows(rest, dtype.itemsize * k, k, f"uint{8 * dtype.itemsize} indices")
    index = unshuffle(rest, dtype)
    if len(index) and int(index.max()) >= size:
        raise CodecError(f"has index {int(index.max())}, past its dictionary of {size} ids")
    return np.take(table, index).reshape(n, k)


def _index_dtype(size: int) -> np.dtype:
    return np.dtype(np.uint16 if size <= 1 << 16 else np.uint32)


def encode_delta16(logprobs: np.ndarray) -> bytes:
    bits = np.ascontiguousarray(logprobs, np.float16).view(np.uint16)
    delta = bits.copy()
    delta[:, 1:] -= bits[:, :-1]                   # uint16 arithmetic: modulo 2^16
    return shuffle(delta)


def decode_delta16(data: np.ndarray, k: int) -> np.ndarray:
    n = _rows(data, 2 * k, k, "float16 log-probs")
    delta = unshuffle(data, np.uint16).reshape(n, k)
    return np.cumsum(delta, axis=1, dtype=np.uint16).view(np.float16)


def encode_logq8(logprobs: np.ndarray) -> bytes:
    values = np.asarray(logprobs, np.float16)
    n, k = values.shape
    top = values.max(axis=1, initial=-np.inf) if k else np.zeros(n, np.float16)
    with np.errstate(invalid="ignore"):           # -inf - -inf on a row of -inf only
        steps = (top.astype(np.float32)[:, None] - values.astype(np.float32)) / LOGQ8_STEP
        codes = np.where(np.isfinite(steps), np.clip(np.rint(steps), 0, LOGQ8_FLOOR_CODE), LOGQ8_FLOOR_CODE)
    codes = np.where(np.isneginf(values), LOGQ8_NEG_INF, codes).astype(np.uint8)
    delta = codes.copy()
    delta[:, 1:] -= codes[:, :-1]                  # uint8 arithmetic: modulo 256
    return shuffle(top.astype(np.float16)) + delta.tobytes()


def decode_logq8(data: np.ndarray, k: int) -> np.ndarray:
    n = _rows(data, k + 2, k, "uint8 codes and a float16 row maximum")
    top = unshuffle(data[:2 * n], np.float16).astype(np.float32)
    codes = np.cumsum(data[2 * n:].reshape(n, k), axis=1, dtype=np.uint8)
    values = top[:, None] - codes.astype(np.float32) * LOGQ8_STEP
    values[codes == LOGQ8_NEG_INF] = -np.inf
    with np.errstate(invalid="ignore"):              # a NaN / inf maximum: refused by the row checks
        return values.astype(np.float16)


# --- relation (the upper triangle, m = L (L + 1) / 2 values)


def encode_shuffle16(relation: np.ndarray) -> bytes:
    return shuffle(np.asarray(relation, np.float16))


def decode_shuffle16(data: np.ndarray) -> np.ndarray:
    return unshuffle(data, np.float16)


def encode_int8col(relation: np.ndarray) -> bytes:
    values = np.asarray(relation, np.float32)
    upper = _upper(side_of(len(values)))
    peak = float(np.abs(values).max()) if len(values) else 0.0
    scale = np.float32(peak / 127 if peak > 0 else 1.0)
    codes = np.zeros(upper.shape, np.uint8)
    codes[upper] = np.clip(np.rint(values / scale), -127, 127).astype(np.int8).view(np.uint8)
    diff = codes.copy()
    diff[1:] -= codes[:-1]                          # uint8 arithmetic: modulo 256
    return np.array([scale], np.float32).tobytes() + diff[upper].tobytes()


def decode_int8col(data: np.ndarray) -> np.ndarray:
    if len(data) < 4:
        raise CodecError(f"holds {len(data)} bytes, less than its float32 scale")
    scale = np.float32(data[:4].view(np.float32)[0])
    if not (np.isfinite(scale) and scale > 0):
        raise CodecError(f"has scale {scale}, expected a finite number > 0")
    upper = _upper(side_of(len(data) - 4))
    diff = np.zeros(upper.shape, np.uint8)
    diff[upper] = data[4:]
    codes = np.cumsum(diff, axis=0, dtype=np.uint8)[upper]       # zeros below the diagonal add nothing
    with np.errstate(over="ignore"):                 # a scale beyond float16: inf, refused by the row checks
        table = (np.arange(256, dtype=np.uint8).view(np.int8).astype(np.float32) * scale).astype(np.float16)
    return np.take(table, codes)


def encode_lowrank8(relation: np.ndarray) -> bytes:
    values = np.asarray(relation, np.float16)
    if not np.isfinite(values).all():
        raise ValueError("relation holds NaN or inf: lowrank8 cannot store it")
    L = side_of(len(values))
    matrix = np.zeros((L, L))
    matrix[_upper(L)] = values
    matrix = matrix + np.triu(matrix, 1).T                              # (L, L) float64, symmetric
    codes, weights = _lowrank_fit(matrix)
    diff = codes.view(np.uint8).copy()
    diff[:, 1:] -= codes.view(np.uint8)[:, :-1]                        # uint8 arithmetic: modulo 256
    return np.array([L, len(weights)], np.uint32).tobytes() + weights.tobytes() + diff.tobytes()


def _lowrank_fit(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes int8 (r, L), weights float32 (r,)) for `matrix` (L, L): the smallest rank whose truncation
    (eigenvalues by magnitude) leaves at most (1 - LOWRANK_QUANT_SHARE) of the error energy a cosine of
    LOWRANK_COSINE allows, each column quantised with a step giving it an equal part of the rest; the rank
    raised by max(1, r / 16) until the decoded triangle meets the bound (at full rank it is kept as it is)."""
    L = len(matrix)
    if not (matrix * matrix).sum():
        return np.zeros((0, L), np.int8), np.zeros(0, np.float32)
    eigenvalues, vectors = np.linalg.eigh(matrix)
    order = np.argsort(-np.abs(eigenvalues), kind="stable")
    eigenvalues, vectors = eigenvalues[order], vectors[:, order]
    energy = eigenvalues ** 2
    budget = (1 - LOWRANK_COSINE ** 2) * energy.sum()                   # error energy within the bound
    tail = energy.sum() - np.cumsum(energy)                             # left out at rank i + 1
    tail[-1] = 0.0
    rank = int(np.argmax(tail <= (1 - LOWRANK_QUANT_SHARE) * budget)) + 1
    while True:
        peak = np.abs(vectors[:, :rank]).max(axis=0)                     # > 0: unit columns
        # rounding a column to `step` adds ~2 λ² L step² / 12 of error energy: an equal part of the share each,
        # the step between int8's finest (peak / 127) and one code for the peak (weights stay <= |λ|)
        with np.errstate(over="ignore"):                                # a tiny eigenvalue: the coarsest step
            wanted = 6 * LOWRANK_QUANT_SHARE * budget / (rank * L * np.maximum(energy[:rank], np.finfo(float).tiny))
        step = np.clip(np.sqrt(wanted), peak / 127, peak)
        codes = np.clip(np.rint(vectors[:, :rank] / step), -127, 127).astype(np.int8).T
        weights = (eigenvalues[:rank] * step ** 2).astype(np.float32)
        decoded = np.zeros((L, L))
        decoded[_upper(L)] = _lowrank_triangle(codes, weights, L)
        decoded = decoded + np.triu(decoded, 1).T
        norm = np.linalg.norm(decoded)
        if not np.isfinite(norm):
            raise ValueError("relation values this close to the float16 limit decode to inf: normalise it first")
        if rank == L or (norm > 0 and (decoded * matrix).sum() / (norm * np.linalg.norm(matrix)) >= LOWRANK_COSINE):
            return codes, weights
        rank = min(L, rank + max(1, rank // 16))


def _lowrank_triangle(codes: np.ndarray, weights: np.ndarray, L: int) -> np.ndarray:
    """The packed float16 triangle of `Q diag(weights) Qᵀ`, Q = codes.T (L, r), computed in float32."""
    if not len(weights):
        return np.zeros(L * (L + 1) // 2, np.float16)
    q = codes.astype(np.float32)                                        # (r, L)
    # one BLAS thread: a reader decodes one sample per worker, and idle BLAS threads spin (kdcache.blas)
    with np.errstate(over="ignore", invalid="ignore"), blas.one_thread():   # beyond float16: inf, refused by row checks
        return ((q.T * weights) @ q)[_upper(L)].astype(np.float16)


def decode_lowrank8(data: np.ndarray) -> np.ndarray:
    if len(data) < 8:
        raise CodecError(f"holds {len(data)} bytes, less than its header (uint32 side L, uint32 rank r)")
    L, rank = (int(v) for v in data[:8].view(np.uint32))
    if L > LOWRANK_MAX_SIDE or rank > L:
        raise CodecError(f"has side L = {L} and rank r = {rank}, expected r <= L <= {LOWRANK_MAX_SIDE}")
    if len(data) != 8 + rank * (4 + L):
        raise CodecError(f"holds {len(data)} bytes, expected 8 + r (4 + L) = {8 + rank * (4 + L)} "
                         f"for side L = {L} and rank r = {rank}")
    weights = data[8: 8 + 4 * rank].view(np.float32)
    if not np.isfinite(weights).all():
        raise CodecError("has a non-finite column weight")
    codes = np.cumsum(data[8 + 4 * rank:].reshape(rank, L), axis=1, dtype=np.uint8).view(np.int8)
    return _lowrank_triangle(codes, weights, L)


def side_of(m: int) -> int:
    """L with L (L + 1) / 2 == m (CodecError if there is none)."""
    L = int((np.sqrt(8 * m + 1) - 1) // 2)
    while L * (L + 1) // 2 < m:
        L += 1
    if L * (L + 1) // 2 != m:
        raise CodecError(f"holds {m} relation values, not L (L + 1) / 2 for any L")
    return L


_UPPER: dict[int, np.ndarray] = {}


def _upper(L: int) -> np.ndarray:
    """(L, L) bool mask of the upper triangle, diagonal included: selecting with it gives the triangle in
    row-major order (`kdcache.targets.pack_upper`'s layout). Cached per L."""
    if L not in _UPPER:
        if len(_UPPER) > 8:
            _UPPER.clear()
        _UPPER[L] = np.triu(np.ones((L, L), bool))
    return _UPPER[L]


# --- by name

_ENCODE_TOPK = {SHUFFLE32: encode_ids, FREQDICT: encode_freqdict, DELTA16: encode_delta16, LOGQ8: encode_logq8}
_DECODE_TOPK = {SHUFFLE32: decode_ids, FREQDICT: decode_freqdict, DELTA16: decode_delta16, LOGQ8: decode_logq8}
_ENCODE_RELATION = {SHUFFLE16: encode_shuffle16, INT8COL: encode_int8col, LOWRANK8: encode_lowrank8}
_DECODE_RELATION = {SHUFFLE16: decode_shuffle16, INT8COL: decode_int8col, LOWRANK8: decode_lowrank8}


def encode(codec: str, values: np.ndarray) -> bytes:
    """One sample's column (top-k (n, k) or relation (m,)) as a `codec` payload."""
    return (_ENCODE_TOPK.get(codec) or _ENCODE_RELATION[codec])(values)


def decode(codec: str, data: np.ndarray, k: int | None = None) -> np.ndarray:
    """One sample's payload (uint8 (bytes,)) decoded; `k` for top-k columns. CodecError if malformed."""
    if codec in _DECODE_TOPK:
        return _DECODE_TOPK[codec](data, k)
    if codec in _DECODE_RELATION:
        return _DECODE_RELATION[codec](data)
    raise CodecError(f"unknown codec {codec!r}")
