"""kdcache.losses with the LM head's GEMM on bf16 operands (the trainer's CUDA path): losses within the
stated bound of a float64 reference, gradients those of float32 at rounded inputs (docs/decisions.md,
"LM-head GEMM")."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses

from loss_cases import _batch, _losses_and_grads, _teacher_topk


# --- the LM head on bf16 operands (the trainer's CUDA path; off CUDA the same arithmetic, exact products)

U_BF16 = 2.0 ** -8                     # unit roundoff of bf16: 8 significant bits (7 stored), round to nearest
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _llm_rows(n=40, d=64, v=500, k=16, seed=30):
    """Rows with LLM-like logits (std ~3), labels and a sharp teacher's top-k."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * 3 / math.sqrt(d)
    labels = torch.randint(0, v, (n,), generator=gen)
    ids, logprobs = _teacher_topk(torch.randn(n, v, generator=gen) * 3, k=k)
    return hidden, weight, labels, ids, logprobs


def _logit_error_bound(hidden, weight):
    """Per row, the bound on every logit's error from bf16 operands (docs/decisions.md, "LM-head GEMM"):
    |z^_i - z_i| <= (2u + u^2 + D 2^-24) sum_d |h_d| |W_id|, maximised over i -> (n,) float64."""
    delta = 2 * U_BF16 + U_BF16 ** 2 + hidden.shape[1] * 2.0 ** -24
    return delta * (hidden.double().abs() @ weight.double().abs().T).amax(dim=1)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])          # `_BucketRows`, and the checkpointed autograd path
def test_bf16_head_losses_are_within_the_stated_bound_of_a_float64_reference(tail):
    hidden, weight, labels, ids, logprobs = _llm_rows()
    lowered = losses.lowered_head(weight, torch.bfloat16)
    kwargs = dict(labels=labels, topk_ids=ids, topk_logprobs=logprobs, tail=tail, chunk_rows=7)
    ce, kl = losses.row_losses(hidden, weight, lowered=lowered, **kwargs)
    ce32, kl32 = losses.row_losses(hidden, weight, **kwargs)
    logits64 = hidden.double() @ weight.double().T
    ce64 = F.cross_entropy(logits64, labels, reduction="none")
    kl64 = losses.sparse_kl(logits64, ids, logprobs.double(), tail=tail)
    # CE = lse - z_y and every KL term is a p-weighted log q (or log q_tail): each moves by at most 2 max|dz|
    bound = 2 * _logit_error_bound(hidden, weight) + 1e-5                   # + the float32 arithmetic after the GEMM
    assert bool(((ce.double() - ce64).abs() <= bound).all()) and bool(((kl.double() - kl64).abs() <= bound).all())
    # the operands really were rounded: the bf16 path is far from the float32 path's own rounding
    float32_error = max(float((ce32.double() - ce64).abs().max()), 1e-7)
    assert float((ce.double() - ce64).abs().max()) > 20 * float32_error


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_bf16_head_gradients_are_the_float32_gradients_at_rounded_inputs_up_to_rounding_dz(tail):
    # With h and W already bf16-valued the logits are the same float32 numbers on both paths; the bf16 path then
    # rounds dL/dz to bf16 for its two backward GEMMs: |g^ - g| <= (u + 2 (n + 1) 2^-24) |dz|ᵀ |h| elementwise.
    hidden, weight, labels, ids, logprobs = _llm_rows()
    hidden, weight = hidden.bfloat16().float(), weight.bfloat16().float()
    kwargs = dict(labels=labels, topk_ids=ids, topk_logprobs=logprobs, tail=tail, chunk_rows=7)
    lowered = losses.lowered_head(weight, torch.bfloat16)
    got = _losses_and_grads(lambda h, w: losses.row_losses(h, w, lowered=lowered, **kwargs), hidden, weight)
    want = _losses_and_grads(lambda h, w: losses.row_losses(h, w, **kwargs), hidden, weight)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)              # forward: the same logits
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
    logits = (hidden @ weight.T).requires_grad_()                            # dL/dz, as the paths compute it
    (F.cross_entropy(logits, labels, reduction="none").sum()
     + 2 * losses.sparse_kl(logits, ids, logprobs, tail=tail).sum()).backward()
    dz = logits.grad.double().abs()
    n, v = logits.shape
    slack = 1e-5                                                             # dz of the two formulas, float32 apart
    bound_w = (U_BF16 + 2 * (n + 1) * 2.0 ** -24 + slack) * (dz.T @ hidden.double().abs()) + 1e-9
    bound_h = (U_BF16 + 2 * (v + 1) * 2.0 ** -24 + slack) * (dz @ weight.double().abs()) + 1e-9
    assert bool(((got[3].double() - want[3].double()).abs() <= bound_w).all())
    assert bool(((got[2].double() - want[2].double()).abs() <= bound_h).all())
    assert not torch.equal(got[3], want[3])                                  # dz really was rounded


def test_distill_loss_with_a_bf16_head_gemm_keeps_the_relation_and_refuses_other_dtypes():
    hidden, weight, batch = _batch(d=32, v=300)
    weight = weight * 6 / math.sqrt(32)
    out = losses.distill_loss(hidden, weight, batch, matmul_dtype=torch.bfloat16)
    out32 = losses.distill_loss(hidden, weight, batch)
    assert out["relation"] == out32["relation"]                             # the Gram relation stays float32
    bound = 2 * float(_logit_error_bound(hidden.flatten(0, 1), weight).max()) + 1e-5
    for name in ("ce", "kl_response", "kl_visual"):
        assert abs(float(out[name]) - float(out32[name])) <= bound, name
    with pytest.raises(ValueError, match="matmul_dtype"):
        losses.distill_loss(hidden, weight, batch, matmul_dtype=torch.float32)


@CUDA
@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_cuda_bf16_head_losses_and_gradients_match_the_float32_path_within_the_bound(tail):
    hidden, weight, labels, ids, logprobs = (t.cuda() for t in _llm_rows(n=300, d=1024, v=20000))
    kwargs = dict(labels=labels, topk_ids=ids, topk_logprobs=logprobs, tail=tail, chunk_rows=128)
    lowered = losses.lowered_head(weight, torch.bfloat16)
    got = _losses_and_grads(lambda h, w: losses.row_losses(h, w, lowered=lowered, **kwargs), hidden, weight)
    want = _losses_and_grads(lambda h, w: losses.row_losses(h, w, **kwargs), hidden, weight)
    bound = 2 * _logit_error_bound(hidden, weight) + 1e-4
    for a, b in zip(got[:2], want[:2]):
        assert bool(((a.double() - b.double()).abs() <= bound).all())
    for a, b in zip(got[2:], want[2:]):                                      # gradients: within a few bf16 ulps
        assert float((a - b).norm() / b.norm()) < 8 * U_BF16
