"""What the student optimises: CE, sparse forward KL against cached top-k targets, relation cosine.

Pure torch, float32 inside (half/bf16 inputs are upcast; autocast is switched off around the
LM head). With `matmul_dtype=torch.bfloat16` (the trainer on CUDA in bf16) the LM-head GEMMs,
forward and backward, take bf16 operands with float32 accumulation and output; the log-softmax,
CE, KL and relation arithmetic stays float32. The LLaVA-KD objective (arXiv 2410.16236,
docs/design.md §5):

    L = L_reg + alpha L_res + beta L_vis + gamma L_rel

* `L_reg`: next-token cross-entropy over the response rows;
* `L_res`, `L_vis` (MDist): forward KL(p_teacher || q_student) per row against the cached
  top-k, over response rows and visual rows; for a role whose cache holds sampled draws (RS-KD), the
  unbiased Monte-Carlo estimate of the full-vocabulary KL (`sampled_kl`);
* `L_rel` (RDist): `1 - cos(vec R_s, vec R_t)` per sample with an image, where `R = Y Yᵀ` is the
  Gram matrix of the visual-row logits, computed as `H (WᵀW) Hᵀ` so the logits never exist.

Logits are only ever computed for the rows that need them, `chunk_rows` at a time, each chunk
recomputed in backward (`row_losses`), so the student never holds a (B, T, V) float32 tensor.
The common case (bucket tail, T = 1 when CE and KL share rows) runs through `_BucketRows`, whose
hand-written backward reuses one (n, V) buffer in place; the rest runs `_chunk_losses` under
activation checkpointing. Both give the same values and gradients. Sampled rows run through
`_SampledRows` the same way.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdcache.targets import (HALF_DTYPES, compute_dtype, gram_matrix, gram_weight_grad, half_mm, relation_from_hidden,
                             unpack_upper, upcast, visual_len_of_packed)

TAILS = ("bucket", "renorm")
TARGET_KINDS = ("topk", "sampled")   # what a role's cached rows hold (the manifest's `targets`; absent: top-k)
LOSS_NORMS = ("token", "sample")
NO_TAIL = 1e-6   # teacher tail mass below this is float16 rounding of the stored log-probs, not signal


# --- per-row KL


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


# --- relation


def student_relation(hidden_visual: Tensor, gram: Tensor) -> Tensor:
    """The student's visual-logit Gram matrices `R_s = H_s (W_sᵀ W_s) H_sᵀ = Y_s Y_sᵀ`.

    hidden_visual (S, L, D) any float dtype, gram (D, D) = `gram_matrix(W_s)` -> (S, L, L) float32,
    differentiable in both.
    """
    return relation_from_hidden(hidden_visual, gram)


def relation_loss(student_relation: Tensor, teacher_packed: Tensor) -> Tensor:
    """RDist per sample: `L_rel = 1 - cos(vec R_s, vec R_t)` over the FULL symmetric L x L matrices.

    student_relation (S, L, L) float; teacher_packed (S, L (L + 1) / 2), the cached upper triangle
    (any scale: the cache stores R_t / ||R_t||_F) -> (S,) float32 in [0, 2]. The teacher is
    unpacked rather than compared packed, so every off-diagonal entry counts twice, as in the
    paper. The student matrix is divided by its (detached) max |entry| first: cosine ignores
    scale, and raw Gram entries (~V x logit²) would overflow float32 when squared and summed.
    S = 0 gives an empty (0,) tensor; an all-zero matrix gives cos = 0, not NaN.
    """
    visual_len = student_relation.shape[-1]
    teacher = unpack_upper(upcast(teacher_packed), visual_len)               # (S, L, L)
    student = upcast(student_relation)                                       # (S, L, L)
    scale = student.detach().abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(student.dtype).tiny)
    cos = F.cosine_similarity((student / scale).flatten(1), teacher.to(student.dtype).flatten(1), dim=-1, eps=1e-12)
    return 1.0 - cos


# --- the student's Gram matrix, once per optimizer step


class StepGram:
    """`G = WᵀW` of a trained LM head once per optimizer step under gradient accumulation, its W-gradient once too.

    W changes only at the optimizer step, yet computing G with grad in every micro-batch costs a V x D x D
    matmul forward and another backward per micro-batch. Instead: call `start(micro, count)` before each
    micro-batch, then `gram(W)` inside its forward. The first micro-batch computes G without a graph; every
    micro-batch's backward adds its dL/dG to a (D, D) sum, and the last one's backward returns
    `W (S + Sᵀ)` (`targets.gram_weight_grad`) as W's gradient, inside that backward, where DDP's all-reduce
    and FSDP's reduce-scatter see it. The same gradient as per micro-batch, up to float32 summation order.
    The last micro-batch's loss must reach `gram(W)` (add `0 * G.sum()`: its relation term may be absent).
    Outside start(): `active` is False and the caller computes G per call as before.
    """

    def __init__(self) -> None:
        self.value: Tensor | None = None        # (D, D) G of this step's W, no graph
        self.grad_sum: Tensor | None = None     # (D, D) sum of dL/dG over the step's micro-batches so far
        self.last = False
        self.active = False

    def start(self, micro: int, count: int) -> None:
        if micro == 0:
            self.value = self.grad_sum = None
        self.last, self.active = micro == count - 1, True

    def gram(self, lm_head_weight: Tensor) -> Tensor:
        if self.value is None:
            with torch.no_grad():
                self.value = gram_matrix(lm_head_weight)
        return _StepGram.apply(lm_head_weight, self, self.last)


class _StepGram(torch.autograd.Function):
    """G (a copy) in forward; in backward accumulate dL/dG, and on the step's last micro-batch return W's gradient."""

    @staticmethod
    def forward(ctx, lm_head_weight, state: StepGram, last: bool):
        ctx.save_for_backward(lm_head_weight)
        ctx.state, ctx.last = state, last
        return state.value.clone()

    @staticmethod
    def backward(ctx, grad_gram):
        state = ctx.state
        state.grad_sum = grad_gram if state.grad_sum is None else state.grad_sum + grad_gram
        if not ctx.last:
            return None, None, None
        (lm_head_weight,) = ctx.saved_tensors
        grad = gram_weight_grad(lm_head_weight, state.grad_sum)
        state.grad_sum = None
        return grad, None, None


# --- chunked row losses


def lowered_head(lm_head_weight: Tensor, matmul_dtype: torch.dtype | None) -> Tensor | None:
    """The LM head's GEMM operand: W in `matmul_dtype` (bf16/fp16; made once per loss call), or None for float32 GEMMs.

    A bf16 operand rounds W (float32 master weights) to 8 significant bits, as autocast does for
    every other linear layer; the GEMM accumulates and returns float32 (`targets.half_mm`), and the
    log-softmax, CE and KL arithmetic stay float32 (error bound: docs/decisions.md, "LM-head GEMM").
    """
    if matmul_dtype is None:
        return None
    if matmul_dtype not in HALF_DTYPES:
        raise ValueError(f"matmul_dtype must be None, torch.bfloat16 or torch.float16, got {matmul_dtype}")
    return lm_head_weight.detach().to(matmul_dtype)                          # (V, D)


class _LoweredLogits(torch.autograd.Function):
    """`hidden Wᵀ` (n, V) float32 from half operands (`lowered` = W in bf16), differentiable in hidden and W.

    Forward and both backward GEMMs run on half operands with float32 accumulation and output, as
    autocast's linear layers do (dL/dz is rounded to the half dtype for the backward GEMMs).
    """

    @staticmethod
    def forward(ctx, hidden, lm_head_weight, lowered):
        ctx.save_for_backward(hidden, lowered)
        ctx.weight_dtype = lm_head_weight.dtype
        return half_mm(hidden.to(lowered.dtype), lowered.T)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, lowered = ctx.saved_tensors
        grad_hidden, grad_weight = _half_backward(grad_logits, hidden, lowered, ctx.needs_input_grad[:2],
                                                  ctx.weight_dtype)
        return grad_hidden, grad_weight, None


def _half_backward(grad_logits: Tensor, hidden: Tensor, lowered: Tensor, needs: tuple[bool, bool],
                   weight_dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """dL/dhidden = dz W and dL/dW = dzᵀ hidden as half-operand GEMMs (float32 accumulation), in the inputs' dtypes."""
    dz = grad_logits.to(lowered.dtype)                                       # (n, V)
    grad_hidden = half_mm(dz, lowered).to(hidden.dtype) if needs[0] else None
    grad_weight = half_mm(dz.T, hidden.to(lowered.dtype)).to(weight_dtype) if needs[1] else None
    return grad_hidden, grad_weight


