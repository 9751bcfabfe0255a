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
recomputed in backward (`kdcache.rowloss.row_losses`), so the student never holds a (B, T, V)
float32 tensor. The per-row KL is `kdcache.kl`'s; this module re-exports it and `row_losses` /
`lowered_head`, so `losses.sparse_kl` etc. keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcache.kl import NO_TAIL, TAILS, TARGET_KINDS, dense_kl, sampled_kl, sparse_kl
from kdcache.rowloss import lowered_head, row_losses
from kdcache.targets import gram_matrix, gram_weight_grad, relation_from_hidden, unpack_upper, upcast, visual_len_of_packed

__all__ = ["NO_TAIL", "TAILS", "TARGET_KINDS", "LOSS_NORMS", "dense_kl", "sampled_kl", "sparse_kl", "lowered_head",
           "row_losses", "student_relation", "relation_loss", "StepGram", "distill_loss"]

LOSS_NORMS = ("token", "sample")


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
