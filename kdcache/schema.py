"""The cache format, versions 1 and 2 (docs/design.md §4): the only place its columns and layout are defined.

A cache is a directory holding `manifest.json` (written last) and Arrow IPC shards named
`shard-r{rank:03d}-{index:05d}.arrow`; while a dump runs, per-shard sidecars, per-rank reports and
the dump's run record live in `_parts/`. Every on-disk name and column is defined here and nowhere
else; the writer (`kdcache.writer`), the reader (`kdcache.reader`), the row codec
(`kdcache.encoding`) and the dump job import them.
"""

from __future__ import annotations

import json
import math
import re

import pyarrow as pa

from kdcache import codecs
from kdcache.config import TARGET_KINDS
from kdcache.errors import CacheError

FORMAT = "kdcache"
FORMAT_VERSION = 3          # the newest this kdcache reads and writes; `kdcache dump --codec v1` writes version 1
V1 = 1                      # format 1: every column a plain Arrow type (no `codecs` in the manifest)
V2 = 2                      # format 2: per-column codecs (`codec`, `codecs`), top-k targets
SAMPLED_VERSION = 3         # format 3 = format 2 + `targets` with a sampled role (docs/decisions.md, "Format 3")

MANIFEST_NAME = "manifest.json"
MANIFEST_SEAL_NAME = "manifest.sha256"   # sha256sum's line for manifest.json, written just before it (its seal)
PARTS_DIR = "_parts"
RUN_FILE = "dump-config.json"        # in PARTS_DIR: the settings a resumed dump must match
SHARD_PATTERN = re.compile(r"^shard-r(\d{3,})-(\d{5,})\.arrow$")

# --- columns (one row per sample)
SAMPLE_ID = "sample_id"
INPUT_IDS = "input_ids"
RESPONSE_ROWS = "response_rows"
VISUAL_START = "visual_start"
VISUAL_LEN = "visual_len"
IMAGE = "image"
IMAGE_SHA256 = "image_sha256"
RESPONSE_TOPK_IDS = "response_topk_ids"
RESPONSE_TOPK_LOGPROBS = "response_topk_logprobs"
VISUAL_TOPK_IDS = "visual_topk_ids"
VISUAL_TOPK_LOGPROBS = "visual_topk_logprobs"
RELATION = "relation"
RELATION_NORM = "relation_norm"

COLUMNS = (SAMPLE_ID, INPUT_IDS, RESPONSE_ROWS, VISUAL_START, VISUAL_LEN, IMAGE, IMAGE_SHA256,
           RESPONSE_TOPK_IDS, RESPONSE_TOPK_LOGPROBS, VISUAL_TOPK_IDS, VISUAL_TOPK_LOGPROBS,
           RELATION, RELATION_NORM)
NULLABLE = frozenset({IMAGE, IMAGE_SHA256, RELATION, RELATION_NORM})
ROLES = ("response", "visual")
# role -> (ids column, logprobs column); each has one (K,) entry per row of that role
TOPK_COLUMNS = {"response": (RESPONSE_TOPK_IDS, RESPONSE_TOPK_LOGPROBS),
                "visual": (VISUAL_TOPK_IDS, VISUAL_TOPK_LOGPROBS)}
# `stats.encoded_bytes` in the manifest: role -> the columns whose encoded bytes it counts (every column once)
BYTE_ROLES = {"response_topk": TOPK_COLUMNS["response"], "visual_topk": TOPK_COLUMNS["visual"],
              "relation": (RELATION, RELATION_NORM), "image": (IMAGE,),
              "other": (SAMPLE_ID, INPUT_IDS, RESPONSE_ROWS, VISUAL_START, VISUAL_LEN, IMAGE_SHA256)}
RAGGED = (INPUT_IDS, RESPONSE_ROWS, RELATION)                      # list<primitive>
TOPK = tuple(c for pair in TOPK_COLUMNS.values() for c in pair)    # list<fixed_size_list<primitive, K>>

# format 2: the columns a codec may encode (each stored as one `binary` payload per sample) and their kind
ENCODED = {RESPONSE_TOPK_IDS: "ids", VISUAL_TOPK_IDS: "ids", RESPONSE_TOPK_LOGPROBS: "logprobs",
           VISUAL_TOPK_LOGPROBS: "logprobs", RELATION: "relation"}