def _chunk_logits(hidden: Tensor, lm_head_weight: Tensor, temperature: float, lowered: Tensor | None = None) -> Tensor:
    """(n, V) `hidden Wᵀ / T` in the compute dtype (float32, or float64 for float64 inputs), autocast off.

    With `lowered` (W in bf16, `lowered_head`) the GEMM multiplies half operands, float32 out.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        if lowered is not None:
            logits = _LoweredLogits.apply(hidden, lm_head_weight, lowered)
        else:
            dtype = compute_dtype(hidden, lm_head_weight)
            logits = hidden.to(dtype) @ lm_head_weight.to(dtype).T
    if temperature != 1.0:
        logits /= temperature
    return logits


def _chunk_losses(hidden: Tensor, lm_head_weight: Tensor, lowered: Tensor | None, labels: Tensor | None,
                  topk_ids: Tensor | None, topk_logprobs: Tensor | None, *, temperature: float, tail: str,
                  kind: str = "topk"):
    """CE and KL of one chunk of rows through autograd (the general path beside `_BucketRows` / `_SampledRows`):
    `sparse_kl` for top-k rows, `sampled_kl` for sampled ones."""
    logits = _chunk_logits(hidden, lm_head_weight, 1.0, lowered)            # (n, V); the KL applies T
    ce = F.cross_entropy(logits, labels, reduction="none") if labels is not None else None
    kl = None
    if topk_ids is not None and kind == "sampled":
        kl = sampled_kl(logits, topk_ids, topk_logprobs, temperature=temperature)
    elif topk_ids is not None:
        kl = sparse_kl(logits, topk_ids, topk_logprobs, temperature=temperature, tail=tail)
    return ce, kl


def _head_grads(grad_logits: Tensor, hidden: Tensor, weight: Tensor, lowered: Tensor | None,
                needs: tuple[bool, bool]) -> tuple[Tensor | None, Tensor | None]:
    """dL/dhidden = dz W and dL/dW = dzᵀ hidden from dL/dz (n, V), float32 GEMMs or half operands (`lowered`)."""
    grad_hidden = grad_weight = None
    with torch.autocast(grad_logits.device.type, enabled=False):
        if lowered is not None:                                              # half-operand GEMMs, float32 out
            return _half_backward(grad_logits, hidden, lowered, needs, weight.dtype)
        if needs[0]:
            grad_hidden = (grad_logits @ weight.to(grad_logits.dtype)).to(hidden.dtype)     # (n, D)
        if needs[1]:
            grad_weight = (grad_logits.T @ hidden.to(grad_logits.dtype)).to(weight.dtype)   # (V, D)
    return grad_hidden, grad_weight


class _SampledRows(torch.autograd.Function):
    """CE and the sampled KL estimate (`sampled_kl`) of one chunk of rows, backward written by hand (as
    `_BucketRows`): one (n, V) buffer, per-row scalars saved, the logits recomputed in backward. With w = g_kl /
    (T N) per kept draw and a = g_ce + w m (m = kept draws of the row), the gradient of g_ce CE + g_kl KL̂ is

        dz_i = a s_i - w c_i - g_ce [i = y]          (c_i: how often token i was drawn)

    Inputs as `_BucketRows` (CE and KL together only at T = 1). Returns (ce (n,), kl (n,)); a term not asked
    for is an empty (0,) tensor.
    """

    @staticmethod
    def forward(ctx, hidden, lm_head_weight, lowered, labels, sample_ids, sample_logprobs, temperature):
        z = _chunk_logits(hidden, lm_head_weight, temperature, lowered)     # (n, V), overwritten below
        v = z.shape[1]
        z_label = z.gather(1, labels[:, None]).squeeze(1) if labels is not None else None
        z_x = z.gather(1, sample_ids.clamp(max=v - 1))                       # (n, N)
        pivot = z.amax(dim=1)                                                # (n,)
        lse = pivot + z.sub_(pivot[:, None]).exp_().sum(dim=1).log()
        ce = lse - z_label if labels is not None else lse.new_zeros(0)
        terms = sample_logprobs.to(z.dtype) - (z_x - lse[:, None])
        kl = torch.where(sample_ids < v, terms, 0.0).sum(dim=1) / sample_ids.shape[1]
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, lm_head_weight, lowered, labels, sample_ids, lse)
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        hidden, weight, lowered, labels, sample_ids, lse = ctx.saved_tensors
        z = _chunk_logits(hidden, weight, ctx.temperature, lowered)         # (n, V): logits, then dL/dz
        v, draws = z.shape[1], sample_ids.shape[1]
        keep = sample_ids < v                                                # (n, N)
        w = g_kl.to(z.dtype) / (ctx.temperature * draws)                     # (n,) per kept draw
        a = w * keep.sum(dim=1) + (g_ce.to(z.dtype) if labels is not None else 0.0)
        z.sub_(lse[:, None]).exp_().mul_(a[:, None])                         # a s
        z.scatter_add_(1, sample_ids.clamp(max=v - 1), torch.where(keep, -w[:, None], 0.0))
        if labels is not None:
            z.scatter_add_(1, labels[:, None], -g_ce[:, None].to(z.dtype))
        grad_hidden, grad_weight = _head_grads(z, hidden, weight, lowered, ctx.needs_input_grad[:2])
        return grad_hidden, grad_weight, None, None, None, None, None


class _BucketRows(torch.autograd.Function):
    """CE and bucket-tail sparse KL of one chunk of rows, backward written by hand; same values and
    gradients as `_chunk_losses` under checkpointing, at a fraction of its (n, V) passes.

    One (n, V) buffer holds the logits, then (in place) their exponentials, then the gradient; only
    per-row scalars are saved, the logits are recomputed in backward. With the teacher's top-k set
    to -inf in that buffer, `m_out` = the largest logit outside the top-k and

        lse_out = m_out + log sum_{i not in top-k} exp(z_i - m_out)      (the sum is >= 1: stable)
        lse     = logaddexp(lse_out, logsumexp(z_topk)),   log q_tail = lse_out - lse

    which is exact however small q_tail is (as the masked log-sum-exp of `sparse_kl`). With
    a = g_ce + g_kl (sum_j p_j + p_tail) the gradient of g_ce CE + g_kl KL is

        dz_i = a q_i - g_kl p_i [i in top-k] - g_kl p_tail exp(z_i - lse_out) [i outside] - g_ce [i = y]

    and outside the top-k both exponentials are exp(z_i - m_out) <= 1 times a per-row factor.
    Top-k ids >= V are dropped by `_fold_out_of_range` as in `sparse_kl` (they need k < V here:
    `row_losses` sends k >= V with such ids to the other path). Inputs as `_chunk_losses`;
    `temperature` divides the logits of the KL (CE and KL together only at T = 1: CE is always at
    T = 1). Returns (ce (n,), kl (n,)); a term not asked for is an empty (0,) tensor.
    """

    @staticmethod
    def forward(ctx, hidden, lm_head_weight, lowered, labels, topk_ids, topk_logprobs, temperature):
        temperature = temperature if topk_ids is not None else 1.0
        z = _chunk_logits(hidden, lm_head_weight, temperature, lowered)     # (n, V), overwritten below
        z_label = z.gather(1, labels[:, None]).squeeze(1) if labels is not None else None
        pivot = lse_out = z_k = None
        if topk_ids is None:
            pivot = z.amax(dim=1)                                            # (n,)
            lse = pivot + z.sub_(pivot[:, None]).exp_().sum(dim=1).log()
        else:
            ids, log_p, keep = _fold_out_of_range(topk_ids, topk_logprobs.to(z.dtype), z.shape[1])   # (n, K)
            z_k = z.gather(1, ids)                                           # (n, K)
            lse = torch.logsumexp(z_k.masked_fill(~keep, float("-inf")), dim=1)   # -inf when nothing is kept
            if topk_ids.shape[1] < z.shape[1]:                               # ids are unique: an outside exists
                z.scatter_reduce_(1, ids, _topk_marks(keep, float("-inf"), z.dtype), "amin")
                pivot = z.amax(dim=1)                                        # (n,) max outside the top-k
                lse_out = pivot + z.sub_(pivot[:, None]).exp_().sum(dim=1).log()
                lse = torch.logaddexp(lse_out, lse)
        ce = lse - z_label if labels is not None else lse.new_zeros(0)
        kl = p_tail = lse.new_zeros(0)
        if topk_ids is not None:
            kl = _topk_kl(log_p, z_k - lse[:, None])
            p_tail = torch.zeros_like(lse)
            if lse_out is not None:
                p_tail = 1.0 - log_p.exp().sum(dim=1)
                has_tail = p_tail > NO_TAIL
                p_tail = torch.where(has_tail, p_tail, 0.0)
                kl = kl + p_tail * (torch.log(torch.where(has_tail, p_tail, 1.0)) - (lse_out - lse))
        ctx.temperature = temperature
        ctx.save_for_backward(hidden, lm_head_weight, lowered, labels, topk_ids, topk_logprobs, lse, pivot, lse_out,
                              p_tail)
        return ce, kl

    @staticmethod
    def backward(ctx, g_ce, g_kl):
        hidden, weight, lowered, labels, topk_ids, topk_logprobs, lse, pivot, lse_out, p_tail = ctx.saved_tensors
        z = _chunk_logits(hidden, weight, ctx.temperature, lowered)         # (n, V): logits, then dL/dz
        a = torch.zeros_like(lse) + (g_ce if labels is not None else 0.0)   # (n,) coefficient of q_i
        if topk_ids is None:
            z.sub_(pivot[:, None]).exp_().mul_((a * (pivot - lse).exp())[:, None])
        else:
            g_kl = g_kl / ctx.temperature                                    # z = logits / T
            ids, log_p, keep = _fold_out_of_range(topk_ids, topk_logprobs.to(z.dtype), z.shape[1])
            p = log_p.exp()                                                  # (n, K), 0 where dropped
            a = a + g_kl * (p.sum(dim=1) + p_tail)
            grad_k = a[:, None] * (z.gather(1, ids) - lse[:, None]).exp() - g_kl[:, None] * p
            if lse_out is None:
                z.zero_()
            else:
                coef = a * (pivot - lse).exp() - g_kl * p_tail * (pivot - lse_out).exp()
                z.scatter_reduce_(1, ids, _topk_marks(keep, float("-inf"), z.dtype), "amin")
                z.sub_(pivot[:, None]).exp_().mul_(coef[:, None])
            # kept ids hold 0 now; adding (not writing) lets a dropped entry's clamped id take its 0 in any order
            z.scatter_add_(1, ids, grad_k.masked_fill_(~keep, 0.0))
        if labels is not None:
            z.scatter_add_(1, labels[:, None], -g_ce[:, None].to(z.dtype))
        grad_hidden, grad_weight = _head_grads(z, hidden, weight, lowered, ctx.needs_input_grad[:2])
        return grad_hidden, grad_weight, None, None, None, None, None


def _fast_path(tail: str, with_ce: bool, topk_ids: Tensor | None, temperature: float, *, vocab_size: int) -> bool:
    """Whether `row_losses` can run `_BucketRows` (same values and gradients, fewer (n, V) passes)."""
    # CE is always at T = 1: the fast path shares one log-sum-exp between CE and KL only when T = 1.
    if tail != "bucket" or (with_ce and topk_ids is not None and temperature != 1.0):
        return False
    if topk_ids is None or topk_ids.shape[1] < vocab_size:
        return True
    # k >= V: the fast path takes the top-k to cover the vocabulary, which dropped ids past V break
    return bool((topk_ids < vocab_size).all())


def row_losses(hidden: Tensor, lm_head_weight: Tensor, *, labels: Tensor | None = None,
               topk_ids: Tensor | None = None, topk_logprobs: Tensor | None = None, temperature: float = 1.0,
               tail: str = "bucket", chunk_rows: int = 512, lowered: Tensor | None = None,
               kind: str = "topk") -> tuple[Tensor | None, Tensor | None]:
    """Per-row CE (T = 1) and sparse KL (temperature T) of `logits = hidden Wᵀ`, chunked.

    hidden (N, D), lm_head_weight (V, D) any float dtype; labels (N,) int64 or None; topk_ids,
    topk_logprobs (N, K) or both None -> (ce (N,) float32 or None, kl (N,) float32 or None).
    Logits are computed `chunk_rows` rows at a time and never kept: forward saves per-row scalars,
    backward recomputes one chunk at a time, so peak memory is a few (chunk_rows, V) float32
    buffers, whatever N. With tail="bucket" (and T = 1 when CE and KL are both asked for) each
    chunk runs `_BucketRows` (hand-written backward, one (chunk_rows, V) buffer); otherwise
    `_chunk_losses` under activation checkpointing. Values and gradients equal the unchunked ones.
    Top-k ids >= V (a teacher head padded past the student's) are dropped, their mass left to the
    tail (`_fold_out_of_range`). N = 0 gives empty (0,) tensors that are still attached to the graph
    (their sum has a grad). `lowered` (`lowered_head(W, torch.bfloat16)`) runs the LM-head GEMMs,
    forward and backward, on bf16 operands with float32 accumulation and output; None: float32 GEMMs.

    kind="sampled": `topk_ids` / `topk_logprobs` hold N draws per row (repeats allowed) and the KL is the
    Monte-Carlo estimate `sampled_kl` (`tail` does not apply); chunked the same way, through `_SampledRows`
    (hand-written backward) unless CE and KL are both asked for at T != 1.
    """
    if (topk_ids is None) != (topk_logprobs is None):
        raise ValueError("topk_ids and topk_logprobs must be given together")
    if kind not in TARGET_KINDS:
        raise ValueError(f"kind must be one of {TARGET_KINDS}, got {kind!r}")
    if labels is None and topk_ids is None:
        return None, None
    fn = functools.partial(_chunk_losses, temperature=temperature, tail=tail, kind=kind)
    recompute = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    if kind == "sampled":
        fast = topk_ids is None or labels is None or temperature == 1.0
    else:
        fast = _fast_path(tail, labels is not None, topk_ids, temperature, vocab_size=lm_head_weight.shape[0])
    rows_fn = _SampledRows if kind == "sampled" and topk_ids is not None else _BucketRows
    ce_parts, kl_parts = [], []
    for start in range(0, max(hidden.shape[0], 1), chunk_rows):             # N = 0: one empty chunk
        rows = slice(start, start + chunk_rows)
        args = (hidden[rows], lm_head_weight, lowered, None if labels is None else labels[rows],
                None if topk_ids is None else topk_ids[rows], None if topk_ids is None else topk_logprobs[rows])
        if fast:
            ce, kl = rows_fn.apply(*args, temperature)
        else:
            ce, kl = checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)
        ce_parts.append(ce)
        kl_parts.append(kl)
    return (None if labels is None else torch.cat(ce_parts),
            None if topk_ids is None else torch.cat(kl_parts))


# --- the batch loss


def _reduce(values: Tensor, sample_of_row: Tensor, loss_norm: str, batch_size: int) -> Tensor:
    """Mean of per-row `values` (N,): over all rows ("token"), or of per-sample means ("sample").

    sample_of_row (N,) int64 in [0, B). Samples without rows do not count; N = 0 gives 0.0.
    """
    if loss_norm == "token":
        return values.sum() / max(values.shape[0], 1)
    sums = values.new_zeros(batch_size).index_add(0, sample_of_row, values)              # (B,)
    counts = torch.bincount(sample_of_row, minlength=batch_size).to(values.dtype)       # (B,)
    present = counts > 0
    return (sums[present] / counts[present]).sum() / present.sum().clamp_min(1)


def _relation_term(hidden: Tensor, lm_head_weight: Tensor, batch: dict, gram: Tensor | None) -> Tensor:
    """Mean RDist over the batch rows in `relation_index`; hidden (B, T, D) -> scalar float32."""
    rows = batch["relation_index"]                                           # (S,)
    starts = batch["relation_visual_start"]                                  # (S,)
    teacher = batch["relation_upper"]                                        # (S, P)
    visual_len = visual_len_of_packed(teacher.shape[-1])
    too_long = starts + visual_len > hidden.shape[1]
    if bool(too_long.any()):
        b = int(rows[too_long.nonzero()[0, 0]])
        sample = batch.get("sample_id", [None] * hidden.shape[0])[b]
        raise ValueError(f"sample {sample!r}: relation of visual_len={visual_len} does not fit the sequence")
    positions = starts[:, None] + torch.arange(visual_len, device=starts.device)   # (S, L)
    hidden_visual = hidden[rows[:, None], positions]                         # (S, L, D)
    if gram is None:
        gram = gram_matrix(lm_head_weight)                                   # (D, D) with grad in W
    return relation_loss(student_relation(hidden_visual, gram), teacher).mean()


def distill_loss(hidden: Tensor, lm_head_weight: Tensor, batch: dict, *, alpha: float = 1.0, beta: float = 1.0,
                 gamma: float = 0.5, temperature_response: float = 1.0, temperature_visual: float = 1.0,
                 tail: str = "bucket", loss_norm: str = "token", chunk_rows: int = 512,
                 gram: Tensor | None = None, matmul_dtype: torch.dtype | None = None,
                 kinds: dict | None = None) -> dict[str, Tensor]:
    """The LLaVA-KD loss of one batch: `L = L_reg + alpha L_res + beta L_vis + gamma L_rel`.

    hidden (B, T, D) final (post-norm) student hidden states, any float dtype; lm_head_weight
    (V, D); batch: the collate dict of docs/design.md §7, CE-only without `response_topk_ids`.
    `gram` = WᵀW may be passed (a constant when W is frozen, or a tensor whose graph leads to W, as
    the trainer's once-per-step Gram does); otherwise it is computed here, with grad.
    `matmul_dtype` (torch.bfloat16: the trainer on CUDA) multiplies the LM head in that dtype with
    float32 accumulation (`lowered_head`); None keeps every GEMM float32 (the CPU path).

    `kinds` ({role: "topk" | "sampled"}, `schema.target_kinds` of the cache's manifest; None or a missing role:
    "topk") says what each role's cached rows hold: a top-k row's KL is `sparse_kl` (with `tail`), a sampled
    row's the unbiased estimate `sampled_kl`.

    loss_norm="token" averages CE and each KL over all rows of the batch; "sample" averages
    each sample's mean over its rows (samples without such rows left out). L_rel is a mean over
    the samples in `relation_index`. A term whose weight is 0, or whose targets are absent, is
    not computed and reported as 0.0; a term over an empty set is 0.0, never NaN.

    Returns {"loss", "ce", "kl_response", "kl_visual", "relation"}: 0-dim float32 tensors;
    `loss` carries the graph, the components are detached (for logging).
    """
    if tail not in TAILS or loss_norm not in LOSS_NORMS:
        raise ValueError(f"tail must be in {TAILS} and loss_norm in {LOSS_NORMS}, got {tail!r}, {loss_norm!r}")
    kinds = kinds or {}
    if any(kind not in TARGET_KINDS for kind in kinds.values()):
        raise ValueError(f"kinds must map roles to one of {TARGET_KINDS}, got {kinds!r}")
    batch_size = hidden.shape[0]
    zero = torch.zeros((), dtype=torch.float32, device=hidden.device)
    distill = "response_topk_ids" in batch
    terms = {"ce": zero, "kl_response": zero, "kl_visual": zero, "relation": zero}

    lowered = lowered_head(lm_head_weight, matmul_dtype)                    # (V, D) bf16 or None, once per call
    r_index = batch["response_index"]                                        # (N_r, 2) [b, t]
    with_kl = distill and alpha != 0
    ce, kl = row_losses(hidden[r_index[:, 0], r_index[:, 1]], lm_head_weight, labels=batch["response_labels"],
                        topk_ids=batch["response_topk_ids"] if with_kl else None,
                        topk_logprobs=batch["response_topk_logprobs"] if with_kl else None,
                        temperature=temperature_response, tail=tail, chunk_rows=chunk_rows, lowered=lowered,
                        kind=kinds.get("response", "topk"))
    terms["ce"] = _reduce(ce, r_index[:, 0], loss_norm, batch_size)
    if with_kl:
        terms["kl_response"] = _reduce(kl, r_index[:, 0], loss_norm, batch_size)
    if distill and beta != 0:
        v_index = batch["visual_index"]                                      # (N_v, 2) [b, t]
        _, kl = row_losses(hidden[v_index[:, 0], v_index[:, 1]], lm_head_weight,
                           topk_ids=batch["visual_topk_ids"], topk_logprobs=batch["visual_topk_logprobs"],
                           temperature=temperature_visual, tail=tail, chunk_rows=chunk_rows, lowered=lowered,
                           kind=kinds.get("visual", "topk"))
        terms["kl_visual"] = _reduce(kl, v_index[:, 0], loss_norm, batch_size)
    relation_index = batch.get("relation_index")                             # (S,) or absent
    if distill and gamma != 0 and relation_index is not None and relation_index.numel() > 0:
        terms["relation"] = _relation_term(hidden, lm_head_weight, batch, gram)

    loss = terms["ce"] + alpha * terms["kl_response"] + beta * terms["kl_visual"] + gamma * terms["relation"]
    return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
