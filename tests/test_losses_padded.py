"""kdcache.losses with a teacher head padded past the student's vocabulary (issue 14): cached ids >= V are
dropped and their mass goes to the tail, as a dense float64 reference says, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from kdcache import losses

from loss_cases import _logits, _losses_and_grads


# --- a teacher head padded past the student's (issue 14): ids >= V are dropped, their mass goes to the tail

V_S, PAD = 24, 8           # student vocabulary, teacher padding rows (teacher head V_S + PAD)


def _padded_teacher(n=7, k=6, pads=2, seed=20):
    """A dense teacher over V_S + PAD ids (padding rows get ~e^-12 each) and its cached top-k.

    Each row's top-k is its best `k - pads` real ids plus `pads` padding ids (a real top-k would
    hardly ever hold one; here every row does, at varying positions). The last row holds padding
    ids only. Returns (teacher log-probs (n, V_S + PAD) float64, ids (n, k), logprobs (n, k) float32).
    """
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V_S + PAD, generator=gen, dtype=torch.float64) * 2
    logits[:, V_S:] = -12.0 + torch.randn(n, PAD, generator=gen, dtype=torch.float64)
    log_p = torch.log_softmax(logits, dim=-1)
    real = log_p[:, :V_S].topk(k - pads, dim=-1).indices
    padding = V_S + torch.stack([torch.randperm(PAD, generator=gen)[:pads] for _ in range(n)])
    ids = torch.cat([real, padding], dim=1)
    ids = ids.gather(1, torch.stack([torch.randperm(k, generator=gen) for _ in range(n)]))   # mix the positions
    ids[-1] = V_S + torch.randperm(PAD, generator=gen)[:k]                                # nothing to keep
    return log_p, ids, log_p.gather(1, ids).float()


def _folded_reference(student_logits, teacher_log_p, ids, tail):
    """Dense float64 KL over the kept ids + one tail outcome (all teacher mass elsewhere, padding included)."""
    log_q = torch.log_softmax(student_logits.double(), dim=-1)                  # (n, V_S)
    kept = ids < V_S
    p = teacher_log_p.exp().gather(1, ids) * kept                               # (n, k), 0 where dropped
    q = log_q.exp().gather(1, ids.clamp(max=V_S - 1)) * kept
    if tail == "renorm":
        p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
        kl = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(1)
    else:
        p_tail, q_tail = 1 - p.sum(1), 1 - q.sum(1)
        kl = torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(1) + p_tail * (p_tail.log() - q_tail.log())
    return torch.where(kept.any(1), kl, 0.0)                                    # no kept id: nothing to compare


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_sparse_kl_folds_ids_past_the_student_vocabulary_into_the_tail_as_a_dense_reference(tail):
    teacher_log_p, ids, logprobs = _padded_teacher()
    student = _logits(n=7, v=V_S, seed=21).requires_grad_()
    kl = losses.sparse_kl(student, ids, logprobs, tail=tail)
    reference = _folded_reference(student.detach(), teacher_log_p, ids, tail)
    torch.testing.assert_close(kl.double(), reference, atol=2e-6, rtol=1e-5)
    assert kl[-1].item() == 0.0 and (kl[:-1] > 0).all()
    kl.sum().backward()
    assert torch.isfinite(student.grad).all() and torch.equal(student.grad[-1], torch.zeros(V_S))


def test_a_padding_id_without_mass_leaves_the_kl_unchanged():
    teacher_log_p, ids, logprobs = _padded_teacher(pads=0)
    student = _logits(n=7, v=V_S, seed=22)
    real = losses.sparse_kl(student[:-1], ids[:-1], logprobs[:-1])
    with_padding = torch.cat([ids[:-1], torch.full((6, 1), V_S + 3)], 1), F.pad(logprobs[:-1], (0, 1), value=-1e4)
    torch.testing.assert_close(losses.sparse_kl(student[:-1], *with_padding), real)


@pytest.mark.parametrize("tail", ["bucket", "renorm"])
def test_row_losses_fold_padding_ids_as_the_dense_reference_with_the_gradients_of_autograd(tail):
    """bucket runs the hand-written `_BucketRows`, renorm the checkpointed path; both against plain autograd."""
    teacher_log_p, ids, logprobs = _padded_teacher()
    gen = torch.Generator().manual_seed(23)
    hidden, weight = torch.randn(7, 8, generator=gen), torch.randn(V_S, 8, generator=gen)
    labels = torch.randint(0, V_S, (7,), generator=gen)
    chunked = _losses_and_grads(lambda h, w: losses.row_losses(h, w, labels=labels, topk_ids=ids, tail=tail,
                                                               topk_logprobs=logprobs, chunk_rows=3), hidden, weight)
    direct = _losses_and_grads(lambda h, w: (F.cross_entropy(h @ w.T, labels, reduction="none"),
                                             losses.sparse_kl(h @ w.T, ids, logprobs, tail=tail)), hidden, weight)
    for a, b in zip(chunked, direct):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    reference = _folded_reference(hidden.double() @ weight.double().T, teacher_log_p, ids, tail)
    torch.testing.assert_close(chunked[1].double(), reference, atol=2e-6, rtol=1e-5)


def test_the_hand_written_backward_passes_gradcheck_with_padding_ids():
    _, ids, logprobs = _padded_teacher(n=5, k=4, pads=1, seed=24)
    gen = torch.Generator().manual_seed(25)
    hidden = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V_S, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V_S, (5,), generator=gen)
    assert torch.autograd.gradcheck(lambda h, w: losses.row_losses(h, w, labels=labels, topk_ids=ids, chunk_rows=2,
                                                                   topk_logprobs=logprobs.double()), (hidden, weight))


def test_row_losses_with_k_past_the_student_vocabulary_keep_every_real_id_and_no_tail():
    teacher_log_p, _, _ = _padded_teacher()
    logprobs, ids = teacher_log_p.topk(V_S + 2, dim=-1)                      # every real id and 2 padding ids
    assert ((ids < V_S).sum(1) == V_S).all()
    gen = torch.Generator().manual_seed(26)
    hidden, weight = torch.randn(7, 8, generator=gen, requires_grad=True), torch.randn(V_S, 8, generator=gen)
    _, kl = losses.row_losses(hidden, weight, topk_ids=ids, topk_logprobs=logprobs.float())
    kl.sum().backward()
    log_q = torch.log_softmax(hidden.detach().double() @ weight.double().T, dim=-1)
    p = teacher_log_p[:, :V_S].exp()                                         # the student has no tail outcome left
    torch.testing.assert_close(kl.double(), (p * (p.log() - log_q)).sum(1), atol=2e-6, rtol=1e-5)
    assert torch.isfinite(hidden.grad).all()
