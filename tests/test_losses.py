"""kdcache.losses: sparse KL, relation cosine, chunked row losses and the batch loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses, targets

from loss_cases import _batch, _logits, _symmetric, _teacher_topk


# --- sparse KL


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sparse_kl_equals_dense_kl_when_k_is_vocab(tail, temperature):
    student, teacher = _logits(seed=1), _logits(seed=2)
    ids, logprobs = _teacher_topk(teacher, k=12, temperature=temperature)
    sparse = losses.sparse_kl(student, ids, logprobs, temperature=temperature, tail=tail)
    reference = losses.dense_kl(student.double(), teacher.double(), temperature=temperature)
    assert sparse.dtype == torch.float32 and sparse.shape == (6,)
    torch.testing.assert_close(sparse.double(), reference, atol=1e-5, rtol=0)


def test_dense_kl_matches_the_definition_in_float64():
    student, teacher = _logits(seed=1).double(), _logits(seed=2).double()
    p, q = teacher.softmax(-1), student.softmax(-1)
    torch.testing.assert_close(losses.dense_kl(student, teacher), (p * (p.log() - q.log())).sum(-1))


def test_sparse_kl_from_float16_targets_stays_close_to_dense_kl():
    student, teacher = _logits(seed=3), _logits(seed=4)
    ids, logprobs = _teacher_topk(teacher, k=12)
    sparse = losses.sparse_kl(student, ids, logprobs.half())
    torch.testing.assert_close(sparse, losses.dense_kl(student, teacher), atol=5e-3, rtol=0)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_bucket_kl_is_nonnegative(k):
    for seed in range(5):
        student, teacher = _logits(n=20, seed=seed), _logits(n=20, seed=seed + 100)
        ids, logprobs = _teacher_topk(teacher, k=k)
        assert (losses.sparse_kl(student, ids, logprobs) >= -1e-6).all()


def test_bucket_kl_matches_a_hand_computed_example():
    # teacher p = [0.5, 0.3, 0.1, 0.1] keeps the top-2: p_tail = 0.2
    # student q = softmax([2, 0, 1, -1]); q_tail = q_2 + q_3
    ids = torch.tensor([[0, 1]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    student = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    e = [math.exp(x) for x in (2.0, 0.0, 1.0, -1.0)]
    q = [x / sum(e) for x in e]
    expected = 0.5 * math.log(0.5 / q[0]) + 0.3 * math.log(0.3 / q[1]) + 0.2 * math.log(0.2 / (q[2] + q[3]))
    assert losses.sparse_kl(student, ids, logprobs).item() == pytest.approx(expected, rel=1e-5)


def test_renorm_kl_matches_the_renormalised_formula():
    ids = torch.tensor([[0, 1]])
    logprobs = torch.log(torch.tensor([[0.5, 0.3]]))
    student = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    p = [0.5 / 0.8, 0.3 / 0.8]                                   # teacher renormalised over its top-2
    q = [math.exp(2.0) / (math.exp(2.0) + 1.0), 1.0 / (math.exp(2.0) + 1.0)]
    expected = sum(pj * math.log(pj / qj) for pj, qj in zip(p, q))
    assert losses.sparse_kl(student, ids, logprobs, tail="renorm").item() == pytest.approx(expected, rel=1e-5)


def test_bucket_kl_has_no_nan_when_the_student_puts_all_mass_in_the_topk():
    student = torch.tensor([[60.0, 60.0, -60.0, -60.0, -60.0]], requires_grad=True)
    ids = torch.tensor([[0, 1]])
    logprobs = torch.log(torch.tensor([[0.45, 0.45]]))           # teacher tail 0.1
    kl = losses.sparse_kl(student, ids, logprobs)
    kl.sum().backward()
    # q_tail = 3 e^-120 / (2 + 3 e^-120): the tail term is large and finite, not inf
    expected = 0.9 * math.log(0.9) + 0.1 * (math.log(0.1) - (math.log(3.0) - 120.0 - math.log(2.0)))
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    assert kl.item() == pytest.approx(expected, rel=1e-4)


def test_bucket_kl_resolves_a_student_tail_below_float32_resolution():
    student = _logits(n=4, v=30, seed=5)
    student[:, :3] += 30.0                                        # q_tail ~ e^-30, far below float32 eps
    teacher = _logits(n=4, v=30, seed=6)
    ids = torch.arange(3).expand(4, 3)
    logprobs = torch.log_softmax(teacher.double(), -1)[:, :3]
    q = torch.log_softmax(student.double(), -1)
    p_tail = 1 - logprobs.exp().sum(-1)
    q_tail = torch.logsumexp(q[:, 3:], -1)
    reference = (logprobs.exp() * (logprobs - q[:, :3])).sum(-1) + p_tail * (p_tail.log() - q_tail)
    torch.testing.assert_close(losses.sparse_kl(student, ids, logprobs.float()).double(), reference,
                               rtol=1e-5, atol=1e-5)


def test_bucket_kl_has_no_nan_when_the_teacher_tail_is_zero_or_rounds_negative():
    student = _logits(n=3, v=6, seed=7).requires_grad_()
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 2, 4]])
    logprobs = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.3, 0.1], [0.5, 0.3, 0.2]])).half()
    logprobs[2] += 0.001                                          # float16 rounding: sum p > 1
    kl = losses.sparse_kl(student, ids, logprobs)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    q = torch.log_softmax(student.detach(), -1)
    expected0 = 0.5 * (math.log(0.5) - q[0, 0]) + 0.5 * (math.log(0.5) - q[0, 1])   # p = 0 entry adds nothing
    assert kl[0].item() == pytest.approx(expected0.item(), rel=1e-3)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_sparse_kl_treats_float16_underflow_to_minus_inf_as_zero_probability(tail):
    student = _logits(n=1, v=6, seed=11).requires_grad_()
    ids = torch.tensor([[0, 1, 2]])
    logprobs = torch.tensor([[-0.1, -2.5, float("-inf")]], dtype=torch.float16)
    kl = losses.sparse_kl(student, ids, logprobs, tail=tail)
    kl.sum().backward()
    limit = logprobs.float().clamp_min(-1e4)                             # p_2 = e^-10000: the same KL as p_2 -> 0
    reference = losses.sparse_kl(student.detach(), ids, limit, tail=tail)
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(kl.detach(), reference)


def test_sparse_kl_refuses_an_unknown_tail():
    with pytest.raises(ValueError, match="tail"):
        losses.sparse_kl(_logits(), torch.zeros(6, 1, dtype=torch.long), torch.zeros(6, 1), tail="drop")


# --- relation


def test_relation_loss_equals_one_minus_cosine_of_full_matrices():
    student = torch.stack([_symmetric(5, 0), _symmetric(5, 1)])
    teacher = torch.stack([_symmetric(5, 2), _symmetric(5, 3)])
    loss = losses.relation_loss(student, targets.pack_upper(teacher))
    full = 1 - F.cosine_similarity(student.double().flatten(1), teacher.double().flatten(1), dim=-1)
    packed_unweighted = 1 - F.cosine_similarity(targets.pack_upper(student), targets.pack_upper(teacher), dim=-1)
    assert loss.shape == (2,)
    torch.testing.assert_close(loss.double(), full, atol=1e-6, rtol=0)
    assert not torch.allclose(loss, packed_unweighted, atol=1e-4)   # off-diagonals must count twice


def test_relation_loss_is_zero_for_proportional_matrices_at_raw_gram_scale():
    teacher = _symmetric(6, 4)
    student = (teacher * 1e30).unsqueeze(0)                        # squares overflow float32 unless rescaled
    loss = losses.relation_loss(student, targets.pack_upper(teacher / teacher.norm()).half().unsqueeze(0))
    assert torch.isfinite(loss).all() and loss.item() == pytest.approx(0.0, abs=1e-3)


def test_relation_loss_gradient_is_finite_and_reaches_the_student():
    student = _symmetric(4, 5).unsqueeze(0).requires_grad_()
    losses.relation_loss(student, targets.pack_upper(_symmetric(4, 6)).unsqueeze(0)).sum().backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_relation_loss_of_no_samples_is_empty():
    assert losses.relation_loss(torch.zeros(0, 3, 3), torch.zeros(0, 6)).shape == (0,)


def test_student_relation_equals_the_visual_logit_gram_matrix():
    gen = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(40, 8, generator=gen)
    relation = losses.student_relation(hidden, targets.gram_matrix(weight))
    logits = hidden.double() @ weight.double().T                   # (S, L, V)
    torch.testing.assert_close(relation.double(), logits @ logits.transpose(1, 2), rtol=1e-5, atol=1e-3)


# --- chunked row losses


def _rows(n=13, d=8, v=20, k=4, seed=9):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * 0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    ids, logprobs = _teacher_topk(torch.randn(n, v, generator=gen) * 2, k=k)
    return hidden, weight, labels, ids, logprobs


def _row_losses_and_grads(hidden, weight, labels, ids, logprobs, chunk_rows, tail="bucket"):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce, kl = losses.row_losses(hidden, weight, labels=labels, topk_ids=ids, topk_logprobs=logprobs,
                               temperature=1.5, tail=tail, chunk_rows=chunk_rows)
    (ce.sum() + 2 * kl.sum()).backward()
    return ce.detach(), kl.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_row_losses_chunked_equal_unchunked_in_values_and_gradients(tail):
    rows = _rows()
    chunked = _row_losses_and_grads(*rows, chunk_rows=3, tail=tail)
    whole = _row_losses_and_grads(*rows, chunk_rows=1000, tail=tail)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_row_losses_equal_direct_cross_entropy_and_sparse_kl():
    hidden, weight, labels, ids, logprobs = _rows()
    ce, kl = losses.row_losses(hidden, weight, labels=labels, topk_ids=ids, topk_logprobs=logprobs, chunk_rows=4)
    logits = hidden @ weight.T
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels, reduction="none"))
    torch.testing.assert_close(kl, losses.sparse_kl(logits, ids, logprobs))


def test_row_losses_never_save_a_full_logit_matrix_for_backward():
    hidden, weight, labels, ids, logprobs = _rows(n=64, d=8, v=97)
    hidden.requires_grad_()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = hidden @ weight.T                                    # positive control: the hook sees (N, V)
        F.cross_entropy(logits, labels)
    assert max(saved) >= 64 * 97
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ce, kl = losses.row_losses(hidden, weight, labels=labels, topk_ids=ids, topk_logprobs=logprobs,
                                   chunk_rows=8)
    assert max(saved, default=0) < 8 * 97 * 2                          # at most chunk-sized tensors
    (ce.sum() + kl.sum()).backward()                                   # recomputed chunk by chunk
    assert torch.isfinite(hidden.grad).all()


def test_row_losses_of_no_rows_are_empty_but_attached_to_the_graph():
    hidden, weight, labels, ids, logprobs = _rows()
    hidden.requires_grad_()
    ce, kl = losses.row_losses(hidden[:0], weight, labels=labels[:0], topk_ids=ids[:0], topk_logprobs=logprobs[:0])
    assert ce.shape == (0,) and kl.shape == (0,)
    (ce.sum() + kl.sum()).backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))


def test_row_losses_return_none_for_what_was_not_asked():
    hidden, weight, labels, ids, logprobs = _rows()
    assert losses.row_losses(hidden, weight) == (None, None)
    ce, kl = losses.row_losses(hidden, weight, labels=labels)
    assert ce.shape == (13,) and kl is None
    with pytest.raises(ValueError, match="together"):
        losses.row_losses(hidden, weight, topk_ids=ids)


# --- the batch loss


def _per_row(hidden, weight, batch):
    """Per-row CE, response KL and visual KL computed directly, without row_losses."""
    r, v = batch["response_index"], batch["visual_index"]
    r_logits, v_logits = hidden[r[:, 0], r[:, 1]] @ weight.T, hidden[v[:, 0], v[:, 1]] @ weight.T
    ce = F.cross_entropy(r_logits, batch["response_labels"], reduction="none")
    kl_r = losses.sparse_kl(r_logits, batch["response_topk_ids"], batch["response_topk_logprobs"])
    kl_v = losses.sparse_kl(v_logits, batch["visual_topk_ids"], batch["visual_topk_logprobs"])
    return ce, kl_r, kl_v


def test_distill_loss_token_norm_averages_over_all_rows_of_the_batch():
    hidden, weight, batch = _batch()
    out = losses.distill_loss(hidden, weight, batch, loss_norm="token", chunk_rows=2)
    ce, kl_r, kl_v = _per_row(hidden, weight, batch)
    torch.testing.assert_close(out["ce"], ce.mean())
    torch.testing.assert_close(out["kl_response"], kl_r.mean())
    torch.testing.assert_close(out["kl_visual"], kl_v.mean())


def test_distill_loss_sample_norm_averages_per_sample_means():
    hidden, weight, batch = _batch()
    out = losses.distill_loss(hidden, weight, batch, loss_norm="sample", chunk_rows=2)
    ce, kl_r, kl_v = _per_row(hidden, weight, batch)
    torch.testing.assert_close(out["ce"], (ce[:3].mean() + ce[3]) / 2)
    torch.testing.assert_close(out["kl_response"], (kl_r[:3].mean() + kl_r[3]) / 2)
    torch.testing.assert_close(out["kl_visual"], kl_v.mean())          # sample 1 has no visual rows
    assert not torch.allclose(out["ce"], ce.mean())


def test_distill_loss_relation_compares_each_samples_visual_span():
    hidden, weight, batch = _batch()
    out = losses.distill_loss(hidden, weight, batch)
    logits = hidden[0, 1:4].double() @ weight.double().T              # Y of sample 0's image tokens
    teacher = targets.unpack_upper(batch["relation_upper"][0].double(), 3)
    expected = 1 - F.cosine_similarity((logits @ logits.T).flatten(), teacher.flatten(), dim=0)
    assert out["relation"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_distill_loss_total_is_the_weighted_sum_of_its_terms():
    hidden, weight, batch = _batch()
    out = losses.distill_loss(hidden, weight, batch, alpha=0.7, beta=0.3, gamma=2.0)
    expected = out["ce"] + 0.7 * out["kl_response"] + 0.3 * out["kl_visual"] + 2.0 * out["relation"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    assert all(out[name].item() > 0 for name in ("ce", "kl_response", "kl_visual", "relation"))


def test_distill_loss_does_not_compute_terms_whose_weight_is_zero():
    hidden, weight, batch = _batch()
    for key in ("response_topk_ids", "visual_topk_ids"):
        batch[key] = torch.full_like(batch[key], 10**6)                 # would fail if gathered
    batch["relation_upper"] = torch.zeros(1, 7)                         # would fail if unpacked
    out = losses.distill_loss(hidden, weight, batch, alpha=0.0, beta=0.0, gamma=0.0)
    assert out["kl_response"].item() == out["kl_visual"].item() == out["relation"].item() == 0.0
    torch.testing.assert_close(out["loss"], out["ce"])


def test_distill_loss_of_a_ce_only_batch_computes_only_ce():
    hidden, weight, batch = _batch()
    batch = {key: batch[key] for key in ("input_ids", "attention_mask", "sample_id", "response_index",
                                          "response_labels")}
    out = losses.distill_loss(hidden, weight, batch)
    ce, _, _ = _per_row(hidden, weight, _batch()[2])
    torch.testing.assert_close(out["loss"], ce.mean())
    assert out["kl_response"].item() == out["kl_visual"].item() == out["relation"].item() == 0.0


@pytest.mark.parametrize("loss_norm", ["token", "sample"])
def test_distill_loss_over_an_empty_visual_set_is_zero_not_nan(loss_norm):
    hidden, weight, batch = _batch(visual=False)
    hidden.requires_grad_()
    out = losses.distill_loss(hidden, weight, batch, loss_norm=loss_norm)
    assert out["kl_visual"].item() == 0.0 and out["relation"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert torch.isfinite(hidden.grad).all()


def test_distill_loss_gradient_flows_to_hidden_and_lm_head():
    hidden, weight, batch = _batch()
    hidden.requires_grad_(), weight.requires_grad_()
    out = losses.distill_loss(hidden, weight, batch, chunk_rows=2)
    assert out["loss"].requires_grad and not out["ce"].requires_grad
    out["loss"].backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    assert hidden.grad[0, 1:7].abs().sum(-1).gt(0).all()                # visual and response rows
    assert hidden.grad[1, 3].abs().sum() > 0 and hidden.grad[1, 4:].abs().sum() == 0
    assert weight.grad.abs().sum() > 0


def test_distill_loss_relation_reaches_the_lm_head_unless_a_frozen_gram_is_passed():
    hidden, weight, batch = _batch()

    def lm_head_grad(**kwargs):
        w = weight.clone().requires_grad_()
        out = losses.distill_loss(hidden, w, batch, alpha=0.0, beta=0.0, **kwargs)
        out["loss"].backward()
        return out["relation"], w.grad

    relation_live, grad_live = lm_head_grad(gamma=1.0)
    relation_frozen, grad_frozen = lm_head_grad(gamma=1.0, gram=targets.gram_matrix(weight))
    _, grad_ce_only = lm_head_grad(gamma=0.0)
    torch.testing.assert_close(relation_frozen, relation_live)
    torch.testing.assert_close(grad_frozen, grad_ce_only)                 # frozen gram: only CE reaches W
    assert not torch.allclose(grad_live, grad_ce_only)                   # live gram: the relation does too


def test_distill_loss_accepts_bf16_hidden_states():
    hidden, weight, batch = _batch()
    out = losses.distill_loss(hidden.bfloat16(), weight.bfloat16(), batch)
    reference = losses.distill_loss(hidden.bfloat16().float(), weight.bfloat16().float(), batch)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"], reference["loss"], atol=1e-4, rtol=1e-4)


def test_distill_loss_refuses_an_unknown_loss_norm():
    hidden, weight, batch = _batch()
    with pytest.raises(ValueError, match="loss_norm"):
        losses.distill_loss(hidden, weight, batch, loss_norm="batch")