SHARD_ENTRY_KEYS = ("path", "num_samples", "num_bytes", "sha256")
REQUIRED_MANIFEST_KEYS = ("format", "format_version", "topk", "num_samples", "shards")
# What training from a cache reads besides those (kdcache.compat, student_train/train.py, and the
# row checks' encoding.RowLimits): required by `manifest_faults(..., for_training=True)`. Every
# cache written by `kdcache dump` has them.
TRAINING_MANIFEST_KEYS = ("tokenizer", "vocab_size", "image_token_id", "visual_len", "max_length", "temperature",
                          "relation", "images_embedded", "image_processor")
# Not required: `tokenizer_size` (len(tokenizer), beside `vocab_size` = the teacher's LM-head rows, which
# may be padded past it: Qwen2.5-7B has 152,064 rows for 151,665 tokens). Caches dumped before it was
# recorded lack it; kdcache.compat and encoding.RowLimits use it where present.
# A shard's bytes bound its sample count before anything is allocated for it: a record batch holds at
# most 4 samples and its metadata alone takes ~1.7 KB (the smallest possible samples cost ~470 B each).
MIN_SHARD_BYTES_PER_SAMPLE = 64

def column_codecs(codec: str) -> dict[str, str] | None:
    """The manifest's `codecs` ({column: column codec}) of a `kdcache dump --codec` preset; None for "v1"."""
    if codec == "v1":
        return None
    if codec not in codecs.PRESETS:
        raise ValueError(f"unknown codec {codec!r} (expected one of {', '.join(codecs.CODEC_NAMES)})")
    return {column: codecs.PRESETS[codec][kind] for column, kind in ENCODED.items()}


def target_kinds(manifest: dict) -> dict[str, str]:
    """{role: "topk" | "sampled"} of a checked manifest: its `targets` (docs/design.md §4); absent: top-k for both
    (every cache dumped before sampled targets existed, and every top-k dump since)."""
    found = manifest.get("targets") or {}
    return {role: found.get(role, {}).get("kind", "topk") for role in ROLES}


def targets_entry(kinds: dict[str, str], widths: dict[str, int], seed: int) -> dict:
    """The manifest's `targets` of a dump: per role {"kind": "topk", "k": k} or {"kind": "sampled", "draws": N,
    "seed": seed}; `widths` are the rows' widths (k or N, the manifest's `topk`)."""
    return {role: {"kind": "topk", "k": widths[role]} if kinds[role] == "topk"
            else {"kind": "sampled", "draws": widths[role], "seed": seed} for role in ROLES}


def format_version(column_codecs: dict[str, str] | None, targets: dict | None) -> int:
    """The format_version a cache is written with: 1 without column codecs (`--codec v1`), 3 when a role holds
    sampled targets (a reader that ignores `targets` would train it with the top-k loss: it must refuse it),
    else 2."""
    if column_codecs is None:
        return V1
    sampled = any(isinstance(entry, dict) and entry.get("kind") == "sampled" for entry in (targets or {}).values())
    return SAMPLED_VERSION if sampled else V2


def manifest_codecs(manifest: dict) -> dict[str, str] | None:
    """The column codecs of a checked manifest (None: format 1, every column plain)."""
    return manifest.get("codecs") if manifest.get("format_version", V1) > V1 else None


def manifest_shard_schema(manifest: dict) -> pa.Schema:
    """The schema every shard of a checked manifest's cache must have."""
    return shard_schema(manifest["topk"]["response"], manifest["topk"]["visual"], manifest_codecs(manifest))


