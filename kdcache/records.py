"""What the writer stores: one sample dict checked against the format and coerced to the stored
dtypes (`coerce_sample`), its statistics, and 1-4 of them packed into one Arrow record batch of the
shard schema from flat numpy buffers (`record_batch`), format 2's encoded columns as one codec payload
per sample (`kdcache.codecs`). No per-element Python.

The other direction, checking every row read back from an untrusted shard, is `kdcache.encoding`.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from kdcache import codecs
from kdcache.errors import SampleError
from kdcache.schema import (COLUMNS, ENCODED, IMAGE, IMAGE_SHA256, INPUT_IDS, INT32_MAX, RAGGED, RELATION,
                            RELATION_NORM, RESPONSE_ROWS, SAMPLE_ID, TOPK, TOPK_COLUMNS, VISUAL_LEN, VISUAL_START,
                            relation_size)


def coerce_sample(sample: dict, *, k_response: int, k_visual: int) -> dict:
    """Check one sample and convert it to the stored dtypes; raises SampleError naming the sample.

    Expects every column name as a key, nothing else:
      sample_id str; input_ids (T,) ints, T > 0; response_rows (R,) ints, sorted, unique, each < T - 1
      (row t predicts token t + 1); visual_start, visual_len ints, visual_start + visual_len <= T;
      image bytes | None; image_sha256 32 bytes | None (must be the hash of image when both are given);
      response_topk_ids / _logprobs (R, k_response); visual_topk_ids / _logprobs (visual_len, k_visual);
      ids >= 0 (stored int32), logprobs <= 0 and not NaN (stored float16);
      relation (visual_len * (visual_len + 1) / 2,) floats (stored float16) and relation_norm float:
      both or neither, and only with visual_len > 0.
    Arrays may be numpy arrays, lists or CPU tensors; empty arrays may have any dtype.
    """
    sample_id = sample.get(SAMPLE_ID) if isinstance(sample, dict) else None
    if not isinstance(sample_id, str) or not sample_id:
        raise SampleError(str(sample_id), f"{SAMPLE_ID} must be a non-empty string, got {sample_id!r}")
    missing = [c for c in COLUMNS if c not in sample]
    unknown = sorted(set(sample) - set(COLUMNS))
    if missing or unknown:
        raise SampleError(sample_id, f"shard record has missing keys {missing} / unknown keys {unknown}")

    out = {SAMPLE_ID: sample_id}
    input_ids = out[INPUT_IDS] = _ints(sample, INPUT_IDS, (None,))
    T = len(input_ids)
    if T == 0:
        raise SampleError(sample_id, f"{INPUT_IDS} is empty")
    rows = out[RESPONSE_ROWS] = _ints(sample, RESPONSE_ROWS, (None,))
    if len(rows) and (rows[-1] >= T - 1 or np.any(np.diff(rows) <= 0)):
        raise SampleError(sample_id, f"{RESPONSE_ROWS} must be sorted unique rows t < T - 1 = {T - 1} "
                                     "(row t predicts token t + 1)")
    start = out[VISUAL_START] = _int(sample, VISUAL_START)
    L = out[VISUAL_LEN] = _int(sample, VISUAL_LEN)
    if start + L > T:
        raise SampleError(sample_id, f"visual rows [{start}, {start + L}) run past the sequence (T = {T})")

    image = out[IMAGE] = _bytes(sample, IMAGE, None)
    image_sha256 = out[IMAGE_SHA256] = _bytes(sample, IMAGE_SHA256, 32)
    if image is not None and image_sha256 is not None and hashlib.sha256(image).digest() != image_sha256:
        raise SampleError(sample_id, f"{IMAGE_SHA256} is not the sha256 of {IMAGE}")

    for role, num_rows, k in (("response", len(rows), k_response), ("visual", L, k_visual)):
        ids_column, logprobs_column = TOPK_COLUMNS[role]
        why = f"(len({RESPONSE_ROWS}), k_response)" if role == "response" else f"({VISUAL_LEN}, k_visual)"
        out[ids_column] = _ints(sample, ids_column, (num_rows, k), why)
        out[logprobs_column] = _float16(sample, logprobs_column, (num_rows, k), why, logprobs=True)

    if (sample[RELATION] is None) != (sample[RELATION_NORM] is None):
        raise SampleError(sample_id, f"{RELATION} and {RELATION_NORM} must be given together (or both None)")
    out[RELATION] = out[RELATION_NORM] = None
    if sample[RELATION] is not None:
        if L == 0:
            raise SampleError(sample_id, f"has a {RELATION} but no visual rows ({VISUAL_LEN} = 0)")
        out[RELATION] = _float16(sample, RELATION, (relation_size(L),), "(visual_len * (visual_len + 1) / 2,)")
        norm = sample[RELATION_NORM]
        if not isinstance(norm, (int, float, np.floating, np.integer)) or not math.isfinite(float(norm)):
            raise SampleError(sample_id, f"{RELATION_NORM} must be a finite float, got {norm!r}")
        out[RELATION_NORM] = float(norm)
    return out


def sample_stats(record: dict) -> dict:
    """Summable statistics of one coerced sample (the sidecars sum them, the manifest averages them)."""
    stats = {"tokens": len(record[INPUT_IDS]), "rows": {}, "tail_mass_sum": {},
             "samples_with_image": int(record[VISUAL_LEN] > 0),
             "samples_with_relation": int(record[RELATION] is not None),
             "image_bytes": len(record[IMAGE]) if record[IMAGE] is not None else 0}
    for role, (_, logprobs_column) in TOPK_COLUMNS.items():
        logprobs = record[logprobs_column].astype(np.float32)                       # (N, K)
        tail = np.clip(1.0 - np.exp(logprobs).sum(axis=1), 0.0, None)               # (N,) as the loss sees it
        stats["rows"][role] = len(logprobs)
        stats["tail_mass_sum"][role] = float(tail.sum())
    return stats


def raw_bytes(record: dict) -> int:
    """Uncompressed size of a coerced sample's arrays and image."""
    return sum(v.nbytes if isinstance(v, np.ndarray) else len(v) if isinstance(v, bytes) else 0
               for v in record.values())


