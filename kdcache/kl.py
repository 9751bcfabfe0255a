"""Per-row KL between a student's logits and what a cache holds of the teacher's distribution.

`sparse_kl` against cached top-k log-probs (tail "bucket" or "renorm"), `sampled_kl` the RS-KD
Monte-Carlo estimate from cached draws, `dense_kl` the full-vocabulary reference. Plain autograd on
(N, V) logits; `kdcache.rowloss` runs the same arithmetic chunked with hand-written backwards, and
`kdcache.losses` builds the batch loss from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.targets import upcast

TAILS = ("bucket", "renorm")
TARGET_KINDS = ("topk", "sampled")   # what a role's cached rows hold (the manifest's `targets`; absent: top-k)
NO_TAIL = 1e-6   # teacher tail mass below this is float16 rounding of the stored log-probs, not signal


def sparse_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, *, temperature: float = 1.0,
              tail: str = "bucket") -> Tensor:
    """Forward KL(p || q) per row from the teacher's cached top-k, with `q = log_softmax(z / T)`.

    tail="bucket" (default), a proper KL over the k + 1 outcomes {top-k ids, everything else}:

        KL = sum_j p_j (log p_j - log q_j) + p_tail (log p_tail - log q_tail)
        p_tail = 1 - sum_j p_j,   q_tail = 1 - sum_j q_j = sum_{i not in top-k} q_i

    `log q_tail` is the log-sum-exp of the student's logits outside the top-k minus the full
    log-sum-exp: exact even when q_tail is below float32 resolution of `1 - sum q_j` (then the
    `log1p(-sum exp q_j)` form returns -inf or noise). Rows with `p_tail <= NO_TAIL` get no tail
    term. With k = V this equals the dense KL.

    tail="renorm": both sides renormalised over the top-k, `p'_j = p_j / sum p`, `q'_j = q_j / sum q`,
    `KL = sum_j p'_j (log p'_j - log q'_j)`.

    Ids >= V (a teacher head padded past the student's) are dropped, their mass left to the tail
    or renormalised away (`_fold_out_of_range`); a row with no id below V has KL 0.

    student_logits (N, V) any float dtype (raw, before temperature); topk_ids (N, K) int64 >= 0,
    unique per row; topk_logprobs (N, K) the teacher's log-probs at the same temperature T (float16
    from a cache is fine; -inf entries count as p_j = 0) -> (N,) float32, >= 0 up to rounding.
    No T² factor. N = 0 gives an empty (0,) tensor.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    z = upcast(student_logits) / temperature                                # (N, V) float32
    ids, log_p, keep = _fold_out_of_range(topk_ids, topk_logprobs.to(z.dtype), z.shape[-1])   # (N, K) each
    z_k = z.gather(-1, ids)                                                  # (N, K)
    if tail == "renorm":
        return _renorm_kl(log_p, z_k, keep)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)                           # (N, 1)
    kl = _topk_kl(log_p, z_k - lse)                                          # (N,)
    log_q_tail, has_outside = _log_tail(z, ids, keep, lse.squeeze(-1))      # (N,), (N,)
    p_tail = 1.0 - log_p.exp().sum(-1)                                       # (N,)
    has_tail = (p_tail > NO_TAIL) & has_outside
    p_tail = torch.where(has_tail, p_tail, 0.0)
    log_p_tail = torch.log(torch.where(has_tail, p_tail, 1.0))
    return kl + p_tail * (log_p_tail - log_q_tail)


def _topk_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """`sum_j p_j (log p_j - log q_j)` over (N, K) -> (N,); entries with p_j = 0 (log p_j = -inf) add 0, not NaN."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _fold_out_of_range(topk_ids: Tensor, log_p: Tensor, vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rule for top-k ids >= the student's vocabulary V: drop the entry, leave its mass to the tail.

    A teacher head may have more rows than the student's (Qwen2.5-7B pads to 152,064, 3B to 151,936)
    with the same tokenizer: ids past V are padding rows that no token ever uses, so they carry ~no
    mass, and the student has no such outcome to compare them with. Their log p becomes -inf (so
    p_tail = 1 - the sum over the kept p) and their id is clamped into range for gathers only;
    `keep` (N, K) marks the real entries, which alone enter the student's top-k set.
    Returns (ids (N, K) < V, log_p (N, K), keep (N, K) bool).
    """
    keep = topk_ids < vocab_size
    return topk_ids.clamp(max=vocab_size - 1), log_p.masked_fill(~keep, float("-inf")), keep


