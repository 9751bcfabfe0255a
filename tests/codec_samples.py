"""Adversarial samples for the cache codecs (numpy only, so that the kept version-1 cache in
tests/data/cache-v1 can be rewritten by the kdcache that predates format 2; see tests/test_codecs.py).

A vocabulary of V = 8 with k_response = V (every token in every response row), k_visual = 3 and
visual_len L = 4; rows with ties, -inf, -0.0 and +0.0, log-probs far below their row's largest
(beyond what `logq8` resolves), a row of -inf only, text-only samples (an empty visual span, no
relation), a sample without response rows, and relations with negative, zero and tiny values.
"""

from __future__ import annotations

import hashlib

import numpy as np

V, K_R, K_V, L = 8, 8, 3, 4
IMAGE_TOKEN = 7
MANIFEST = {"vocab_size": V, "tokenizer_size": V, "image_token_id": IMAGE_TOKEN, "visual_len": L, "max_length": 64,
            "relation": True, "images_embedded": True, "temperature": {"response": 1.0, "visual": 1.0},
            "tokenizer": {"fingerprint": "sha256:test", "class": "Test"}, "image_processor": {},
            "teacher": {"source": "codec-test"}, "template": "plain", "world_size": 1}

SPECIAL_ROWS = np.array([
    [-0.0, 0.0, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf],     # one certain token, +/- zero
    [-2.0794, -2.0794, -2.0794, -2.0794, -2.0794, -2.0794, -2.0794, -2.0794],   # ties: uniform over V
    [-0.5, -0.5, -1.25, -1.25, -30.0, -60000.0, -np.inf, -7.0],           # ties, far below the largest, -inf
    [-np.inf] * 8,                                                        # no probability anywhere
    [-1e-4, -9.5, -9.5, -15.9, -15.85, -16.0, -17.0, -65504.0],           # at and past logq8's floor
])


def _logprobs(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    logits = rng.normal(size=(rows, k)) * 3
    out = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - rng.uniform(0, 0.5, size=(rows, 1))
    return -np.sort(-out, axis=1)                       # descending, as a teacher's top-k


def sample(index: int, *, image: bool, response_rows: int = 5) -> dict:
    rng = np.random.default_rng(1000 + index)
    T = 16
    Lr = L if image else 0
    input_ids = rng.integers(0, IMAGE_TOKEN, size=T)
    input_ids[2: 2 + Lr] = IMAGE_TOKEN
    rows = np.sort(rng.choice(np.arange(2 + Lr, T - 1), size=response_rows, replace=False))
    response = _logprobs(rng, response_rows, K_R)
    special = SPECIAL_ROWS[index % len(SPECIAL_ROWS):][:response_rows]
    response[: len(special)] = special
    visual = _logprobs(rng, Lr, K_V)
    if Lr:
        visual[0] = [-0.0, -0.0, -np.inf]
    image_bytes = rng.bytes(40 + index) if image else None
    relation = None
    if image:
        relation = rng.normal(size=L * (L + 1) // 2) / L
        relation[index % len(relation)] = 0.0
        relation[-1] = -relation[-1] if index % 2 else 1e-7
    return {
        "sample_id": f"adv-{index:02d}", "input_ids": input_ids, "response_rows": rows,
        "visual_start": 2 if image else 0, "visual_len": Lr, "image": image_bytes,
        "image_sha256": hashlib.sha256(image_bytes).digest() if image else None,
        "response_topk_ids": np.array([rng.permutation(V) for _ in range(response_rows)], np.int64).reshape(-1, K_R),
        "response_topk_logprobs": response,
        "visual_topk_ids": np.array([rng.choice(V, K_V, replace=False) for _ in range(Lr)], np.int64).reshape(-1, K_V),
        "visual_topk_logprobs": visual,
        "relation": relation, "relation_norm": float(rng.uniform(1, 100)) if image else None,
    }


def samples() -> list[dict]:
    """Nine samples: images and text-only ones, one without response rows."""
    out = [sample(i, image=i % 3 != 2) for i in range(8)]
    out.append(sample(8, image=True, response_rows=0))
    return out