def record_batch(records: list[dict], shard_schema: pa.Schema,
                 column_codecs: dict[str, str] | None = None) -> pa.RecordBatch:
    """One record batch of coerced samples, built from flat numpy buffers; with `column_codecs` (format 2,
    `schema.column_codecs`) each encoded column holds one codec payload per sample (null for a null value)."""
    columns = {
        SAMPLE_ID: pa.array([r[SAMPLE_ID] for r in records], pa.string()),
        VISUAL_START: pa.array(np.array([r[VISUAL_START] for r in records], np.int32)),
        VISUAL_LEN: pa.array(np.array([r[VISUAL_LEN] for r in records], np.int32)),
        IMAGE: pa.array([r[IMAGE] for r in records], pa.binary()),
        IMAGE_SHA256: pa.array([r[IMAGE_SHA256] for r in records], pa.binary(32)),
        RELATION_NORM: pa.array([r[RELATION_NORM] for r in records], pa.float32()),
    }
    for name in RAGGED + TOPK:
        if column_codecs is not None and name in ENCODED:
            columns[name] = pa.array([None if r[name] is None else codecs.encode(column_codecs[name], r[name])
                                      for r in records], pa.binary())
        else:
            columns[name] = _list_array([r[name] for r in records], shard_schema.field(name).type)
    return pa.RecordBatch.from_arrays([columns[c] for c in COLUMNS], schema=shard_schema)


