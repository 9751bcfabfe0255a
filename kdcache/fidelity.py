"""The dump's fidelity report (`kdcache dump --fidelity-sample N`, docs/design.md §4, docs/decisions.md).

On the first N samples a rank dumps, where the teacher's full logits exist, it measures what the cache
loses against them, after the codec's encode + decode round trip (what a reader gets back):

* per role, per row: the training loss's own KL (`kdcache.losses.sparse_kl`, tail="bucket") of a student
  that *is* the teacher, from the round-tripped top-k: over the k + 1 outcomes {stored ids, the rest},

      KL_t = sum_j p̂_j (log p̂_j - log p_j) + p̂_tail (log p̂_tail - log p_tail)

  with p = the teacher's full float32 softmax at the role's temperature, p̂_j the stored (decoded)
  probabilities and p̂_tail = 1 - sum_j p̂_j, dropped where the loss drops it (p̂_tail <= NO_TAIL or the
  top-k covers the vocabulary). Zero for an exact cache; it is what the cache adds to the loss's floor.
  A role with sampled targets (RS-KD) gets the same measure from its own loss, the Monte-Carlo estimate
  (`kdcache.losses.sampled_kl`) of a student that is the teacher, over the row's N stored draws:

      KL̂_t = (1/N) sum_j (log p̂(x_j) - log p(x_j))

  exactly 0 for exact stored log-probs, so it measures what the codec's rounding adds to the loss's *value*
  (signed, so a mean may be below 0; per draw at most float16's rounding, 2^-11 |log p|, for lossless, and
  compact's 1/32 nat within 15.875 nats of the row's largest draw).
  The sampled loss's gradient does not use the stored log-probs at all, so this is everything the codec
  changes. The estimate's Monte-Carlo noise is not a property of the cache but of N and the student: it is
  measured against N in benchmarks/bench_sampled.py (docs/decisions.md, "Sampled targets");
* per sample with a relation: the cosine of the stored (decoded) relation triangle, as a full symmetric
  matrix, to the exact float32 `R = H G Hᵀ` (computed in float64 from the float32 matrix).

Sums travel in each rank's report (`Fidelity.sums`); `kdcache.writer.merged_fidelity` turns every rank's
sums into the manifest's `fidelity` entry. The extra work is one LM-head GEMM over the sampled rows; nothing written changes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdcache import codecs, schema, targets
from kdcache.losses import sampled_kl, sparse_kl


def round_trip(codec: str | None, values: np.ndarray, k: int | None = None) -> np.ndarray:
    """`values` as a reader gets them back from a `codec` payload (format 1, `codec` None: unchanged)."""
    if codec is None:
        return values
    return codecs.decode(codec, np.frombuffer(codecs.encode(codec, values), np.uint8), k)


def row_kls(hidden: torch.Tensor, lm_head: torch.Tensor, ids: np.ndarray, logprobs: np.ndarray, *,
            temperature: float, chunk_rows: int, kind: str = "topk") -> np.ndarray:
    """(N,) float64 loss-rule KL of the stored rows (ids int32 (N, K), logprobs float16 (N, K), decoded)
    against the teacher's full float32 distribution of hidden (N, D) under lm_head (V, D), the KL's sums in
    float64 (in float32 their rounding, ~5e-7 nats, exceeds a lossless cache's KL). kind="sampled": the
    sampled loss's estimate (`sampled_kl`) over the stored draws instead of the top-k bucket KL."""
    out = []
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = targets.head_logits(hidden[start: start + chunk_rows], lm_head)             # (n, V) float32
            logits = logits.float().double()        # the float32 distribution; the KL's arithmetic in float64
            rows = slice(start, start + chunk_rows)
            stored = (torch.from_numpy(ids[rows].astype(np.int64)).to(logits.device),
                      torch.from_numpy(logprobs[rows]).to(logits.device))
            kl = (sampled_kl(logits, *stored, temperature=temperature) if kind == "sampled"
                  else sparse_kl(logits, *stored, temperature=temperature))
            out.append(kl.double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def cosine(stored_packed: np.ndarray, exact: torch.Tensor) -> float:
    """Cosine of a stored packed triangle (P,) to the exact (L, L) relation, in float64; NaN where either
    holds NaN or inf (no cosine is defined: a non-finite relation is not measured, `Fidelity.add_relation`),
    1.0 where both are finite and one is zero (nothing to lose)."""
    full = targets.unpack_upper(torch.from_numpy(stored_packed.astype(np.float64)), exact.shape[-1])
    exact = exact.double().cpu()
    denominator = torch.linalg.matrix_norm(full) * torch.linalg.matrix_norm(exact)
    if not (torch.isfinite(full).all() and torch.isfinite(exact).all()):
        return math.nan
    return float((full * exact).sum() / denominator) if denominator > 0 else 1.0


class Fidelity:
    """Accumulates the report over the first `num_samples` samples a rank dumps."""

    def __init__(self, num_samples: int, codec: str, kinds: dict | None = None):
        self.num_samples, self.codec = num_samples, codec
        self.kinds = kinds or {}                # role -> "topk" | "sampled" (absent: top-k)
        self.column_codecs = schema.column_codecs(codec) or {}
        self.seen = 0
        self.roles = {role: {"kl_sum": 0.0, "kl_max": None, "rows": 0} for role in schema.ROLES}
        self.relation = {"cosine_sum": 0.0, "cosine_min": None, "samples": 0}

    def wanted(self, batch_size: int) -> int:
        """How many leading samples of the next batch of `batch_size` are measured (0 once N are)."""
        return max(0, min(batch_size, self.num_samples - self.seen))

    def add_rows(self, role: str, hidden: torch.Tensor, lm_head: torch.Tensor, ids: torch.Tensor,
                 logprobs: torch.Tensor, *, temperature: float, chunk_rows: int) -> None:
        """One role's measured rows: hidden (N, D), and the top-k as the dump stores it (int32, float16)."""
        ids_column, logprobs_column = schema.TOPK_COLUMNS[role]
        k = ids.shape[1]
        ids_np = round_trip(self.column_codecs.get(ids_column), ids.cpu().numpy(), k)
        lp_np = round_trip(self.column_codecs.get(logprobs_column), logprobs.cpu().numpy(), k)
        kl = row_kls(hidden, lm_head, ids_np, lp_np, temperature=temperature, chunk_rows=chunk_rows,
                     kind=self.kinds.get(role, "topk"))
        entry = self.roles[role]
        if len(kl):
            entry["kl_sum"] += float(kl.sum())
            entry["kl_max"] = max(float(kl.max()), entry["kl_max"] if entry["kl_max"] is not None else -math.inf)
        entry["rows"] += len(kl)

    def add_relation(self, packed: torch.Tensor, exact: torch.Tensor) -> None:
        """One sample's stored relation (packed float16 (P,), as the dump stores it) against the exact (L, L).
        A non-finite one (either) is skipped, not measured: the codec would refuse it without naming the sample,
        and the dump's own check refuses it next, naming the sample (`teacher_dump.dump.shard_records`)."""
        packed = packed.cpu().numpy()
        if not (np.isfinite(packed).all() and torch.isfinite(exact).all()):
            return
        value = cosine(round_trip(self.column_codecs.get(schema.RELATION), packed), exact)
        r = self.relation
        r["cosine_sum"] += value
        r["cosine_min"] = value if r["cosine_min"] is None else min(r["cosine_min"], value)
        r["samples"] += 1

    def sums(self) -> dict:
        """This rank's summable report (for its rank report)."""
        return {"num_samples": self.seen, "codec": self.codec, "roles": self.roles, "relation": self.relation}

