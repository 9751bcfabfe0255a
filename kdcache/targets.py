"""What the dump computes from the teacher's final hidden states: top-k log-probs and the relation matrix.

Pure torch, float32 inside. Two quantities (docs/design.md §3):

* per row t, the top-k ids and log-probs of `log_softmax(h_t Wᵀ / T)` over the full vocabulary, or
  (sampled targets, RS-KD) N draws from that distribution and their log-probs (`sampled_logprobs`);
* per sample with an image, the visual-logit Gram matrix `R = Y Yᵀ` with `Y = H Wᵀ` the
  `visual_len x V` visual logits, computed as `R = H (WᵀW) Hᵀ` so that `Y` never exists, and
  stored divided by its Frobenius norm as a packed upper triangle in float16.

Precision: logits, log-softmax, top-k and the relation are float32 (all-float64 inputs stay
float64). The LM-head GEMM (`head_logits`) never copies the whole (V, D) head to float32: a bf16
(fp16) head with hidden states of the same dtype on CUDA is multiplied on the tensor cores with
float32 accumulation and output (`half_mm`: the product of two bf16 numbers is exact in float32, so
this is the upcast product up to summation order); a float32 head is used as it is; any other mix is
upcast `UPCAST_ROWS` vocabulary rows at a time. Float32 GEMMs on CUDA assume TF32 is off (torch's
default); with TF32 on, logits lose ~3 decimal digits.
"""

from __future__ import annotations

import hashlib
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


# --- the LM-head GEMM

HALF_DTYPES = (torch.bfloat16, torch.float16)
UPCAST_ROWS = 16384          # vocabulary rows of a low-precision head upcast at a time (route "upcast")