def shard_schema(k_response: int, k_visual: int, column_codecs: dict[str, str] | None = None) -> pa.Schema:
    """The Arrow schema of every shard of a cache with these top-k sizes (docs/design.md §4, exactly): format 1
    without `column_codecs`, else format 2, its encoded columns `binary` (one payload per sample)."""
    for name, k in (("k_response", k_response), ("k_visual", k_visual)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"{name} must be a positive int, got {k!r}")
    types = {
        SAMPLE_ID: pa.string(),
        INPUT_IDS: pa.list_(pa.int32()),
        RESPONSE_ROWS: pa.list_(pa.int32()),
        VISUAL_START: pa.int32(),
        VISUAL_LEN: pa.int32(),
        IMAGE: pa.binary(),
        IMAGE_SHA256: pa.binary(32),
        RESPONSE_TOPK_IDS: pa.list_(pa.list_(pa.int32(), k_response)),
        RESPONSE_TOPK_LOGPROBS: pa.list_(pa.list_(pa.float16(), k_response)),
        VISUAL_TOPK_IDS: pa.list_(pa.list_(pa.int32(), k_visual)),
        VISUAL_TOPK_LOGPROBS: pa.list_(pa.list_(pa.float16(), k_visual)),
        RELATION: pa.list_(pa.float16()),
        RELATION_NORM: pa.float32(),
    }
    metadata = {"kdcache.format": FORMAT, "kdcache.format_version": str(V1)}
    if column_codecs is not None:
        types.update({name: pa.binary() for name in ENCODED})
        metadata.update({"kdcache.format_version": "2", "kdcache.codecs": json.dumps(column_codecs, sort_keys=True)})
    fields = [pa.field(name, types[name], nullable=name in NULLABLE) for name in COLUMNS]
    return pa.schema(fields, metadata=metadata)


def relation_size(visual_len: int) -> int:
    """Number of stored relation values: the upper triangle of an (L, L) matrix, diagonal included,
    L (L + 1) / 2 (`kdcache.targets.pack_upper`'s layout)."""
    return visual_len * (visual_len + 1) // 2


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:03d}-{index:05d}.arrow"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, index) of a finished shard's file name, None for any other name."""
    match = SHARD_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def manifest_faults(manifest: object, source: str, *, for_training: bool = False) -> list[str]:
    """Everything wrong with a manifest, one line each (naming the key and its value); empty when usable.

    The version is checked before the other keys: a newer format may have renamed them, and the
    useful message then is "upgrade", not "missing key". Then: the required keys
    (`REQUIRED_MANIFEST_KEYS`, plus `TRAINING_MANIFEST_KEYS` with `for_training`), and the type and
    range of every key a reader, trainer or `kdcache inspect` uses, wherever it is present (a key
    that only describes the cache may be absent; if present, it must be well formed).
    """
    if not isinstance(manifest, dict):
        return [f"{source}: manifest is not a JSON object"]
    if manifest.get("format") != FORMAT:
        return [f"{source}: not a kdcache cache (format is {_show(manifest.get('format'))}, expected {FORMAT!r})"]
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return [f"{source}: cache format_version {_show(version)} is not a valid version "
                f"(this kdcache reads {FORMAT_VERSION})"]
    if version > FORMAT_VERSION:
        return [f"{source}: cache format_version {version} is newer than this kdcache understands "
                f"({FORMAT_VERSION}); upgrade kdcache"]
    required = REQUIRED_MANIFEST_KEYS + (TRAINING_MANIFEST_KEYS if for_training else ())
    faults = [f"{source}: manifest lacks required key {key!r}" + (" (needed to train from the cache)"
                                                                  if key in TRAINING_MANIFEST_KEYS else "")
              for key in required if key not in manifest]
    for key, (valid, expected) in _MANIFEST_FIELDS.items():
        if key in manifest and not valid(manifest[key]):
            faults.append(f"{source}: manifest {key!r} must be {expected}, got {_show(manifest[key])}")
    faults += (_vocabulary_faults(manifest, source) + _codec_faults(manifest, source, version)
               + _targets_faults(manifest, source) + _sampled_version_faults(manifest, source, version))
    shards = manifest.get("shards")
    seen: dict[str, int] = {}
    for i, entry in enumerate(shards if isinstance(shards, list) else []):
        faults += _shard_entry_faults(entry, f"{source}: manifest shards[{i}]")
        path = entry.get("path") if isinstance(entry, dict) else None
        if isinstance(path, str):
            if path in seen:
                faults.append(f"{source}: manifest shards[{i}] 'path' {_show(path)} is listed twice "
                              f"(also shards[{seen[path]}])")
            seen.setdefault(path, i)
    return faults


