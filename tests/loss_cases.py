"""Shared inputs of the loss tests (test_losses.py, test_losses_bf16.py, test_losses_padded.py): random
logits, a teacher's top-k as the dump stores it, a two-sample batch with response, visual and relation
targets."""

import torch

from kdcache import targets


def _logits(n=6, v=12, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen) * scale


def _teacher_topk(teacher_logits, k, temperature=1.0):
    """Top-k of a dense teacher as the dump stores it (float32 here)."""
    logprobs, ids = torch.log_softmax(teacher_logits.double() / temperature, dim=-1).topk(k, dim=-1)
    return ids, logprobs.float()


def _symmetric(n, seed):
    x = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    return x @ x.T


def _batch(seed=10, k=4, v=20, d=8, visual=True):
    """Two samples of 8 positions: sample 0 has 3 response rows and a 3-token image at 1; sample 1 has 1 row."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 8, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * 0.5
    input_ids = torch.randint(0, v, (2, 8), generator=gen)
    response_index = torch.tensor([[0, 4], [0, 5], [0, 6], [1, 3]])
    batch = {
        "input_ids": input_ids, "attention_mask": torch.ones(2, 8, dtype=torch.long), "sample_id": ["a", "b"],
        "response_index": response_index, "response_labels": input_ids[response_index[:, 0], response_index[:, 1] + 1],
    }
    r_ids, r_logprobs = _teacher_topk(torch.randn(4, v, generator=gen) * 2, k=k)
    v_index = torch.tensor([[0, 1], [0, 2], [0, 3]]) if visual else torch.zeros(0, 2, dtype=torch.long)
    v_ids, v_logprobs = _teacher_topk(torch.randn(v_index.shape[0], v, generator=gen) * 2, k=k)
    teacher_relation = _symmetric(3, seed)
    batch.update({
        "response_topk_ids": r_ids, "response_topk_logprobs": r_logprobs,
        "visual_index": v_index, "visual_topk_ids": v_ids, "visual_topk_logprobs": v_logprobs,
        "relation_index": torch.tensor([0] if visual else [], dtype=torch.long),
        "relation_visual_start": torch.tensor([1] if visual else [], dtype=torch.long),
        "relation_upper": targets.pack_upper(teacher_relation / teacher_relation.norm()).unsqueeze(0)[: int(visual)],
    })
    return hidden, weight, batch


def _losses_and_grads(fn, hidden, weight):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce, kl = fn(hidden, weight)
    (ce.sum() + 2 * kl.sum()).backward()
    return ce.detach(), kl.detach(), hidden.grad, weight.grad
