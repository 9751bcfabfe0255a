"""Can this student learn from this cache? Refuse mismatches before any step is taken (docs/design.md §8)."""

from __future__ import annotations

import json
import math

from kdcache import models
from kdcache.errors import CacheError, KdcacheError

# The image-processor settings that change the pixel values the vision tower sees.
PIXEL_SETTINGS = ("size", "resample", "rescale_factor", "image_mean", "image_std", "do_normalize", "do_rescale",
                  "do_resize", "do_convert_rgb")


def check_cache_for_student(cache: str, student: str, *, remote=None, trust_remote_code: bool = False) -> str:
    """`kdcache check`: does `student` fit the cache at `cache` (a directory or URL)? Reads only the
    manifest (no shard is fetched), refuses as `check_student_matches_cache`; returns the cache's identity."""
    from kdcache import schema
    from kdcache.reader import CacheLocation, check_identity, read_manifest
    from kdcache.remote import RemoteConfig

    remote = (remote or RemoteConfig()).remote_config()
    location = CacheLocation(cache, remote)
    manifest, identity = read_manifest(location)
    check_identity(identity, remote.expected_identity(), location.name)
    schema.check_manifest(manifest, location.name, for_training=True)
    bundle = models.load_bundle(student, trust_remote_code=trust_remote_code)
    check_student_matches_cache(manifest, bundle, location.name)
    return identity


def check_student_matches_cache(manifest: dict, bundle: models.Bundle, cache: str) -> None:
    """Refuse what breaks training: another tokenizer (fingerprint; size where the manifest records it),
    image token, visual_len or image processor, or a student without a row for some input id.

    A teacher head larger than the student's is accepted (padded rows: Qwen2.5-7B has 152,064 where
    3B has 151,936, for one tokenizer): the loss drops top-k ids past the student's head and leaves
    their mass to the tail (docs/design.md §5). A mismatch names both sides; a manifest without (or
    with malformed) tokenizer, image token, visual_len, vocabulary or image-processor entries is a
    one-line CacheError.
    """
    config = bundle.model.config
    student = {
        "tokenizer fingerprint": models.tokenizer_fingerprint(bundle.tokenizer),
        "image_token_id": int(config.image_token_id),
        "visual_len": models.visual_len_of(config),
    }
    cached = {
        "tokenizer fingerprint": _entry(manifest, cache, "tokenizer", "fingerprint", kind=str),
        "image_token_id": _entry(manifest, cache, "image_token_id", kind=int),
        "visual_len": _entry(manifest, cache, "visual_len", kind=int),
    }
    if "tokenizer_size" in manifest:                  # caches dumped before it was recorded lack it
        student["tokenizer_size"] = len(bundle.tokenizer)
        cached["tokenizer_size"] = _entry(manifest, cache, "tokenizer_size", kind=int)
    for key, value in student.items():
        if cached[key] != value:
            raise KdcacheError(f"cache {cache} does not match student {bundle.source}: "
                               f"{key} is {cached[key]!r} in the cache but {value!r} in the student")
    _check_student_rows(manifest, bundle, cache)
    check_image_processors(_entry(manifest, cache, "image_processor", kind=dict),
                           processor_settings(bundle.image_processor), cache=cache, source=bundle.source)


def _check_student_rows(manifest: dict, bundle: models.Bundle, cache: str) -> None:
    """The student's input embeddings and LM head need a row for every input id (and label) of the cache.

    The reader bounds input ids by `tokenizer_size` where the manifest records it, else by
    `vocab_size` (the teacher's head rows), so an older cache still needs a student head as large as
    the teacher's. Top-k ids set no such bound: the loss drops those past the student's head.
    """
    vocab_size = _entry(manifest, cache, "vocab_size", kind=int)
    if "tokenizer_size" in manifest:
        needed = _entry(manifest, cache, "tokenizer_size", kind=int)
        what = f"has a tokenizer of {needed} tokens"
    else:
        needed = vocab_size
        what = (f"holds token ids up to {vocab_size - 1} (teacher vocabulary {vocab_size}; its manifest has no "
                "tokenizer_size, so dump it again with this kdcache to train a smaller head)")
    for part, weight in (("LM head", models.lm_head_weight(bundle.model)),
                         ("input embeddings", bundle.model.get_input_embeddings().weight)):
        if weight.shape[0] < needed:
            raise KdcacheError(f"cache {cache} {what} but student {bundle.source} has only {weight.shape[0]} "
                               f"rows in its {part}")


def processor_settings(image_processor) -> dict:
    """An image processor's JSON settings, as the manifest records the teacher's."""
    return json.loads(image_processor.to_json_string())


def check_image_processors(teacher: dict, student: dict, *, cache: str, source: str = "student") -> None:
    """Refuse a student whose image processor gives other pixel values than the teacher's did.

    Compares the `PIXEL_SETTINGS` present on both sides (size, resample, rescale, mean, std and
    the switches); the message names the setting and both values.
    """
    for key in PIXEL_SETTINGS:
        if key not in teacher or key not in student:
            continue
        if not _same(teacher[key], student[key]):
            raise KdcacheError(f"cache {cache} does not match student {source}: image processor {key} is "
                               f"{teacher[key]!r} in the cache (the teacher's) but {student[key]!r} in the student; "
                               "teacher and student must see the same pixels")


def _same(a, b) -> bool:
    """Equal settings: numbers within float tolerance, lists and dicts element by element."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def _entry(manifest: dict, cache: str, *keys: str, kind: type):
    """manifest[k1][k2]... as `kind`; a one-line CacheError naming the key when it is missing or malformed."""
    value = manifest
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            name = ".".join(keys[: depth + 1])
            raise CacheError(f"cache {cache}: manifest.json has no {name!r}; it cannot be checked against the "
                             "student (dump the cache again with this kdcache version)")
        value = value[key]
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is not int and isinstance(value, kind):
        return value
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise CacheError(f"cache {cache}: manifest.json {'.'.join(keys)!r} must be {_kind_name(kind)}, got {shown}")


def _kind_name(kind: type) -> str:
    return {int: "an integer", str: "a string", dict: "an object"}.get(kind, kind.__name__)
