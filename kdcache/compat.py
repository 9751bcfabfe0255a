"""Can this student learn from this cache? Refuse mismatches before any step is taken (docs/design.md §8)."""

from __future__ import annotations

from kdcache import models
from kdcache.errors import KdcacheError


def check_student_matches_cache(manifest: dict, bundle: models.Bundle, cache: str) -> None:
    """Tokenizer fingerprint, image token, visual_len and vocabulary must agree; the message names both sides."""
    config = bundle.model.config
    student = {
        "tokenizer fingerprint": models.tokenizer_fingerprint(bundle.tokenizer),
        "image_token_id": int(config.image_token_id),
        "visual_len": models.visual_len_of(config),
    }
    cached = {
        "tokenizer fingerprint": manifest["tokenizer"]["fingerprint"],
        "image_token_id": int(manifest["image_token_id"]),
        "visual_len": int(manifest["visual_len"]),
    }
    for key, value in student.items():
        if cached[key] != value:
            raise KdcacheError(f"cache {cache} does not match student {bundle.source}: "
                               f"{key} is {cached[key]!r} in the cache but {value!r} in the student")
    student_vocab = int(models.lm_head_weight(bundle.model).shape[0])
    if int(manifest["vocab_size"]) > student_vocab:
        raise KdcacheError(f"cache {cache} holds token ids up to {manifest['vocab_size'] - 1} (teacher vocabulary "
                           f"{manifest['vocab_size']}) but student {bundle.source} has only {student_vocab} rows "
                           "in its LM head")