def _topk_marks(keep: Tensor, value: float, dtype: torch.dtype) -> Tensor:
    """Scatter-min sources (N, K): `value` at kept entries, +inf (leaves z as it is) at dropped ones.

    A clamped id may repeat a kept one; a plain scatter of two different values to one place is
    order-dependent, a min is not.
    """
    return torch.full(keep.shape, float("inf"), dtype=dtype, device=keep.device).masked_fill_(keep, value)


def _renorm_kl(log_p: Tensor, z_k: Tensor, keep: Tensor) -> Tensor:
    """tail="renorm": KL of both sides renormalised over the kept top-k entries (N, K) -> (N,).

    A row with nothing kept has nothing to compare: KL 0. Its entries are set to 0 first, so that
    no `-inf - -inf` (NaN) reaches the forward or the backward of the logsumexps.
    """
    any_kept = keep.any(dim=-1, keepdim=True)                                # (N, 1)
    log_p = log_p.where(any_kept, 0.0)
    z_k = z_k.masked_fill(~keep, float("-inf")).where(any_kept, 0.0)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    kl = _topk_kl(log_p, z_k - torch.logsumexp(z_k, dim=-1, keepdim=True))
    return kl.where(any_kept.squeeze(-1), 0.0)


def _log_tail(z: Tensor, ids: Tensor, keep: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """`log q_tail` = logsumexp of z outside the kept top-k minus `lse` (N,), and whether anything is outside.

    The top-k is masked with the most negative finite value, not -inf, so that a row whose top-k
    covers the whole vocabulary still gives a finite value and a NaN-free backward through
    logsumexp; such a row has no tail outcome (`has_outside` False), whatever float16 rounding
    left in the teacher's p_tail.
    """
    lowest = torch.finfo(z.dtype).min
    outside = torch.logsumexp(z.scatter_reduce(-1, ids, _topk_marks(keep, lowest, z.dtype), "amin"), dim=-1)
    return outside - lse, outside > lowest / 2


def dense_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Full-vocabulary forward KL(p || q) per row: the reference for `sparse_kl` and the online-KD path.

        KL = sum_i p_i (log p_i - log q_i),  p = softmax(t / T),  q = softmax(z / T)

    student_logits (N, V), teacher_logits (N, V) any float dtype -> (N,) float32. No T² factor.
    """
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)     # (N, V)
    log_p = F.log_softmax(upcast(teacher_logits).to(log_q.dtype) / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def sampled_kl(student_logits: Tensor, sample_ids: Tensor, sample_logprobs: Tensor, *,
               temperature: float = 1.0) -> Tensor:
    """The Monte-Carlo estimate of the full-vocabulary KL(p || s) per row from N cached draws x_j ~ p (RS-KD):

        KL̂ = (1/N) sum_j (log p(x_j) - log s(x_j)),   s = softmax(z / T) over the full vocabulary

    unbiased for KL(p || s) = E_p[log p - log s], and so is its gradient: dKL̂/dz = (s - c/N) / T with c the
    draws' counts per token, whose mean is (s - p) / T, the dense KL's gradient. The gradient does not use
    the stored log p(x_j) at all (they only set the loss's value). The estimate of one row can be negative.

    Draws of ids >= V (a teacher head padded past the student's: rows no token uses, ~never drawn) are
    dropped from the sum (still divided by N). student_logits (n, V) any float dtype (raw, before T);
    sample_ids (n, N) int64 >= 0, repeats allowed; sample_logprobs (n, N) log p(x_j) at the same T (float16
    from a cache is fine) -> (n,) float32 (float64 for float64 logits). No T² factor, as `sparse_kl`.
    """
    z = upcast(student_logits) / temperature                                # (n, V)
    keep = sample_ids < z.shape[-1]                                         # (n, N)
    log_s = z.gather(-1, sample_ids.clamp(max=z.shape[-1] - 1)) - torch.logsumexp(z, dim=-1, keepdim=True)
    terms = torch.where(keep, sample_logprobs.to(z.dtype) - log_s, 0.0)     # (n, N)
    return terms.sum(-1) / sample_ids.shape[-1]