def _list_array(arrays: list[np.ndarray | None], list_type: pa.ListType) -> pa.ListArray:
    """list<x> or list<fixed_size_list<x, K>> from per-sample (N,) / (N, K) arrays; None gives a null."""
    lengths = [0 if a is None else len(a) for a in arrays]
    if sum(lengths) > INT32_MAX:
        raise ValueError(f"record batch too large for int32 list offsets ({sum(lengths)} entries)")
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    inner = list_type.value_type
    primitive = inner.value_type if pa.types.is_fixed_size_list(inner) else inner
    present = [a.reshape(-1) for a in arrays if a is not None]
    flat = np.concatenate(present) if present else np.zeros(0, primitive.to_pandas_dtype())
    values = pa.array(flat, primitive)
    if pa.types.is_fixed_size_list(inner):
        values = pa.FixedSizeListArray.from_arrays(values, inner.list_size)
    mask = pa.array([a is None for a in arrays]) if any(a is None for a in arrays) else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _check_shape(arr: np.ndarray, sample: dict, key: str, shape: tuple, why: str) -> None:
    if arr.ndim != len(shape) or any(want is not None and got != want for got, want in zip(arr.shape, shape)):
        expected = "(" + ", ".join("n" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
        raise SampleError(sample[SAMPLE_ID], f"{key} has shape {arr.shape}, expected {expected} {why}".rstrip())


def _empty(arr: np.ndarray, sample: dict, key: str, shape: tuple, why: str, dtype) -> np.ndarray:
    """An empty input of any dtype (a bare [] is float64) stands for an empty array of the stored dtype."""
    target = [0 if d is None else d for d in shape]
    if math.prod(target) != 0:
        _check_shape(arr, sample, key, shape, why)
    return np.zeros(target, dtype)


def _ints(sample: dict, key: str, shape: tuple, why: str = "") -> np.ndarray:
    arr = np.asarray(sample[key])
    if arr.size == 0:
        return _empty(arr, sample, key, shape, why, np.int32)
    if arr.dtype.kind not in "iu":
        raise SampleError(sample[SAMPLE_ID], f"{key} must hold integers, got dtype {arr.dtype}")
    _check_shape(arr, sample, key, shape, why)
    if arr.min() < 0 or arr.max() > INT32_MAX:
        raise SampleError(sample[SAMPLE_ID], f"{key} holds values outside [0, {INT32_MAX}]")
    return arr.astype(np.int32, copy=False)


def _float16(sample: dict, key: str, shape: tuple, why: str, *, logprobs: bool = False) -> np.ndarray:
    arr = np.asarray(sample[key])
    if arr.size == 0:
        return _empty(arr, sample, key, shape, why, np.float16)
    if arr.dtype.kind != "f":
        raise SampleError(sample[SAMPLE_ID], f"{key} must hold floats, got dtype {arr.dtype}")
    _check_shape(arr, sample, key, shape, why)
    with np.errstate(over="ignore"):     # overflow to inf is reported below
        arr = np.ascontiguousarray(arr, dtype=np.float16)
    bits = arr.view(np.uint16)           # integer tests on the bit patterns: float16 ufuncs are slow
    magnitude = bits & 0x7FFF
    if (magnitude > 0x7C00).any():
        raise SampleError(sample[SAMPLE_ID], f"{key} holds NaN")
    if logprobs and ((bits < 0x8000) & (bits != 0)).any():
        raise SampleError(sample[SAMPLE_ID], f"{key} holds values > 0 (max {float(arr.max())}): "
                                             "expected log-probabilities (log_softmax), not logits")
    if not logprobs and (magnitude == 0x7C00).any():
        raise SampleError(sample[SAMPLE_ID], f"{key} holds values beyond float16 range (normalise it first)")
    return arr


def _int(sample: dict, key: str) -> int:
    value = np.asarray(sample[key])
    if value.ndim != 0 or value.dtype.kind not in "iu" or not 0 <= int(value) <= INT32_MAX:
        raise SampleError(sample[SAMPLE_ID], f"{key} must be an int in [0, {INT32_MAX}], got {sample[key]!r}")
    return int(value)


def _bytes(sample: dict, key: str, size: int | None) -> bytes | None:
    value = sample[key]
    if value is None:
        return None
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise SampleError(sample[SAMPLE_ID], f"{key} must be bytes or None, got {type(value).__name__}")
    value = bytes(value)
    if size is not None and len(value) != size:
        raise SampleError(sample[SAMPLE_ID], f"{key} must be {size} bytes, got {len(value)}")
    return value
