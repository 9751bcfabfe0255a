"""Synthetic cache samples at LLaVA-scale shapes with value distributions close to a trained teacher's
(`Synth`), shared by bench_shards.py (sizes, codecs, I/O) and bench_sampled.py (sampled visual rows).

Shapes: vocabulary V = 151,936 (Qwen1.5), L = 728 visual rows (SigLIP-384's 27 x 27 patches less one, as
`common.VISUAL_LEN`), ~R = 200 response rows, k = 64, a prompt of PREFIX tokens before the image and
QUESTION after it.
"""

from __future__ import annotations

import numpy as np

import common

V, K, L, R = 151936, 64, common.VISUAL_LEN, common.RESPONSE_TOKENS
PREFIX, QUESTION = 31, 21
IMAGE_TOKEN = 151646                     # Qwen1.5's added "<image>" position, any id outside the text works


def cosine_modes(side: int) -> np.ndarray:
    """(side², side²) orthonormal 2-D DCT-II modes of a side x side grid (columns), lowest spatial frequency first."""
    n = np.arange(side)
    basis = np.cos(np.pi * (n[:, None] + 0.5) * n[None, :] / side)                      # (position, frequency)
    modes = np.einsum("xa,yb->xyab", basis, basis).reshape(side * side, side * side)
    modes = modes[:, np.argsort((n[:, None] ** 2 + n[None, :] ** 2).reshape(-1), kind="stable")]
    return modes / np.linalg.norm(modes, axis=0)


class Synth:
    """Value distributions close to a trained LLaVA teacher's, cheaply.

    * token ids follow a Zipf law (rank r has weight (r + 10)^-1.1) over a fixed permutation of the
      vocabulary, so common tokens recur across rows and samples as in real top-k lists;
    * a row's top-k log-probs are descending: top-1 probability ~ Beta(5, 2) for response rows
      (mean 0.71) and Beta(2, 5) for visual rows (0.29); the other k - 1 fall off as r^-s,
      s ~ U(1, 2), and the tail mass outside the top-k is ~ U(0.005, 0.05) (response) or
      U(0.1, 0.5) (visual); stored as float16 like the dump does;
    * the relation is full rank with an assumed spectrum (`relation`): `R = Y Yᵀ`, `Y = Q diag(√λ) G / √d`
      with `Q` the 2-D cosine modes of the 27 x 27 patch grid ordered by spatial frequency (so the
      strong components are spatially smooth, as patch features are), `G` a Gaussian (729 x 1024)
      mixing matrix, and `λ_n ∝ n^-decay` (default 1: the ~1/n power law reported for trained
      networks' representation spectra) for n >= 2, the constant mode (the mean logit vector that
      dominates visual-logit Gram matrices) carrying half the trace. Stored `R / ||R||_F` in float16;
      the exact float64 matrix is kept for the fidelity numbers. (Before issue 10 it was rank <= 32
      by construction, which flatters a low-rank codec.)
    """

    def __init__(self, seed: int = 0, decay: float = 1.0):
        self.rng = np.random.default_rng(seed)
        self.decay = decay
        self.modes = cosine_modes(int(np.sqrt(L + 1)))                 # (729, 729), lowest frequency first
        weights = (np.arange(V) + 10.0) ** -1.1
        self.cdf = np.cumsum(weights / weights.sum())
        self.vocab = self.rng.permutation(V).astype(np.int32)
        self.images = [common.make_image(seed * 100 + i) for i in range(8)]
        self.exact: dict[str, dict] = {}          # sample id -> exact relation (L, L), top-k log-probs (float64)

    def token_ids(self, n: int) -> np.ndarray:
        return self.vocab[np.minimum(np.searchsorted(self.cdf, self.rng.random(n)), V - 1)]

    def topk(self, rows: int, top1: tuple[float, float], tail: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.empty((rows, K), np.int32)
        for i in range(rows):
            candidates = self.token_ids(4 * K)
            _, first = np.unique(candidates, return_index=True)
            unique = candidates[np.sort(first)]
            while len(unique) < K:                                   # rare: top up with uniform ids
                extra = self.rng.integers(0, V, K, dtype=np.int32)
                unique = np.concatenate([unique, extra[~np.isin(extra, unique)]])
            ids[i] = unique[:K]
        p1 = self.rng.beta(*top1, size=(rows, 1))
        tail_mass = self.rng.uniform(*tail, size=(rows, 1))
        decay = np.arange(2, K + 1)[None, :] ** -self.rng.uniform(1.0, 2.0, size=(rows, 1))   # (rows, K - 1)
        rest = decay / decay.sum(axis=1, keepdims=True) * np.clip(1.0 - p1 - tail_mass, 1e-3, None)
        probs = np.concatenate([np.maximum(p1, rest[:, :1]), rest], axis=1)
        probs = np.sort(probs, axis=1)[:, ::-1]
        return ids, np.log(probs)                                    # float64: the writer stores float16

    def exact_relation(self, decay: float | None = None, d: int = 1024) -> np.ndarray:
        """(L, L) float64 `R / ||R||_F` with the assumed spectrum (class docstring)."""
        n = len(self.modes)
        lam = np.arange(1, n + 1, dtype=np.float64) ** -(self.decay if decay is None else decay)
        lam[0] = lam[1:].sum()                                       # the constant mode: half the trace
        features = (self.modes[1:] * np.sqrt(lam)) @ self.rng.standard_normal((n, d)) / np.sqrt(d)   # (L, d)
        matrix = features @ features.T
        return matrix / np.linalg.norm(matrix)

    def relation(self) -> tuple[np.ndarray, float, np.ndarray]:
        """(stored float16 triangle, norm, exact (L, L) float64)."""
        exact = self.exact_relation()
        rows, cols = np.triu_indices(L)
        return exact[rows, cols].astype(np.float16), float(self.rng.uniform(1e3, 1e4)), exact

    def sample(self, index: int) -> dict:
        import hashlib

        response_len = R + int(self.rng.integers(-20, 21))           # ~200 response rows
        input_ids = np.concatenate([self.token_ids(PREFIX), np.full(L, IMAGE_TOKEN, np.int32),
                                    self.token_ids(QUESTION + response_len)]).astype(np.int32)
        T = len(input_ids)
        r_ids, r_lp = self.topk(response_len, (5, 2), (0.005, 0.05))
        v_ids, v_lp = self.topk(L, (2, 5), (0.1, 0.5))
        relation, norm, exact = self.relation()
        image = self.images[index % len(self.images)]
        self.exact[f"s{index:06d}"] = {"relation": exact, "response": r_lp, "visual": v_lp}
        return {
            "sample_id": f"s{index:06d}", "input_ids": input_ids,
            "response_rows": np.arange(T - response_len - 1, T - 1, dtype=np.int32),
            "visual_start": PREFIX, "visual_len": L, "image": image, "image_sha256": hashlib.sha256(image).digest(),
            "response_topk_ids": r_ids, "response_topk_logprobs": r_lp,
            "visual_topk_ids": v_ids, "visual_topk_logprobs": v_lp, "relation": relation, "relation_norm": norm,
        }