def _vocabulary_faults(manifest: dict, source: str) -> list[str]:
    """Token ids and k against `vocab_size` (the teacher's LM-head rows) and `tokenizer_size` (its
    tokenizer's length, at most the head rows: a head may be padded past the tokenizer, not short of it)."""
    vocab, tokens = manifest.get("vocab_size"), manifest.get("tokenizer_size")
    if not _size(vocab):
        return []
    faults = []
    if _size(tokens) and tokens > vocab:
        faults.append(f"{source}: manifest 'tokenizer_size' is {tokens}, more than vocab_size {vocab} "
                      "(the teacher's LM-head rows)")
    limit, name = (tokens, "tokenizer_size") if _size(tokens) else (vocab, "vocab_size")
    for key in ("image_token_id", "pad_token_id", "eos_token_id"):
        if _count(manifest.get(key)) and manifest[key] >= limit:
            faults.append(f"{source}: manifest {key!r} is {manifest[key]}, outside the vocabulary ({name} {limit})")
    topk = manifest.get("topk")
    found = manifest.get("targets") if isinstance(manifest.get("targets"), dict) else {}
    sampled = {role for role, entry in found.items()
               if isinstance(entry, dict) and entry.get("kind") == "sampled"}   # N draws may exceed V
    for role in ROLES if _MANIFEST_FIELDS["topk"][0](topk) else ():
        if role not in sampled and topk[role] > vocab:
            faults.append(f"{source}: manifest 'topk' {role} is {topk[role]}, more than vocab_size {vocab}")
    return faults


def _codec_faults(manifest: dict, source: str, version: int) -> list[str]:
    """Format 1 names no codecs; format 2 names a known one for every encoded column (`ENCODED`)."""
    if version == V1:
        return [f"{source}: manifest {key!r} is not part of format_version 1" for key in ("codec", "codecs")
                if key in manifest]
    found = manifest.get("codecs")
    if not isinstance(found, dict) or set(found) != set(ENCODED):
        return [f"{source}: manifest 'codecs' must map exactly {sorted(ENCODED)} to codec names "
                f"(format_version {version}), got {_show(found)}"]
    return [f"{source}: manifest 'codecs' {column!r} is {_show(name)}, expected one of "
            f"{list(codecs.KIND_CODECS[ENCODED[column]])}"
            for column, name in sorted(found.items()) if name not in codecs.KIND_CODECS[ENCODED[column]]]


def _targets_faults(manifest: dict, source: str) -> list[str]:
    """`targets` (absent: top-k for both roles) maps each role to {"kind": "topk", "k": k} or {"kind": "sampled",
    "draws": N[, "seed": s]}, k or N equal to the role's row width `topk`."""
    if "targets" not in manifest:
        return []
    found, topk = manifest["targets"], manifest.get("topk")
    if not isinstance(found, dict) or set(found) != set(ROLES):
        return [f"{source}: manifest 'targets' must map exactly {list(ROLES)} to target entries, got {_show(found)}"]
    widths = topk if _MANIFEST_FIELDS["topk"][0](topk) else {}
    faults = []
    for role in ROLES:
        entry, where = found[role], f"{source}: manifest 'targets' {role!r}"
        if not isinstance(entry, dict) or entry.get("kind") not in TARGET_KINDS:
            faults.append(f"{where} must be an object whose 'kind' is one of {list(TARGET_KINDS)}, got {_show(entry)}")
            continue
        size = "k" if entry["kind"] == "topk" else "draws"
        if not _size(entry.get(size)):
            faults.append(f"{where} {size!r} must be a positive int, got {_show(entry.get(size))}")
        elif role in widths and entry[size] != widths[role]:
            faults.append(f"{where} {size!r} is {entry[size]}, but its rows hold {widths[role]} entries "
                          f"(manifest 'topk' {role})")
        if entry["kind"] == "sampled" and "seed" in entry and not _count(entry["seed"], 2 ** 63 - 1):
            faults.append(f"{where} 'seed' must be a non-negative int, got {_show(entry['seed'])}")
    return faults


