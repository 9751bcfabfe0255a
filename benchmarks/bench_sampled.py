"""Sampled targets (RS-KD, issue 10 item 2) against top-k at LLaVA shapes: bytes per visual row, gradient noise.

Visual rows (vocabulary 151,936; 728 rows per sample) with `synth.Synth`'s value distributions: a row's
top-64 probabilities as Synth draws them (top-1 ~ Beta(2, 5), the next 63 falling off as r^-s, s ~ U(1, 2), tail
mass outside the top-64 ~ U(0.1, 0.5)), and, what Synth leaves unspecified and sampling needs, the tail: ranks
65 ... V with weights r^-s (the same row's s, continuing its top-k's law), tail token ids from Synth's Zipf token
law. From that full distribution, N draws per row (with replacement), stored as the dump stores them (int32 ids,
float16 log p, by descending log-prob, repeats adjacent), against the row's top-64 (k = 64, the dump's default).

* bytes per visual row of ids + log-probs, encoded by each codec preset's column codecs (`v1`: the raw
  int32 / float16 buffers), then zstd 3 per sample and column (as Arrow IPC compresses each buffer);
* gradient noise of the sampled estimate, per row, in logit units at T = 1: E||ĝ - g||² = (1 - Σ p_i²) / N
  exactly (ĝ - g = p - c / N whatever the student); checked by Monte Carlo on the draws themselves;
* beside it the top-k bucket loss's gradient bias per row, ||g_bucket - g_dense||², for a student whose
  distribution outside the top-64 is uniform (an untrained head): Σ_tail p_i² - p_tail² / (V - 64). It is 0 for
  a student equal to the teacher; unlike the noise it does not shrink when a batch averages many rows; and
  the KL the bucket loss cannot see for that student, p_tail KL(tail shape || uniform), in nats per row
  (the sampled estimate's mean includes it).

    python benchmarks/bench_sampled.py [--samples 8] [--draws 8 16 32]

Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from synth import K, L, V, Synth  # noqa: E402

from kdcache import codecs, schema  # noqa: E402

PRESETS = ("v1", "lossless", "compact")
VISUAL_TOP1, VISUAL_TAIL = (2, 5), (0.1, 0.5)       # Synth's visual rows (synth.Synth.sample)


class Rows:
    """One sample's visual rows as full distributions: Synth's top-K plus a power-law tail over ranks K+1 ... V."""

    def __init__(self, synth: Synth, rng: np.random.Generator):
        self.synth, self.rng = synth, rng
        self.top_ids, top_logp = synth.topk(L, VISUAL_TOP1, VISUAL_TAIL)            # (L, K), float64 log p
        self.top_p = np.exp(top_logp)                                                  # (L, K)
        self.tail = np.clip(1.0 - self.top_p.sum(axis=1), 0.0, 1.0)                    # (L,)
        self.s = rng.uniform(1.0, 2.0, size=L)                                         # tail exponent per row
        self.a, self.b = K + 0.5, V + 0.5                                              # continuous rank range
        self.norm = power_integral(self.s, self.a, self.b)                             # ∫ r^-s dr over the tail

    def sum_p_squared(self) -> tuple[np.ndarray, np.ndarray]:
        """(Σ_i p_i² over the vocabulary, Σ over the tail only) per row (L,), the tail's sum by its integral."""
        tail_sq = self.tail ** 2 * power_integral(2 * self.s, self.a, self.b) / self.norm ** 2
        return (self.top_p ** 2).sum(axis=1) + tail_sq, tail_sq

    def tail_kl_to_uniform(self) -> np.ndarray:
        """p_tail KL(tail shape of p || uniform over the V - K tail tokens) per row (L,): what the top-k bucket
        loss cannot see for a student whose tail is uniform (continuous-rank integrals, as `sum_p_squared`)."""
        s, a, b = self.s, self.a, self.b
        mean_log_rank = (log_power_integral(s, b) - log_power_integral(s, a)) / self.norm     # E_q[ln r]
        entropy = np.log(self.norm) + s * mean_log_rank
        return self.tail * (np.log(V - K) - entropy)

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """n draws per row -> (ids int32 (L, n), log p float64 (L, n), p float64 (L, n)), by descending log p."""
        u = self.rng.random((L, n))
        cdf = np.cumsum(self.top_p, axis=1)                                            # (L, K)
        in_top = u < cdf[:, -1:]
        slot = np.minimum((u[:, :, None] >= cdf[:, None, :]).sum(axis=2), K - 1)       # (L, n)
        ids = np.take_along_axis(self.top_ids, slot, axis=1).astype(np.int32)
        p = np.take_along_axis(self.top_p, slot, axis=1)
        # tail draws: a rank by the inverse CDF of r^-s on [a, b], a Zipf token id, p = tail r^-s / norm
        v = self.rng.random((L, n))
        s = self.s[:, None]
        rank = (self.a ** (1 - s) + v * (self.b ** (1 - s) - self.a ** (1 - s))) ** (1 / (1 - s))
        tail_p = self.tail[:, None] * np.round(rank) ** -s / self.norm[:, None]
        ids = np.where(in_top, ids, self.synth.token_ids(L * n).reshape(L, n))
        p = np.where(in_top, p, tail_p)
        logp = np.log(p)
        order = np.lexsort((ids, -logp), axis=1)                                       # descending log p, then id
        take = lambda x: np.take_along_axis(x, order, axis=1)                          # noqa: E731
        return take(ids), take(logp), take(p)


