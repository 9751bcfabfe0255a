"""`kdcache verify` and `kdcache inspect`: a cache examined whole (docs/design.md §4).

`verify_cache` lists every fault it can find, one line each (the manifest and its seal, every shard's
bytes, schema and rows, through the same checks the reader applies); `describe_cache` is the
`kdcache inspect` summary. Both read through `kdcache.reader` (its `CacheLocation`, shard opening and
row decoding), so a cache is checked exactly as training would read it.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from kdcache import schema
from kdcache.encoding import ARROW_MESSAGE_CHARS as _CHARS, READ_ERRORS, RowLimits
from kdcache.errors import CacheError, KdcacheError, one_line
from kdcache.reader import CacheLocation, decode_batch, open_shard, read_manifest, release_pin
from kdcache.remote import RemoteConfig, RemoteError, RemoteMissing
from kdcache.shardcache import ShardCache


def verify_cache(cache, *, quick: bool = False, remote: RemoteConfig | None = None) -> list[str]:
    """Every fault found in a cache, one line each, naming its file (and sample and column where one is
    at fault); an empty list means the cache is sound.

    Checks the manifest as a whole (`schema.manifest_faults`) and against its seal (`manifest.sha256`,
    written with it: an edited shard list, count or hash shows) and the `--expect-manifest` pin, then
    per shard: path safety, that no two entries name one file, presence, byte size, sha256, schema,
    sample ids (valid, unique in the cache), row count; then that the counts add up. Unless `quick`,
    it also decodes every record batch and runs the row checks a reader runs (`encoding.DecodedBatch`
    against the manifest's `RowLimits`): one fault per bad record batch. A cache URL's shards are
    downloaded once each, into the shard cache (`remote.cache_dir`), and checked there; a network
    failure is not a fault of the cache: it is raised (`RemoteError`, one line).
    """
    remote = (remote or RemoteConfig()).remote_config()
    try:
        location = CacheLocation(cache, remote)
        manifest, identity = read_manifest(location)
    except RemoteError:
        raise                                 # the network, not the cache: the caller's one-line error
    except KdcacheError as e:
        return [one_line(e, limit=_CHARS)]
    except (OSError, ValueError) as e:        # e.g. an fsspec URL with an unknown protocol
        return [f"{cache}: cannot open cache ({one_line(e, limit=_CHARS)})"]
    malformed = schema.manifest_faults(manifest, location.name)
    if malformed:                             # what is wrong with it matters more than whether it was edited
        return [one_line(fault, limit=_CHARS) for fault in malformed]
    faults = seal_faults(location, identity, remote.expected_identity())
    expected = schema.manifest_shard_schema(manifest)
    limits = None if quick else RowLimits.from_manifest(manifest)
    shards = None if location.remote is None else ShardCache(location.remote, identity, remote)
    owner: dict[str, str] = {}
    files: dict[str, str] = {}
    for entry in manifest["shards"]:           # a RemoteError (the server is gone) ends the check
        faults += _shard_faults(location, shards, entry, expected, owner, files, limits)
    total = sum(entry["num_samples"] for entry in manifest["shards"])
    if total != manifest["num_samples"]:
        faults.append(f"{location.where(schema.MANIFEST_NAME)}: num_samples is {manifest['num_samples']} "
                      f"but its shards hold {total}")
    return [one_line(fault, limit=_CHARS) for fault in faults]


def seal_faults(location: CacheLocation, identity: str, expected: str | None = None) -> list[str]:
    """The manifest against its seal `manifest.sha256` (sha256sum's format, written with it) and the pin."""
    where = location.where(schema.MANIFEST_SEAL_NAME)
    faults = []
    if expected is not None and identity != expected:
        faults.append(f"{location.where(schema.MANIFEST_NAME)}: sha256 {identity.removeprefix('sha256:')}, not the "
                      f"{expected.removeprefix('sha256:')} that --expect-manifest pins")
    try:
        words = location.read(schema.MANIFEST_SEAL_NAME, limit=4096).decode("ascii").split()
    except (FileNotFoundError, RemoteMissing):
        return faults + [f"{where}: missing, so an edit of the manifest (shard list, counts, hashes) cannot be "
                         f"detected; a cache written before kdcache sealed manifests: once you trust it, run "
                         f"`sha256sum {schema.MANIFEST_NAME} > {schema.MANIFEST_SEAL_NAME}` in it"]
    except (OSError, UnicodeDecodeError, CacheError) as e:
        return faults + [f"{where}: unreadable ({one_line(e, limit=_CHARS)})"]
    recorded = words[0] if words else ""
    if not re.fullmatch(r"[0-9a-f]{64}", recorded):
        faults.append(f"{where}: does not hold a sha256 (found {recorded[:80]!r})")
    elif recorded != identity.removeprefix("sha256:"):
        faults.append(f"{location.where(schema.MANIFEST_NAME)}: sha256 {identity.removeprefix('sha256:')} differs "
                      f"from the {recorded} in {schema.MANIFEST_SEAL_NAME}: the manifest was changed after it was "
                      "written (its shard list, counts or hashes cannot be trusted)")
    return faults


def _shard_faults(location: CacheLocation, shards: ShardCache | None, entry: dict, expected: pa.Schema,
                  owner: dict[str, str], files: dict[str, str], limits: RowLimits | None) -> list[str]:
    fault = location.path_fault(entry["path"])
    if fault:
        return [fault]
    file = location.resolved(entry["path"])
    if file in files:
        return [f"{location.name}: shard paths {files[file]!r} and {entry['path']!r} name the same file"]
    files[file] = entry["path"]
    where = location.where(entry["path"])
    pin = None
    try:
        if shards is None:
            fault = location.bytes_fault(entry)
            if fault:
                return [fault]                 # known corrupt: do not parse it further
            source = location.arrow_source(entry["path"])
        else:                                  # downloaded once, size and sha256 checked on arrival
            path, pin = shards.acquire(entry, progress=True)
            source = pa.memory_map(str(path), "r")
        reader, batch_starts, ids = open_shard(source, where, expected)
        return _row_faults(reader, batch_starts, ids, entry, where, owner, limits)
    except RemoteMissing:
        return [f"{where}: shard is missing"]
    except RemoteError:
        raise
    except CacheError as e:
        return [str(e)]
    except READ_ERRORS as e:
        return [f"{where}: cannot be read ({one_line(e, limit=_CHARS)})"]
    finally:
        release_pin(pin)


def _row_faults(reader, batch_starts: np.ndarray, ids: pa.ChunkedArray, entry: dict, where: str,
                owner: dict[str, str], limits: RowLimits | None) -> list[str]:
    """Count, ids unique across the cache and (with `limits`) every record batch's rows of an open shard."""
    faults = []
    if len(ids) != entry["num_samples"]:
        faults.append(f"{where}: holds {len(ids)} samples, the manifest says {entry['num_samples']}")
    for sample_id in ids.to_pylist():
        if sample_id in owner:
            faults.append(f"{where}: sample {sample_id!r}: {schema.SAMPLE_ID} also appears in {owner[sample_id]}")
        owner[sample_id] = entry["path"]
    if limits is not None:
        for batch in range(len(batch_starts) - 1):
            try:
                decode_batch(reader, batch, batch_starts, where, limits)
            except CacheError as e:
                faults.append(str(e))
    return faults


def describe_cache(cache, *, remote: RemoteConfig | None = None) -> str:
    """A human summary of a finished cache, from its manifest (shards are not read)."""
    location = CacheLocation(cache, remote)
    m, identity = read_manifest(location)
    schema.check_manifest(m, location.name)
    teacher, tokenizer, stats = m.get("teacher") or {}, m.get("tokenizer") or {}, m.get("stats") or {}
    dataset = m.get("dataset") or {}
    topk, temperature = m["topk"], m.get("temperature") or {}
    tail, rows = stats.get("mean_tail_mass") or {}, stats.get("rows") or {}
    total_bytes = stats.get("num_bytes", sum(s["num_bytes"] for s in m["shards"]))
    origin = m.get("origin") if isinstance(m.get("origin"), dict) else None
    lines = [
        f"cache           {location.name}",
        f"identity        {identity} (sha256 of manifest.json)",
        *([f"pulled from     {origin.get('url')} ({origin.get('manifest_sha256')}, {origin.get('num_samples')} "
           f"samples)"] if origin else []),
        f"format          {m['format']} v{m['format_version']}, written by kdcache {m.get('kdcache_version', '?')}"
        + (f" on {m['created']}" if m.get("created") else ""),
        f"teacher         {teacher.get('source', '?')} (revision {teacher.get('revision') or '-'}, "
        f"dtype {teacher.get('dtype', '?')}, config {teacher.get('config_hash', '?')})",
        f"tokenizer       {tokenizer.get('fingerprint', '?')} ({m.get('tokenizer_size', '?')} tokens, teacher "
        f"head {m.get('vocab_size', '?')} rows, image token {m.get('image_token_id', '?')}, "
        f"visual_len {m.get('visual_len', '?')})",
        f"template        {m.get('template', '?')} (version {m.get('template_version', 1)})",
        f"dataset         {dataset.get('source', '?')} ({dataset.get('fingerprint', '?')})",
    ]
    kinds, targets = schema.target_kinds(m), m.get("targets") or {}
    for role in schema.ROLES:
        if kinds[role] == "sampled":        # no tail: the draws come from the full distribution
            lines.append(f"{role + ' sampled':<16}N = {topk[role]} draws per row (RS-KD, seed "
                         f"{targets[role].get('seed', '?')}), temperature = {temperature.get(role, '?')}, "
                         f"{rows.get(role, '?')} rows, trained with the unbiased KL estimate")
            continue
        lines.append(f"{role + ' top-k':<16}k = {topk[role]}, temperature = {temperature.get(role, '?')}, "
                     f"{rows.get(role, '?')} rows, mean tail mass {_number(tail.get(role))}")
    lines += [
        f"samples         {m['num_samples']} in {len(m['shards'])} shards, {_human_bytes(total_bytes)}",
        f"per sample      {_human_bytes(stats.get('bytes_per_sample'))}; per token "
        f"{_human_bytes(stats.get('bytes_per_token'))} ({stats.get('tokens', '?')} tokens)",
        f"relation        {stats.get('samples_with_relation', '?')} samples; "
        f"images {stats.get('samples_with_image', '?')} samples ({_human_bytes(stats.get('image_bytes'))} embedded)",
    ]
    lines += _codec_lines(m, stats) + _fidelity_lines(m.get("fidelity"), kinds)
    skipped = m.get("skipped") or []
    lines.append(f"skipped         {len(skipped)} samples")
    lines += [f"  {s.get('sample_id')}: {s.get('reason')}" for s in skipped[:10]]
    if len(skipped) > 10:
        lines.append(f"  ... and {len(skipped) - 10} more (see {schema.MANIFEST_NAME})")
    return "\n".join(lines)


def _codec_lines(m: dict, stats: dict) -> list[str]:
    """`describe_cache`'s codec (format 2's `codec` and column `codecs`; format 1: v1) and encoded bytes per role."""
    column_codecs = schema.manifest_codecs(m)
    lines = [f"codec           {m.get('codec', 'v1')}" + ("" if column_codecs is None else " (" + ", ".join(
        f"{column} {name}" for column, name in sorted(column_codecs.items())) + ")")]
    by_role = stats.get("encoded_bytes")
    if by_role:
        samples = m["num_samples"] or 1
        lines.append("bytes by role   " + ", ".join(f"{role} {_human_bytes(n)} ({_human_bytes(n / samples)}/sample)"
                                                    for role, n in by_role.items())
                     + " (encoded, before zstd)")
    return lines


def _fidelity_lines(fidelity: dict | None, kinds: dict) -> list[str]:
    """`describe_cache`'s fidelity report (`kdcache dump --fidelity-sample`), when the manifest has one; a sampled
    role's numbers are its loss's estimate for the teacher itself (`kdcache.fidelity`)."""
    if not fidelity:
        return []
    relation = fidelity["relation"]
    return [f"fidelity        {fidelity['num_samples']} samples, codec {fidelity['codec']}: loss KL of the teacher "
            "itself (nats per row)",
            *[f"  {role:<14}mean {_sci(fidelity[role]['kl_mean_nats'])}, max {_sci(fidelity[role]['kl_max_nats'])} "
              f"over {fidelity[role]['rows']} rows" + (" (sampled: the estimate over the draws)"
                                                       if kinds[role] == "sampled" else "")
              for role in schema.ROLES],
            f"  {'relation':<14}cosine to exact min {_number(relation['cosine_min'], 7)}, mean "
            f"{_number(relation['cosine_mean'], 7)} over {relation['samples']} samples"]


def _sci(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _human_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