def head_route(device_type: str, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> str:
    """How `head_logits` multiplies hidden states by the LM head, from where and in what dtypes they are.

    "half"    CUDA, hidden and W both bf16 (or both fp16): one GEMM of the half operands on the tensor
              cores, float32 accumulation and output (`half_mm`); no copy of W;
    "direct"  W already in the compute dtype (float32, or float64 with float64 hidden): one GEMM, no copy;
    "upcast"  anything else (a bf16 head on the CPU, float32 hidden with a bf16 head): W upcast to float32
              `UPCAST_ROWS` rows at a time into the logit block, never as a whole.
    """
    if device_type == "cuda" and hidden_dtype == weight_dtype and weight_dtype in HALF_DTYPES:
        return "half"
    both64 = hidden_dtype == weight_dtype == torch.float64
    return "direct" if weight_dtype == (torch.float64 if both64 else torch.float32) else "upcast"


def half_mm(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` of two bf16 (or two fp16) matrices as float32, accumulated in float32.

    On CUDA `torch.mm(a, b, out_dtype=torch.float32)` (cuBLAS on the tensor cores). Elsewhere the same
    arithmetic from the upcast operands: a product of two bf16 (fp16) numbers has at most 16 (22)
    significant bits and is exact in float32, so the two differ only in summation order (and the
    tensor cores' accumulation rounding), |difference| <~ 2 D 2^-24 sum_d |a_d b_d|. Not differentiable.
    """
    if a.dtype != b.dtype or a.dtype not in HALF_DTYPES:
        raise ValueError(f"half_mm takes two bf16 or two fp16 matrices, got {a.dtype} and {b.dtype}")
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def head_logits(hidden: Tensor, lm_head_weight: Tensor) -> Tensor:
    """`hidden Wᵀ` (n, V) in the compute dtype (float32; float64 for float64 inputs) by `head_route`.

    hidden (n, D), lm_head_weight (V, D) any float dtypes. Call it with autocast off. Not
    differentiable through the "half" route (the student's losses wrap their own GEMMs).
    """
    route = head_route(hidden.device.type, hidden.dtype, lm_head_weight.dtype)
    if route == "half":
        return half_mm(hidden, lm_head_weight.T)
    dtype = compute_dtype(hidden, lm_head_weight)
    h = hidden.to(dtype)                                                   # (n, D)
    if route == "direct":
        return h @ lm_head_weight.T
    logits = h.new_empty(h.shape[0], lm_head_weight.shape[0])              # (n, V)
    for start in range(0, lm_head_weight.shape[0], UPCAST_ROWS):
        logits[:, start: start + UPCAST_ROWS] = h @ lm_head_weight[start: start + UPCAST_ROWS].to(dtype).T
    return logits


# --- top-k log-probs


@torch.no_grad()
def topk_logprobs(hidden: Tensor, lm_head_weight: Tensor, *, k: int, temperature: float = 1.0,
                  chunk_rows: int = 256) -> tuple[Tensor, Tensor]:
    """Top-k token ids and log-probabilities of the rows of `hidden` under the LM head.

        log p_t = log_softmax(h_t Wᵀ / T)          over the full vocabulary V
        ids_t, logprobs_t = topk(log p_t, k)        in descending order

    hidden (N, D) any float dtype, lm_head_weight (V, D) (no bias) -> ids (N, K) int64,
    logprobs (N, K) float32 (float64 if both inputs are float64). The LM head is applied in
    float32 even when the model runs in bf16 (`head_logits`: on CUDA a bf16 GEMM with float32
    accumulation and output, the same logits as the upcast up to summation order); rows are processed
    `chunk_rows` at a time so that at most a (chunk_rows, V) logit block exists. N = 0 gives (0, K)
    outputs. Ties in the logits are broken by torch.topk (unspecified order among equal values).
    """
    n, d = hidden.shape
    v, d_w = lm_head_weight.shape
    if d != d_w:
        raise ValueError(f"hidden size {d} does not match lm_head_weight {tuple(lm_head_weight.shape)}")
    if not 1 <= k <= v:
        raise ValueError(f"k={k} must be in [1, vocab_size={v}]")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids = torch.empty(n, k, dtype=torch.long, device=hidden.device)        # (N, K) int64
    logprobs = torch.empty(n, k, dtype=compute_dtype(hidden, lm_head_weight), device=hidden.device)  # float32
    for rows, logits in _scaled_logits(hidden, lm_head_weight, temperature, chunk_rows):
        # log_softmax = logits - logsumexp; top-k of the logits is the top-k of log_softmax,
        # which saves a second (n, V) buffer.
        top, top_ids = logits.topk(k, dim=-1, sorted=True)                   # (n, K)
        logprobs[rows] = top - torch.logsumexp(logits, dim=-1, keepdim=True)
        ids[rows] = top_ids
    return ids, logprobs


def _scaled_logits(hidden: Tensor, lm_head_weight: Tensor, temperature: float, chunk_rows: int):
    """(row slice, float32 logits / T of those rows): `head_logits` `chunk_rows` rows at a time, autocast off."""
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], chunk_rows):
            logits = head_logits(hidden[start: start + chunk_rows], lm_head_weight)   # (c, V) float32
            if temperature != 1.0:
                logits /= temperature
            yield slice(start, start + chunk_rows), logits


# --- sampled targets (RS-KD)


def draw_seed(seed: int, sample_id: str, role: str) -> int:
    """The seed of one sample's draws for one role: a 64-bit mix (sha256) of the dump's seed, the role and the
    sample id, so that draws do not depend on batch composition, rank, world size or resume (docs/design.md §4)."""
    digest = hashlib.sha256(f"kdcache-draws\0{int(seed)}\0{role}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sampled_logprobs(hidden: Tensor, lm_head_weight: Tensor, *, draws: int, temperature: float = 1.0,
                     generator: torch.Generator | None = None, chunk_rows: int = 256) -> tuple[Tensor, Tensor]:
    """`draws` independent draws per row from the teacher's full distribution, and their log-probabilities.

        log p_t = log_softmax(h_t Wᵀ / T)                            over the full vocabulary V
        x_t1 ... x_tN ~ p_t   i.i.d. (torch.multinomial, replacement=True, `generator`)
        ids_t = x_t, logprobs_t = log p_t(x_t)   ordered by descending log-prob, ties by ascending id

    so a token drawn twice appears twice, side by side (the top-k order, so the log-prob codecs apply).
    hidden (n, D), lm_head_weight (V, D) any float dtype -> ids (n, N) int64, logprobs (n, N) float32
    (float64 for float64 inputs); the logits are those of `topk_logprobs` (`head_logits`), `chunk_rows` rows
    at a time. n = 0 gives (0, N) outputs. The draws are reproducible for a given generator seed, device type
    and torch version, and the same logits (docs/decisions.md, "Sampled targets").
    """
    n, d = hidden.shape
    v, d_w = lm_head_weight.shape
    if d != d_w:
        raise ValueError(f"hidden size {d} does not match lm_head_weight {tuple(lm_head_weight.shape)}")
    if draws < 1 or temperature <= 0:
        raise ValueError(f"draws must be >= 1 and temperature > 0, got {draws} and {temperature}")
    ids = torch.empty(n, draws, dtype=torch.long, device=hidden.device)      # (n, N) int64
    logprobs = torch.empty(n, draws, dtype=compute_dtype(hidden, lm_head_weight), device=hidden.device)
    for rows, logits in _scaled_logits(hidden, lm_head_weight, temperature, chunk_rows):
        logits -= torch.logsumexp(logits, dim=-1, keepdim=True)                  # log p, in place
        drawn = torch.multinomial(logits.exp(), draws, replacement=True, generator=generator)   # (c, N)
        drawn = drawn.sort(dim=-1).values                                        # ascending id first ...
        values, order = logits.gather(-1, drawn).sort(dim=-1, descending=True, stable=True)
        ids[rows] = drawn.gather(-1, order)                                      # ... then by descending log p
        logprobs[rows] = values.clamp_(max=0.0)                                  # a rounding hair above 0
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
        return gram_weight_grad(lm_head_weight, grad_gram, chunk=ctx.chunk), None


def gram_weight_grad(lm_head_weight: Tensor, grad_gram: Tensor, *, chunk: int = 16384) -> Tensor:
    """dL/dW of `G = WᵀW` given dL/dG: `W (dG + dGᵀ)`, one (c, D) x (D, D) matmul per vocabulary chunk.

    lm_head_weight (V, D), grad_gram (D, D) -> (V, D) in W's dtype; only a (c, D) slice of W is upcast at a time.
    """
    dtype = compute_dtype(lm_head_weight)
    sym = (grad_gram + grad_gram.T).to(dtype)                                  # (D, D)
    grad = torch.empty_like(lm_head_weight)                                    # (V, D), W's dtype
    with torch.autocast(lm_head_weight.device.type, enabled=False):
        for start in range(0, lm_head_weight.shape[0], chunk):
            grad[start: start + chunk] = lm_head_weight[start: start + chunk].to(dtype) @ sym
    return grad


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
    packed, norm = normalized_relation_on_device(relation)
    norm = norm.item()
    if not math.isfinite(norm):
        raise ValueError(NON_FINITE_RELATION)
    return packed, norm


NON_FINITE_RELATION = "relation matrix has non-finite entries (teacher hidden states overflowed?)"


def normalized_relation_on_device(relation: Tensor) -> tuple[Tensor, Tensor]:
    """`normalized_relation` without a device synchronisation: (packed float16, norm as a 0-d float64 tensor).

    The same arithmetic (values bit for bit on the CPU); the caller checks that the norm is finite
    (a non-finite norm leaves the packed values meaningless) once the values reach the host.
    """
    relation64 = relation.to(torch.float64)                                 # (L, L)
    if relation.numel():
        norm = torch.linalg.matrix_norm(relation64, ord="fro")             # () float64
    else:
        norm = relation64.new_zeros(())
    scaled = relation64 / torch.where(norm > 0, norm, 1.0)                  # x / 1 is x: a zero matrix stays
    return pack_upper(scaled).to(torch.float16), norm