def power_integral(s: np.ndarray, a: float, b: float) -> np.ndarray:
    """∫_a^b r^-s dr, elementwise in s (s != 1; s = 1 by the log)."""
    s = np.asarray(s, np.float64)
    near_one = np.abs(s - 1) < 1e-9
    safe = np.where(near_one, 2.0, s)
    return np.where(near_one, np.log(b / a), (b ** (1 - safe) - a ** (1 - safe)) / (1 - safe))


def log_power_integral(s: np.ndarray, r: float) -> np.ndarray:
    """The antiderivative of r^-s ln r at r: r^(1-s) ((1 - s) ln r - 1) / (1 - s)^2 (s != 1)."""
    return r ** (1 - s) * ((1 - s) * np.log(r) - 1) / (1 - s) ** 2


def stored_bytes(ids: np.ndarray, logprobs: np.ndarray, preset: str, zstd: pa.Codec) -> int:
    """zstd-3 bytes of one sample's ids and log-probs columns under a codec preset (v1: the raw buffers)."""
    logprobs = logprobs.astype(np.float16)
    if preset == "v1":
        payloads = [ids.astype(np.int32).tobytes(), logprobs.tobytes()]
    else:
        column_codecs = schema.column_codecs(preset)
        ids_column, logprobs_column = schema.TOPK_COLUMNS["visual"]
        payloads = [codecs.encode(column_codecs[ids_column], ids.astype(np.int32)),
                    codecs.encode(column_codecs[logprobs_column], logprobs)]
    return sum(len(zstd.compress(payload, asbytes=True)) for payload in payloads)


def monte_carlo_noise(rows: Rows, ids: np.ndarray, p: np.ndarray, sum_sq: np.ndarray) -> np.ndarray:
    """||p - c/N||² per row from the draws themselves: Σ p² - (2/N) Σ_j p(x_j) + Σ_i c_i² / N² (L,)."""
    n = ids.shape[1]
    same = ids[:, :, None] == ids[:, None, :]                                          # (L, n, n)
    return sum_sq - 2 * p.sum(axis=1) / n + same.sum(axis=(1, 2)) / n ** 2


def measure(samples: int, draws: list[int], seed: int = 0) -> dict:
    synth, rng, zstd = Synth(seed), np.random.default_rng(seed + 1), pa.Codec("zstd", 3)
    size = {preset: {"topk64": 0} | {f"sampled{n}": 0 for n in draws} for preset in PRESETS}
    noise = {n: {"exact": [], "monte_carlo": []} for n in draws}
    bias, tails, blind, unique = [], [], [], {n: [] for n in draws}
    for _ in range(samples):
        rows = Rows(synth, rng)
        sum_sq, tail_sq = rows.sum_p_squared()
        bias.append(tail_sq - rows.tail ** 2 / (V - K))
        tails.append(rows.tail)
        blind.append(rows.tail_kl_to_uniform())
        top_logp = np.log(rows.top_p)
        for preset in PRESETS:
            size[preset]["topk64"] += stored_bytes(rows.top_ids, top_logp, preset, zstd)
        for n in draws:
            ids, logp, p = rows.draw(n)
            for preset in PRESETS:
                size[preset][f"sampled{n}"] += stored_bytes(ids, logp, preset, zstd)
            noise[n]["exact"].append((1 - sum_sq) / n)
            noise[n]["monte_carlo"].append(monte_carlo_noise(rows, ids, p, sum_sq))
            unique[n].append(n - (ids[:, 1:] == ids[:, :-1]).sum(axis=1))
    row_count = samples * L
    return {
        "bytes_per_visual_row": {preset: {key: round(value / row_count, 1) for key, value in by.items()}
                                 for preset, by in size.items()},
        "grad_noise_per_row": {str(n): {"exact_mean": round(float(np.mean(noise[n]["exact"])), 5),
                                        "monte_carlo_mean": round(float(np.mean(noise[n]["monte_carlo"])), 5)}
                               for n in draws},
        "topk64_grad_bias_sq_per_row_uniform_tail_student": round(float(np.mean(bias)), 5),
        "topk64_unseen_kl_nats_per_row_uniform_tail_student": round(float(np.mean(blind)), 3),
        "mean_tail_mass_outside_top64": round(float(np.mean(tails)), 3),
        "unique_tokens_per_row": {str(n): round(float(np.mean(unique[n])), 2) for n in draws},
        "rows": row_count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--draws", type=int, nargs="+", default=[8, 16, 32])
    args = parser.parse_args()
    result = measure(args.samples, args.draws)
    for preset, by in result["bytes_per_visual_row"].items():
        print(f"{preset:<9} bytes per visual row (zstd 3): " + ", ".join(f"{k} {v}" for k, v in by.items()))
    for n, entry in result["grad_noise_per_row"].items():
        print(f"N = {n:>3}: gradient noise E||g_hat - g||^2 per row {entry['exact_mean']} (Monte Carlo "
              f"{entry['monte_carlo_mean']}), {result['unique_tokens_per_row'][n]} distinct tokens per row")
    print(f"top-64 bucket gradient bias^2 per row (uniform-tail student): "
          f"{result['topk64_grad_bias_sq_per_row_uniform_tail_student']}; KL it cannot see "
          f"{result['topk64_unseen_kl_nats_per_row_uniform_tail_student']} nats per row "
          f"(tail mass {result['mean_tail_mass_outside_top64']})")
    print(json.dumps({"benchmark": "sampled", "machine": common.machine(), **result}))


if __name__ == "__main__":
    main()
