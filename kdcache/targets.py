"""What the dump computes from the teacher's final hidden states: top-k log-probs and the relation matrix.

Pure torch, float32 inside. Two quantities (docs/design.md §3):

* per row t, the top-k ids and log-probs of `log_softmax(h_t Wᵀ / T)` over the full vocabulary;
* per sample with an image, the visual-logit Gram matrix `R = Y Yᵀ` with `Y = H Wᵀ` the
  `visual_len x V` visual logits, computed as `R = H (WᵀW) Hᵀ` so that `Y` never exists, and
  stored divided by its Frobenius norm as a packed upper triangle in float16.

Precision: every matmul here runs in float32 (bf16/fp16 inputs are upcast; all-float64 inputs
stay float64). On CUDA this assumes TF32 matmuls are off (torch's default); with TF32 on,
logits lose ~3 decimal digits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kdcache.schema import relation_size


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of the arithmetic: float64 when every input is float64 (exact references), else float32."""
    return torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(x: Tensor) -> Tensor:
    """`x` in at least float32: half and bfloat16 go up, float64 stays float64."""
    return x.to(compute_dtype(x))


# --- top-k log-probs


@torch.no_grad()
def topk_logprobs(hidden: Tensor, lm_head_weight: Tensor, *, k: int, temperature: float = 1.0,
                  chunk_rows: int = 256) -> tuple[Tensor, Tensor]:
    """Top-k token ids and log-probabilities of the rows of `hidden` under the LM head.

        log p_t = log_softmax(h_t Wᵀ / T)          over the full vocabulary V
        ids_t, logprobs_t = topk(log p_t, k)        in descending order

    hidden (N, D) any float dtype, lm_head_weight (V, D) (no bias) -> ids (N, K) int64,
    logprobs (N, K) float32 (float64 if both inputs are float64). The LM head is applied in
    float32 even when the model runs in bf16; rows are processed `chunk_rows` at a time so that
    at most a (chunk_rows, V) logit block exists. N = 0 gives (0, K) outputs. Ties in the logits
    are broken by torch.topk (unspecified order among equal values).
    """
    n, d = hidden.shape
    v, d_w = lm_head_weight.shape
    if d != d_w:
        raise ValueError(f"hidden size {d} does not match lm_head_weight {tuple(lm_head_weight.shape)}")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must be in [1, vocab_size={v}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = compute_dtype(hidden, lm_head_weight)
    weight = lm_head_weight.to(dtype)                                      # (V, D) float32, once per call
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)        # (N, K) int64
    logprobs = torch.empty(n, k, dtype=dtype, device=hidden.device)        # (N, K) float32
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            logits = hidden[start: start + chunk_rows].to(dtype) @ weight.T    # (n, V) float32
            if temperature != 1.0:
                logits /= temperature
            # log_softmax = logits - logsumexp; top-k of the logits is the top-k of log_softmax,
            # which saves a second (n, V) buffer.
            top, top_ids = logits.topk(k, dim=-1, sorted=True)               # (n, K)
            logprobs[start: start + chunk_rows] = top - torch.logsumexp(logits, dim=-1, keepdim=True)
            ids[start: start + chunk_rows] = top_ids
    return ids, logprobs


def tail_mass(topk_logprobs: Tensor) -> Tensor:
    """Probability mass outside the top-k: `1 - sum_j exp(logprobs_j)`, clamped at 0.

    topk_logprobs (N, K) any float dtype (float16 from a cache) -> (N,) float32.
    Clamping absorbs the rounding of stored float16 log-probs when k covers ~all the mass.
    """
    return (1.0 - upcast(topk_logprobs).exp().sum(dim=-1)).clamp_min(0.0)


# --- relation matrix


def gram_matrix(lm_head_weight: Tensor, *, chunk: int = 16384) -> Tensor:
    """`G = WᵀW`, the (D, D) Gram matrix of the LM head, accumulated over chunks of the vocabulary.

    lm_head_weight (V, D) any float dtype -> (D, D) float32 (float64 if W is float64).
    Only a (chunk, D) float32 slice of W is upcast at a time. Differentiable in W (the student's
    relation loss uses it with grad when the LM head trains). float32 accumulation is enough:
    at V = 152k, D = 1024 the relative (Frobenius) error of R = H G Hᵀ against a float64 reference
    is 4.7e-7 with float32 accumulation and 4.7e-7 with float64 (the H G Hᵀ product dominates),
    both far below the 2e-4 of the float16 storage.
    """
    return _Gram.apply(lm_head_weight, chunk)