def _sampled_version_faults(manifest: dict, source: str, version: int) -> list[str]:
    """Sampled targets exactly in format 3: a sampled role under 1 or 2 is a cache an older reader would train
    with the top-k loss; format 3 without one is not what any kdcache writes."""
    found = manifest.get("targets", {role: {"kind": "topk"} for role in ROLES})      # absent: top-k
    if not (isinstance(found, dict) and set(found) == set(ROLES)
            and all(isinstance(entry, dict) and entry.get("kind") in TARGET_KINDS for entry in found.values())):
        return []                                                 # malformed: `_targets_faults` names it
    sampled = [role for role in ROLES if found[role]["kind"] == "sampled"]
    if sampled and version != SAMPLED_VERSION:
        return [f"{source}: manifest 'targets' has sampled {' and '.join(sampled)} rows, which need "
                f"format_version {SAMPLED_VERSION}, not {version} (a reader of format {version} would train them "
                "with the top-k loss)"]
    if not sampled and version == SAMPLED_VERSION:
        return [f"{source}: format_version {SAMPLED_VERSION} is format 2 with sampled targets, but manifest "
                f"'targets' names no sampled role (got {_show(manifest.get('targets'))})"]
    return []


def check_manifest(manifest: object, source: str, *, for_training: bool = False) -> None:
    """Raise CacheError naming every fault of `manifest_faults`."""
    faults = manifest_faults(manifest, source, for_training=for_training)
    if faults:
        raise CacheError("; ".join(faults))


class Manifest(dict):
    """A checked manifest (what `CacheReader.manifest` holds): reading a key it lacks with `m[key]`
    raises a one-line CacheError naming the cache and the key, not a KeyError (`m.get` is unchanged)."""

    def __init__(self, manifest: dict, source: str):
        super().__init__(manifest)
        self.source = source

    def __missing__(self, key):
        raise CacheError(f"{self.source}: manifest lacks key {key!r}")


def _shard_entry_faults(entry: object, where: str) -> list[str]:
    if not isinstance(entry, dict):
        return [f"{where} is not an object"]
    faults = [f"{where} lacks key {key!r}" for key in SHARD_ENTRY_KEYS if key not in entry]
    if "path" in entry and not isinstance(entry["path"], str):
        faults.append(f"{where} 'path' must be a string, got {_show(entry['path'])}")
    for key in ("num_samples", "num_bytes"):
        if key in entry and not _count(entry[key]):
            faults.append(f"{where} {key!r} must be a non-negative int, got {_show(entry[key])}")
    count, size = entry.get("num_samples"), entry.get("num_bytes")
    if _count(count) and _count(size) and count * MIN_SHARD_BYTES_PER_SAMPLE > size:
        faults.append(f"{where} claims {count} samples in {size} bytes; a sample takes at least "
                      f"{MIN_SHARD_BYTES_PER_SAMPLE} bytes of a shard")
    sha = entry.get("sha256")
    if "sha256" in entry and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        faults.append(f"{where} 'sha256' must be 64 lowercase hex digits, got {_show(sha)}")
    return faults


