"""Chunked LM-head row losses: per-row CE and KL of `logits = hidden Wᵀ` without keeping the logits.

Logits are only ever computed for the rows that need them, `chunk_rows` at a time, each chunk
recomputed in backward (`row_losses`), so the student never holds a (B, T, V) float32 tensor.
The common case (bucket tail, T = 1 when CE and KL share rows) runs through `_BucketRows`, whose
hand-written backward reuses one (n, V) buffer in place; the rest runs `_chunk_losses` under
activation checkpointing. Both give the same values and gradients. Sampled rows run through
`_SampledRows` the same way. With `lowered_head(W, torch.bfloat16)` the GEMMs take bf16 operands
with float32 accumulation and output. The per-row KL arithmetic is `kdcache.kl`'s.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdcache.kl import NO_TAIL, TARGET_KINDS, _fold_out_of_range, _topk_kl, _topk_marks, sampled_kl, sparse_kl
from kdcache.targets import HALF_DTYPES, compute_dtype, half_mm


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