class _Gram(torch.autograd.Function):
    """`gram_matrix` with a hand-written backward: `dW = W (dG + dGᵀ)`, one (c, D) x (D, D) matmul per
    vocabulary chunk, where autograd through `w.T @ w` takes two (one per operand)."""

    @staticmethod
    def forward(ctx, lm_head_weight: Tensor, chunk: int) -> Tensor:
        v, d = lm_head_weight.shape
        dtype = compute_dtype(lm_head_weight)
        gram = torch.zeros(d, d, dtype=dtype, device=lm_head_weight.device)   # (D, D) float32
        with torch.autocast(lm_head_weight.device.type, enabled=False):
            for start in range(0, v, chunk):
                w = lm_head_weight[start: start + chunk].to(dtype)              # (c, D) float32
                gram += w.T @ w
        ctx.save_for_backward(lm_head_weight)
        ctx.chunk = chunk
        return gram

    @staticmethod
    def backward(ctx, grad_gram: Tensor):
        (lm_head_weight,) = ctx.saved_tensors
        dtype = compute_dtype(lm_head_weight)
        sym = (grad_gram + grad_gram.T).to(dtype)                              # (D, D)
        grad = torch.empty_like(lm_head_weight)                                # (V, D), W's dtype
        with torch.autocast(lm_head_weight.device.type, enabled=False):
            for start in range(0, lm_head_weight.shape[0], ctx.chunk):
                w = lm_head_weight[start: start + ctx.chunk].to(dtype)
                grad[start: start + ctx.chunk] = w @ sym
        return grad, None


def relation_from_hidden(hidden_visual: Tensor, gram: Tensor) -> Tensor:
    """The visual-logit Gram matrix without the logits: `R = Y Yᵀ = H Wᵀ W Hᵀ = H G Hᵀ`.

    hidden_visual (..., L, D) any float dtype, gram (D, D) from `gram_matrix` -> (..., L, L)
    float32, exactly symmetric (the two rounding-different halves are averaged). L = 0 gives
    an empty (0, 0) matrix. Differentiable in both inputs.
    """
    dtype = compute_dtype(hidden_visual, gram)
    h = hidden_visual.to(dtype)                                            # (..., L, D)
    with torch.autocast(h.device.type, enabled=False):
        relation = (h @ gram.to(dtype)) @ h.transpose(-1, -2)              # (..., L, L)
    return 0.5 * (relation + relation.transpose(-1, -2))


def visual_len_of_packed(size: int) -> int:
    """Inverse of `schema.relation_size`; raises ValueError if `size` is not a triangular number."""
    visual_len = (math.isqrt(8 * size + 1) - 1) // 2
    if relation_size(visual_len) != size:
        raise ValueError(f"packed relation of {size} values is not L(L+1)/2 for any integer L")
    return visual_len


def pack_upper(matrix: Tensor) -> Tensor:
    """Upper triangle incl. the diagonal, row-major: `[R00, R01, ..., R0L-1, R11, ..., RL-1L-1]`.

    matrix (..., L, L) -> (..., L (L + 1) / 2), same dtype. Differentiable.
    """
    visual_len = matrix.shape[-1]
    rows, cols = torch.triu_indices(visual_len, visual_len, device=matrix.device)
    return matrix[..., rows, cols]


def unpack_upper(packed: Tensor, visual_len: int) -> Tensor:
    """Inverse of `pack_upper`: the full symmetric matrix.

    packed (..., L (L + 1) / 2) -> (..., L, L), same dtype. Raises ValueError on a size mismatch.
    """
    if packed.shape[-1] != relation_size(visual_len):
        raise ValueError(f"packed relation has {packed.shape[-1]} values, expected "
                         f"{relation_size(visual_len)} for visual_len={visual_len}")
    rows, cols = torch.triu_indices(visual_len, visual_len, device=packed.device)
    matrix = packed.new_zeros(*packed.shape[:-1], visual_len, visual_len)  # (..., L, L)
    matrix[..., rows, cols] = packed
    matrix[..., cols, rows] = packed
    return matrix


def normalized_relation(relation: Tensor) -> tuple[Tensor, float]:
    """What the cache stores for one sample: `R / ||R||_F` packed in float16, and `||R||_F`.

    relation (L, L) float -> (packed (L (L + 1) / 2,) float16, norm float). The norm is taken in
    float64 over the full matrix. Entries of R / ||R||_F lie in [-1, 1], so float16 cannot
    overflow (raw values can). A zero (or empty) matrix gives zeros and norm 0.0; a non-finite
    matrix raises ValueError rather than writing NaN into a cache.
    """
    relation64 = relation.to(torch.float64)                                 # (L, L)
    norm = torch.linalg.matrix_norm(relation64, ord="fro").item() if relation.numel() else 0.0
    if not math.isfinite(norm):
        raise ValueError("relation matrix has non-finite entries (teacher hidden states overflowed?)")
    scaled = relation64 / norm if norm > 0 else relation64
    return pack_upper(scaled).to(torch.float16), norm