def _show(value: object) -> str:
    """A manifest value in a one-line message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


MAX_COUNT = 2 ** 53            # sample counts and byte sizes beyond this are not plausible
INT32_MAX = 2 ** 31 - 1        # token ids, k, lengths: stored as int32


def _count(value: object, limit: int = MAX_COUNT) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _positive_int(value: object, limit: int = MAX_COUNT) -> bool:
    return _count(value, limit) and value > 0


def _token_id(value: object) -> bool:
    return _count(value, INT32_MAX)


def _size(value: object) -> bool:
    """A positive int that fits the int32 columns (k, vocabulary, lengths)."""
    return _positive_int(value, INT32_MAX)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _optional(test):
    return lambda value: value is None or test(value)


def _text(value: object) -> bool:
    return isinstance(value, str)


def _object(**keys):
    """A JSON object whose listed keys, where present, pass their tests (other keys are free)."""
    return lambda value: isinstance(value, dict) and all(test(value[k]) for k, test in keys.items() if k in value)


def _per_role(test):
    return lambda value: isinstance(value, dict) and all(role in value and test(value[role]) for role in ROLES)


def _list_of(test):
    return lambda value: isinstance(value, list) and all(test(item) for item in value)


def _complete(**keys):
    """A JSON object with every listed key, each passing its test (other keys are free)."""
    return lambda value: isinstance(value, dict) and all(k in value and test(value[k]) for k, test in keys.items())


_STATS_NUMBER = _optional(lambda v: _number(v) and v >= 0)
_KL = _optional(_number)                 # nats; a float32 KL of ~0 may round a hair below 0
_COSINE = _optional(lambda v: _number(v) and -1 - 1e-6 <= v <= 1 + 1e-6)
_FIDELITY_ROLE = _complete(kl_mean_nats=_KL, kl_max_nats=_KL, rows=_count)
# `kdcache dump --fidelity-sample N` (kdcache.fidelity): absent when not measured
_FIDELITY = _complete(num_samples=_count, codec=lambda v: v in codecs.CODEC_NAMES, response=_FIDELITY_ROLE,
                      visual=_FIDELITY_ROLE, relation=_complete(cosine_min=_COSINE, cosine_mean=_COSINE,
                                                                samples=_count))

# key -> (test, what it must be): every manifest key a reader, trainer or `kdcache inspect` uses
_MANIFEST_FIELDS = {
    "topk": (_per_role(_size), "an object mapping 'response' and 'visual' to positive ints"),
    "temperature": (_per_role(lambda v: _number(v) and v > 0),
                    "an object mapping 'response' and 'visual' to finite numbers > 0"),
    "num_samples": (_count, "a non-negative int"),
    "shards": (lambda v: isinstance(v, list), "a list"),
    "vocab_size": (_size, "a positive int"),
    "tokenizer_size": (_size, "a positive int"),
    "image_token_id": (_token_id, "a non-negative int"),
    "pad_token_id": (_token_id, "a non-negative int"),
    "eos_token_id": (_token_id, "a non-negative int"),
    "visual_len": (_size, "a positive int"),
    "max_length": (_size, "a positive int"),
    "world_size": (_size, "a positive int"),
    "relation": (lambda v: isinstance(v, bool), "true or false"),
    "images_embedded": (lambda v: isinstance(v, bool), "true or false"),
    "tokenizer": (lambda v: isinstance(v, dict) and _text(v.get("fingerprint")) and _object(**{"class": _text})(v),
                  "an object with a string 'fingerprint'"),
    "teacher": (_object(source=_optional(_text), revision=_optional(_text), config_hash=_optional(_text),
                        dtype=_optional(_text)), "an object of strings"),
    "dataset": (_object(source=_optional(_text), images=_optional(_text), fingerprint=_optional(_text),
                        max_samples=_optional(_count)), "an object (source, images, fingerprint: strings)"),
    "image_processor": (lambda v: isinstance(v, dict), "an object"),
    "template": (_text, "a string"),
    # format 2: the dump's --codec (`codecs`, the column codecs, is checked by `_codec_faults`)
    "codec": (lambda v: isinstance(v, str) and v in codecs.PRESETS, f"one of {sorted(codecs.PRESETS)}"),
    "template_version": (_positive_int, "a positive int"),      # absent: 1 (caches dumped before it)
    "kdcache_version": (_text, "a string"),
    "created": (_text, "a string"),
    "skipped": (_list_of(_object(sample_id=_text, reason=_text)), "a list of {sample_id, reason} strings"),
    "stats": (_object(num_bytes=_STATS_NUMBER, bytes_per_sample=_STATS_NUMBER, bytes_per_token=_STATS_NUMBER,
                      tokens=_STATS_NUMBER, samples_with_image=_STATS_NUMBER, samples_with_relation=_STATS_NUMBER,
                      image_bytes=_STATS_NUMBER,
                      rows=_object(response=_STATS_NUMBER, visual=_STATS_NUMBER),
                      mean_tail_mass=_object(response=_STATS_NUMBER, visual=_STATS_NUMBER),
                      encoded_bytes=_complete(**{role: _count for role in BYTE_ROLES})),
              "an object of non-negative numbers (encoded_bytes: a non-negative int per role of "
              f"{list(BYTE_ROLES)})"),
    "fidelity": (_FIDELITY, "an object {num_samples, codec, response and visual: {kl_mean_nats, kl_max_nats: "
                            "finite numbers or null, rows}, relation: {cosine_min, cosine_mean: in [-1, 1] or null, "
                            "samples}}"),
}
