"""Arrow record batches of the shard schema -> checked flat numpy arrays: the read side of the cache.

`DecodedBatch` turns a record batch read from an untrusted shard into flat numpy arrays once (format
2's encoded columns decoded by their manifest-named codecs, `kdcache.codecs`) and checks every row
against the format and the manifest's `RowLimits` (this module is the only place rows read back are
checked); `DecodedBatch.sample(row)` slices one sample out of them. No
per-element Python. The write side (`coerce_sample`, `record_batch`) is `kdcache.records`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa

from kdcache import codecs
from kdcache.errors import CacheError, one_line
from kdcache.schema import (COLUMNS, ENCODED, IMAGE, IMAGE_SHA256, INPUT_IDS, NULLABLE, RAGGED, RELATION,
                            RELATION_NORM, RESPONSE_ROWS, ROLES, SAMPLE_ID, TOPK, TOPK_COLUMNS, VISUAL_LEN,
                            VISUAL_START, relation_size)


ARROW_MESSAGE_CHARS = 300     # Arrow's messages about a corrupt buffer can run long: cut them in errors

# What decoding an untrusted shard may raise besides CacheError: pyarrow's own errors, and what a
# corrupt buffer makes Python's converters raise (bad UTF-8, bad sizes, out-of-range offsets).
READ_ERRORS = (pa.ArrowException, OSError, ValueError, UnicodeError, SystemError, OverflowError, IndexError)

_F16_SIGN = 0x8000
_F16_EXPONENT = 0x7C00     # |x| bits == 0x7C00: inf; > 0x7C00: NaN
_F16_NEG_INF = 0xFC00
_F16_NEG_INF_AS_INT16 = -1024   # int16 view: <= this is exactly -0 ... -inf (0x8000 ... 0xFC00)


@dataclass(frozen=True)
class RowLimits:
    """What a cache's manifest promises about every one of its rows (None: the manifest does not say).

    Built from a manifest that `schema.manifest_faults` accepted (`RowLimits.from_manifest`). A
    manifest checked `for_training` has all of them (`schema.TRAINING_MANIFEST_KEYS`), and every cache
    `kdcache dump` writes does, so for training every check below is on:

    * `vocab_size` (the teacher's LM-head rows): top-k ids (and input_ids, without `tokenizer_size`)
      in [0, vocab_size), and the top-k ids of a row unique (a teacher's top-k lists distinct tokens);
    * `tokenizer_size` (len(tokenizer); absent from caches dumped before it was recorded): input_ids
      in [0, tokenizer_size). Input ids come from the tokenizer, so this bounds them for a student
      whose embeddings are not padded like the teacher's head; top-k ids range over that head;
    * `image_token_id`, with `visual_len`: input_ids[visual_start : visual_start + visual_len] are all
      image tokens, and there are no others;
    * `visual_len`: a row's visual_len is 0 (no image) or this;
    * `max_length`: at most this many tokens per sequence;
    * `images_embedded`: image bytes present exactly on rows with an image (True), never (False);
    * `relation`: a relation exactly on rows with an image (True), never (False);
    * `codecs` (format 2: {column: codec}; None: format 1) and `topk` ({role: k}): how encoded columns
      decode. Every check above runs on the decoded values, whatever the codec;
    * `targets` ({role: {"kind", ...}}; None or a role without one: top-k): a sampled role's rows hold N
      draws, so its ids may repeat within a row, and its log-probs must be finite (a drawn token has p > 0).
    """

    vocab_size: int | None = None
    tokenizer_size: int | None = None
    image_token_id: int | None = None
    visual_len: int | None = None
    max_length: int | None = None
    images_embedded: bool | None = None
    relation: bool | None = None
    codecs: dict | None = None
    topk: dict | None = None
    targets: dict | None = None

    def sampled(self, role: str) -> bool:
        """Whether the role's rows are sampled draws (the manifest's `targets`), not a top-k."""
        entry = (self.targets or {}).get(role)
        return isinstance(entry, dict) and entry.get("kind") == "sampled"

    @classmethod
    def from_manifest(cls, manifest: dict) -> RowLimits:
        """The limits a checked manifest states (its keys have these fields' names)."""
        return cls(**{f.name: manifest.get(f.name) for f in fields(cls)})

    def input_ids_limit(self) -> tuple[int | None, str]:
        """(bound, manifest key) of input_ids: the tokenizer's length where recorded, else the head rows."""
        if self.tokenizer_size is not None:
            return self.tokenizer_size, "tokenizer_size"
        return self.vocab_size, "vocab_size"


class DecodedBatch:
    """A record batch as flat numpy arrays, decoded and checked once; `sample(row)` slices one sample out.

    `where` names the shard in errors (and `batch_index` the record batch, where no sample can be
    named). The batch comes from an untrusted file, and this is the one place its rows are checked,
    all of them, vectorised over the batch, before any is handed out; what `sample(row)` returns can
    be used as is. Refused with a one-line CacheError naming the shard, the sample and the column:

    * a batch Arrow's full validation rejects (offsets, UTF-8, buffer sizes); nulls in non-nullable
      columns or inside lists; an empty sample_id;
    * a sequence that is empty or longer than `limits.max_length`; input_ids < 0 or >= tokenizer_size
      (vocab_size when the manifest has no tokenizer_size);
    * a visual span that is negative, runs past the sequence, has a visual_start without visual
      rows, a visual_len other than 0 / `limits.visual_len`, or (with `limits.image_token_id`) is not
      exactly where the image tokens are;
    * response_rows not strictly increasing within [0, T - 1) (row t predicts token t + 1);
    * top-k lists whose row counts are not len(response_rows) / visual_len; ids < 0 or >= vocab_size,
      or repeated within a row (when vocab_size is known); log-probs that are NaN or > 0 (-inf is
      allowed: a token with no probability left in float16); for a sampled role (`RowLimits.targets`)
      repeated ids are allowed (draws with replacement) and -inf is not (a drawn token has p > 0);
    * a relation that is non-finite, not L(L+1)/2 long, on a row without visual rows, without a
      finite relation_norm >= 0 (or a norm without relation), missing on an image row of a cache
      dumped with relations, present in a cache dumped without;
    * image_sha256 present on a row without visual rows or missing on one with; image bytes whose
      sha256 is not image_sha256; image bytes against the manifest's images_embedded.
    """

    def __init__(self, batch: pa.RecordBatch, where: str, limits: RowLimits | None = None, *,
                 batch_index: int | None = None):
        self.where = where
        self.limits = limits if limits is not None else RowLimits()
        label = where if batch_index is None else f"{where}: record batch {batch_index}"
        try:
            self.num_rows = batch.num_rows
            batch.validate(full=True)       # offsets within their buffers, valid UTF-8 ids
            for name in COLUMNS:
                if name not in NULLABLE and batch.column(name).null_count:
                    raise CacheError(f"{label}: column {name!r} holds nulls")
            self.sample_id = batch.column(SAMPLE_ID).to_pylist()
            self.visual_start = batch.column(VISUAL_START).to_numpy().astype(np.int64)
            self.visual_len = batch.column(VISUAL_LEN).to_numpy().astype(np.int64)
            self.image = batch.column(IMAGE).to_pylist()
            self.image_sha256 = batch.column(IMAGE_SHA256).to_pylist()
            self.relation_norm = batch.column(RELATION_NORM).to_pylist()
            self.relation_valid = _valid(batch.column(RELATION))
            # name -> (offsets (num_rows + 1,) from 0, values (n,) or (n, K))
            self.ragged = {name: self._column(batch.column(name), name, label) for name in RAGGED + TOPK}
        except CacheError:
            raise
        except READ_ERRORS as e:
            raise CacheError(f"{label}: invalid record batch ({one_line(e, limit=ARROW_MESSAGE_CHARS)})") from e
        if self.num_rows:
            self._check(label)

    def _column(self, column: pa.Array, name: str, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, values) of one ragged or top-k column: a list column as it is, a `binary` (format 2) one
        decoded sample by sample by its codec; a payload that does not decode names its sample."""
        if not pa.types.is_binary(column.type):
            return self._flat(column, label)
        codec = (self.limits.codecs or {}).get(name)
        if codec is None or name not in ENCODED:
            raise CacheError(f"{label}: column {name!r} is encoded but the manifest names no codec for it")
        role = next((role for role, pair in TOPK_COLUMNS.items() if name in pair), None)
        k = None if role is None else (self.limits.topk or {}).get(role)
        if role is not None and k is None:
            raise CacheError(f"{label}: column {name!r} is encoded but the manifest's topk is unknown here")
        _, offsets_buffer, data_buffer = column.buffers()
        offsets = np.frombuffer(offsets_buffer, np.int32)[column.offset: column.offset + len(column) + 1]
        data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        valid = _valid(column)
        empty = np.zeros((0,) if k is None else (0, k), np.int32 if ENCODED[name] == "ids" else np.float16)
        parts = [empty]
        for r in range(len(column)):
            if not valid[r]:
                parts.append(empty)
                continue
            try:
                parts.append(codecs.decode(codec, data[offsets[r]: offsets[r + 1]], k))
            except codecs.CodecError as e:
                self._fail(r, name, f"payload ({codec}) {e}")
        starts = np.zeros(len(column) + 1, np.int64)
        np.cumsum([len(part) for part in parts[1:]], out=starts[1:])
        return starts, np.concatenate(parts)

    @staticmethod
    def _flat(column: pa.ListArray, label: str) -> tuple[np.ndarray, np.ndarray]:
        values = column.values
        k = values.type.list_size if pa.types.is_fixed_size_list(values.type) else None
        if values.null_count:
            raise CacheError(f"{label}: column {column.type} holds null entries")
        if k is not None:
            values = values.flatten()
            if values.null_count:
                raise CacheError(f"{label}: column {column.type} holds null values")
        offsets = column.offsets.to_numpy()
        flat = values.to_numpy(zero_copy_only=True)
        flat = flat if k is None else flat.reshape(-1, k)
        if offsets[0] == 0 and offsets[-1] == len(flat):
            return offsets, flat
        # only what the rows cover: offsets need not start at 0 nor end at the values' end
        return offsets - offsets[0], flat[offsets[0]: offsets[-1]]

    def sample(self, row: int) -> dict:
        """Writable numpy copies of one sample, keys as the columns (see CacheReader.read_sample)."""
        out = {SAMPLE_ID: self.sample_id[row], VISUAL_START: int(self.visual_start[row]),
               VISUAL_LEN: int(self.visual_len[row]), IMAGE: self.image[row], IMAGE_SHA256: self.image_sha256[row],
               RELATION_NORM: self.relation_norm[row]}
        for name, (offsets, values) in self.ragged.items():
            out[name] = values[offsets[row]: offsets[row + 1]].copy()
        if not self.relation_valid[row]:
            out[RELATION] = None
        return out

    # --- the checks: every row of the batch at once, vectorised; the first failing row is named

    def _fail(self, row: int, column: str, why: str) -> None:
        raise CacheError(f"{self.where}: sample {self.sample_id[row]!r}: {column} {why}")

    def _first(self, rules: list) -> None:
        """`rules`: (mask over rows, column, why(row) -> str), in the order faults are reported."""
        if np.logical_or.reduce([mask for mask, _, _ in rules]).any():
            for mask, column, why in rules:
                if mask.any():
                    row = int(np.argmax(mask))
                    self._fail(row, column, why(row))

    def _fail_values(self, bad: np.ndarray, name: str, why) -> None:
        """Raise for the row holding the first True of `bad`, a mask over column `name`'s values (or rows)."""
        if bad.any():
            entry = int(np.argmax(bad.reshape(len(bad), -1).any(axis=1)))
            row = int(np.searchsorted(self.ragged[name][0], entry, side="right")) - 1
            self._fail(row, name, why(row))

    def _check(self, label: str) -> None:
        if not all(self.sample_id):
            raise CacheError(f"{label}: row {self.sample_id.index('')}: {SAMPLE_ID} is empty")
        lengths = {name: offsets[1:] - offsets[:-1] for name, (offsets, _) in self.ragged.items()}
        has_relation = self.relation_valid
        # 1. shapes: sequence length, visual span, rows per column, which optional values are there
        self._first(self._shape_rules(lengths, has_relation))
        # 2. values (their positions are known to be consistent now)
        self._range(INPUT_IDS, self.ragged[INPUT_IDS][1], *self.limits.input_ids_limit())
        self._image_tokens()
        self._response_rows(lengths[INPUT_IDS], lengths[RESPONSE_ROWS])
        for role in ROLES:
            ids_column, logprobs_column = TOPK_COLUMNS[role]
            sampled = self.limits.sampled(role)
            self._topk_ids(ids_column, distinct=not sampled)
            self._logprobs(logprobs_column, finite=sampled)
        self._relation_values(has_relation)
        for r, (data, digest) in enumerate(zip(self.image, self.image_sha256)):
            if data is not None and hashlib.sha256(data).digest() != digest:
                self._fail(r, IMAGE, f"bytes do not hash to the sample's {IMAGE_SHA256}")

    def _shape_rules(self, lengths: dict[str, np.ndarray], has_relation: np.ndarray) -> list:
        """The (mask, column, why) rules of `_first` for shapes and presence, in the order they are reported."""
        lim = self.limits
        T, R = lengths[INPUT_IDS], lengths[RESPONSE_ROWS]
        start, L = self.visual_start, self.visual_len
        has_norm = np.array([norm is not None for norm in self.relation_norm])
        has_sha = np.array([digest is not None for digest in self.image_sha256])
        has_image = np.array([data is not None for data in self.image])
        relation_len = np.where(has_relation, relation_size(L), 0)
        image_row = L > 0
        rules = [(T < 1, INPUT_IDS, lambda r: "is empty"),
                 (start < 0, VISUAL_START, lambda r: f"is negative ({start[r]})"),
                 (L < 0, VISUAL_LEN, lambda r: f"is negative ({L[r]})"),
                 (start + L > T, VISUAL_LEN, lambda r: f"{L[r]} from {VISUAL_START} {start[r]} runs past the "
                                                       f"sequence (T = {T[r]})"),
                 (~image_row & (start != 0), VISUAL_START,
                  lambda r: f"is {start[r]} on a sample without visual rows (expected 0)")]
        if lim.max_length is not None:
            rules.insert(1, (T > lim.max_length, INPUT_IDS,
                             lambda r: f"has {T[r]} tokens, more than the manifest's max_length {lim.max_length}"))
        if lim.visual_len is not None:
            rules.append((image_row & (L != lim.visual_len), VISUAL_LEN,
                          lambda r: f"is {L[r]}, expected 0 or the manifest's visual_len {lim.visual_len}"))
        for role, count, source in (("response", R, f"len({RESPONSE_ROWS})"), ("visual", L, VISUAL_LEN)):
            for column in TOPK_COLUMNS[role]:
                n = lengths[column]
                rules.append((n != count, column, lambda r, n=n, count=count, source=source:
                              f"has {n[r]} rows, expected {count[r]} ({source})"))
        rules += [
            (has_relation != has_norm, RELATION_NORM,
             lambda r: "is missing for a relation" if has_relation[r] else "is given without a relation"),
            (has_relation & ~image_row, RELATION, lambda r: "is given on a sample without visual rows"),
            (lengths[RELATION] != relation_len, RELATION,
             lambda r: f"has {lengths[RELATION][r]} values, expected {relation_len[r]}"
                       + (" (visual_len * (visual_len + 1) / 2)" if has_relation[r] else "")),
            (has_sha != image_row, IMAGE_SHA256, lambda r: ("is missing on a sample with visual rows" if image_row[r]
                                                            else "is given on a sample without visual rows")),
            (has_image & ~image_row, IMAGE, lambda r: "is given on a sample without visual rows"),
        ]
        return rules + self._manifest_rules(has_relation, has_image, image_row)

    def _manifest_rules(self, has_relation: np.ndarray, has_image: np.ndarray, image_row: np.ndarray) -> list:
        """Rules from the manifest's `relation` and `images_embedded` (none when the manifest has neither)."""
        rules = []
        if self.limits.relation is True:
            rules.append((~has_relation & image_row, RELATION,
                          lambda r: "is missing on a sample with visual rows (the manifest says relations were dumped)"))
        elif self.limits.relation is False:
            rules.append((has_relation, RELATION, lambda r: "is given but the manifest says relations were not dumped"))
        if self.limits.images_embedded is True:
            rules.append((~has_image & image_row, IMAGE, lambda r: "is missing but the manifest says images are embedded"))
        elif self.limits.images_embedded is False:
            rules.append((has_image, IMAGE, lambda r: "is given but the manifest says images are not embedded"))
        return rules

    def _image_tokens(self) -> None:
        """The image token (when the manifest names it) fills the visual span exactly and appears nowhere else."""
        token = self.limits.image_token_id
        if token is None:
            return
        offsets, input_ids = self.ragged[INPUT_IDS]
        start, L = self.visual_start, self.visual_len
        seen = np.zeros(len(input_ids) + 1, np.int64)                   # image tokens before each position
        np.cumsum(input_ids == token, out=seen[1:])
        total = seen[offsets[1:]] - seen[offsets[:-1]]
        in_span = seen[offsets[:-1] + start + L] - seen[offsets[:-1] + start]
        bad = (in_span != L) | (total != L)
        if bad.any():
            r = int(np.argmax(bad))
            self._fail(r, INPUT_IDS, f"holds {total[r]} image tokens (id {token}), {in_span[r]} of them in the "
                                     f"visual span [{start[r]}, {start[r] + L[r]}); expected exactly that span")

    def _response_rows(self, T: np.ndarray, R: np.ndarray) -> None:
        """Strictly increasing within [0, T - 1): row t predicts token t + 1."""
        offsets, rows = self.ragged[RESPONSE_ROWS]
        if not rows.size:
            return
        self._fail_values((rows < 0) | (rows >= np.repeat(T - 1, R)), RESPONSE_ROWS,
                          lambda r: f"outside [0, {T[r] - 1}) for a sequence of {T[r]} tokens")
        step = rows[1:] - rows[:-1]                                     # (n - 1,): no overflow, rows in [0, T)
        across = offsets[1:-1] - 1                                      # steps from one sample into the next
        step[across[(across >= 0) & (across < len(step))]] = 1
        if (step <= 0).any():
            self._fail_values(np.append(False, step <= 0), RESPONSE_ROWS, lambda r: "are not strictly increasing")

    def _range(self, name: str, values: np.ndarray, limit: int | None, key: str) -> None:
        """Token ids in [0, limit) (>= 0 without a known limit), `key` the manifest's name for the limit;
        min / max first, masks only on failure."""
        if not values.size or (values.min() >= 0 and (limit is None or values.max() < limit)):
            return
        bad = (values < 0) if limit is None else (values < 0) | (values >= limit)
        allowed = "[0, int32 max]" if limit is None else f"[0, {limit}) (the manifest's {key})"
        self._fail_values(bad, name, lambda r: f"holds ids outside {allowed}")

    def _topk_ids(self, name: str, *, distinct: bool = True) -> None:
        ids = self.ragged[name][1]                                     # (n, K)
        self._range(name, ids, self.limits.vocab_size, "vocab_size")
        n, k = ids.shape
        if not distinct or self.limits.vocab_size is None or k < 2 or not n:
            return
        ordered = np.sort(ids, axis=1).reshape(-1)
        repeated = ordered[1:] == ordered[:-1]                         # neighbours in one contiguous pass
        repeated[k - 1::k] = False                                     # ... but not across two rows
        if repeated.any():
            self._fail_values(np.append(repeated, False).reshape(n, k), name,
                              lambda r: "repeats a token id within a row (a top-k lists distinct tokens)")

    def _logprobs(self, name: str, *, finite: bool = False) -> None:
        """Log-probs <= 0 and not NaN; -inf is allowed unless `finite` (sampled draws). Tested on float16 bit
        patterns (float16 ufuncs are slow)."""
        values = self.ragged[name][1]
        bits = values.view(np.uint16)
        if finite and values.size:
            self._fail_values(bits == _F16_NEG_INF, name,
                              lambda r: "holds -inf, but a sampled row's tokens were drawn (probability > 0)")
        if not values.size or values.view(np.int16).max() <= _F16_NEG_INF_AS_INT16:
            return       # the common case, one pass: all negative (or -0 / -inf), no NaN
        # allowed: +0 and 0x8000 ... 0xFC00 (-0 ... -inf); NaN (either sign) and > 0 are not
        self._fail_values((bits != 0) & ((bits < _F16_SIGN) | (bits > _F16_NEG_INF)), name,
                          lambda r: "holds NaN or values > 0 (expected log-probabilities)")

    def _relation_values(self, has_relation: np.ndarray) -> None:
        bits = self.ragged[RELATION][1].view(np.uint16)
        # two passes, no temporaries: +inf / +NaN are 0x7C00 ... 0x7FFF (int16 view >= 0x7C00),
        # -inf / -NaN are 0xFC00 ... 0xFFFF
        if bits.size and (bits.view(np.int16).max() >= _F16_EXPONENT or bits.max() >= _F16_NEG_INF):
            self._fail_values((bits & np.uint16(0x7FFF)) >= _F16_EXPONENT, RELATION,
                              lambda r: "holds NaN or infinite values")
        for r in np.flatnonzero(has_relation):
            norm = self.relation_norm[r]
            if not (math.isfinite(norm) and norm >= 0):
                self._fail(int(r), RELATION_NORM, f"is {norm}, expected a finite norm >= 0")


def _valid(column: pa.Array) -> np.ndarray:
    """(n,) bool: which entries are not null (without a compute call when none is)."""
    if not column.null_count:
        return np.ones(len(column), bool)
    return column.is_valid().to_numpy(zero_copy_only=False)
