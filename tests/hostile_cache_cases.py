"""The synthetic cache the hostile-cache tests tamper with (test_hostile_cache.py, test_hostile_fuzz.py):
four samples as the dump writes them in two shards, its manifest, and the manifest rewritten and resealed
as an attacker would."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from kdcache import schema, writer
from kdcache.writer import ShardWriter, finalize_cache, write_rank_report


K_R, K_V = 4, 3
VOCAB = 1000
IMAGE_TOKEN = 999
L = 6                      # visual_len of the synthetic teacher
START = 2                  # visual_start of image samples
T = 30
MAX_LENGTH = 64
SHARD_0, SHARD_1 = schema.shard_name(0, 0), schema.shard_name(0, 1)
MANIFEST = {
    "world_size": 1, "teacher": {"source": "synthetic", "revision": None, "dtype": "float32"},
    "tokenizer": {"fingerprint": "sha256:synthetic", "class": "Synthetic"},
    "vocab_size": VOCAB, "image_token_id": IMAGE_TOKEN, "pad_token_id": 0, "eos_token_id": 1,
    "visual_len": L, "template": "plain", "max_length": MAX_LENGTH,
    "temperature": {"response": 1.0, "visual": 2.0}, "relation": True, "images_embedded": True,
    "image_processor": {"size": {"height": 32, "width": 32}},
}


def make_sample(sample_id: str, *, seed: int, image: bool = True, R: int = 5) -> dict:
    """A sample as the dump writes one: image tokens exactly at [START, START + L), distinct top-k ids."""
    rng = np.random.default_rng(seed)
    start, length = (START, L) if image else (0, 0)
    input_ids = rng.integers(2, IMAGE_TOKEN, size=T)
    input_ids[start: start + length] = IMAGE_TOKEN
    image_bytes = rng.bytes(40) if image else None

    def topk(rows: int, k: int):
        ids = np.array([rng.choice(IMAGE_TOKEN, size=k, replace=False) for _ in range(rows)]).reshape(rows, k)
        logprobs = -np.sort(rng.uniform(0.05, 6.0, size=(rows, k)), axis=1)
        return ids, logprobs.astype(np.float32)

    response_ids, response_logprobs = topk(R, K_R)
    visual_ids, visual_logprobs = topk(length, K_V)
    return {
        "sample_id": sample_id, "input_ids": input_ids,
        "response_rows": np.sort(rng.choice(np.arange(start + length, T - 1), size=R, replace=False)),
        "visual_start": start, "visual_len": length,
        "image": image_bytes, "image_sha256": hashlib.sha256(image_bytes).digest() if image else None,
        "response_topk_ids": response_ids, "response_topk_logprobs": response_logprobs,
        "visual_topk_ids": visual_ids, "visual_topk_logprobs": visual_logprobs,
        "relation": rng.uniform(-1, 1, size=schema.relation_size(length)).astype(np.float32) if image else None,
        "relation_norm": float(rng.uniform(1, 50)) if image else None,
    }


SAMPLES = [make_sample("s0", seed=0), make_sample("s1", seed=1, image=False),
           make_sample("s2", seed=2), make_sample("s3", seed=3)]


def build_cache(cache: Path) -> dict:
    """Two shards of two samples each (one record batch per shard): [s0, s1 (text-only)], [s2, s3]."""
    with ShardWriter(cache, k_response=K_R, k_visual=K_V, shard_size_bytes=1, samples_per_batch=2) as writer:
        for sample in SAMPLES:
            writer.write(sample)
    write_rank_report(cache, 0, skipped=[])
    return finalize_cache(cache, dict(MANIFEST))


def pristine_cache(tmp_path_factory) -> Path:
    """The synthetic cache, built once per test module (its `pristine` fixture); tests tamper with copies."""
    cache = tmp_path_factory.mktemp("pristine") / "cache"
    build_cache(cache)
    return cache


def read_manifest(cache: Path) -> dict:
    return json.loads((cache / schema.MANIFEST_NAME).read_text())


def write_manifest(cache: Path, manifest: dict) -> None:
    """The manifest and its seal (manifest.sha256), both rewritten, as an attacker would."""
    writer.write_manifest(cache, manifest)


def reseal(cache: Path) -> None:
    """Recompute every shard's sha256 and size in the manifest, as an attacker would."""
    manifest = read_manifest(cache)
    for entry in manifest["shards"]:
        data = (cache / entry["path"]).read_bytes()
        entry["num_bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    write_manifest(cache, manifest)
