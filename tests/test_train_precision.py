"""kdcache train's precision (--dtype: autocast dtype, float32 weights and optimizer state; the LM head's bf16
GEMM only on CUDA) and the relation's Gram matrix computed once per optimizer step."""

from __future__ import annotations

import copy
import dataclasses
import unittest.mock

import pytest
import torch
from safetensors.torch import load_file

from kdcache import losses, models, targets
from kdcache.batches import CacheDataset, collate
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.train import StudentLoss, lm_head_matmul_dtype, set_trainable

from train_runs import run_dump, run_train


# --- precision (--dtype) and the Gram matrix once per optimizer step


def _micro_batches(tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path):
    """A tiny dft cache and three micro-batches of it: two with images, the last text-only (no relation)."""
    data, images = toy_dataset(count=5, text_only=1)
    run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=8, topk_visual=8)
    student = models.load_bundle(str(tiny_student_dir))
    dataset = CacheDataset(tmp_path / "cache", student.image_processor)
    order = sorted(range(len(dataset)), key=lambda i: dataset[i]["sample_id"])      # sample-0..3, then text-4
    groups = [order[0:2], order[2:4], order[4:5]]
    micro = [collate([dataset[i] for i in group], pad_id=student.tokenizer.pad_token_id) for group in groups]
    assert [b["relation_index"].numel() for b in micro] == [2, 2, 0]
    return student, dataset.reader.manifest["temperature"], micro


def _accumulate(student, temperatures, micro, cfg, *, per_step: bool):
    """One optimizer step's backward over `micro` (loss / count each) -> (losses, gradients, G backward calls)."""
    model = copy.deepcopy(student.model)
    set_trainable(model, cfg.trainable)
    model.train()
    loss_module = StudentLoss(model, cfg, temperatures, gram=None)
    calls = []
    original = targets.gram_weight_grad
    with unittest.mock.patch.object(targets, "gram_weight_grad", lambda *a, **k: calls.append(1) or original(*a, **k)), \
            unittest.mock.patch.object(losses, "gram_weight_grad", lambda *a, **k: calls.append(1) or original(*a, **k)):
        values = []
        for i, batch in enumerate(micro):
            if per_step:
                loss_module.start_micro_batch(i, len(micro))
            out = loss_module(batch)
            (out["loss"] / len(micro)).backward()
            values.append({k: float(v.detach()) for k, v in out.items()})
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return values, grads, len(calls)


def test_the_gram_matrix_once_per_step_gives_the_per_micro_batch_losses_and_gradients(
        tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path):
    student, temperatures, micro = _micro_batches(tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path)
    cfg = TrainConfig(stage="dft", student=str(tiny_student_dir), out=str(tmp_path / "run"), cache=str(tmp_path / "c"))
    per_micro = _accumulate(student, temperatures, micro, cfg, per_step=False)
    per_step = _accumulate(student, temperatures, micro, cfg, per_step=True)
    assert per_micro[2] == 2 and per_step[2] == 1                  # W (dG + dGᵀ): per relation micro-batch vs once
    assert per_step[0] == per_micro[0]                              # the same forward, bit for bit
    assert per_step[1].keys() == per_micro[1].keys()
    for name, grad in per_micro[1].items():                         # the same gradient up to float32 summation order
        torch.testing.assert_close(per_step[1][name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()))
    # the relation's W-gradient is far above that tolerance: dropping or doubling it would fail the comparison
    no_relation = _accumulate(student, temperatures, micro, dataclasses.replace(cfg, gamma=0.0), per_step=False)
    head = next(name for name in per_micro[1] if "embed_tokens" in name or "lm_head" in name)
    assert float((per_micro[1][head] - no_relation[1][head]).abs().max()) > 1e-3 * float(per_micro[1][head].abs().max())


@pytest.mark.parametrize("dtype, autocast", [("auto", None), ("float32", None), ("fp32", None), ("bf16", torch.bfloat16),
                                             ("bfloat16", torch.bfloat16)])
def test_train_dtype_sets_the_autocast_dtype_and_keeps_float32_weights_and_optimizer_state(
        dtype, autocast, tiny_student_dir, toy_dataset, tmp_path, monkeypatch):
    data, images = toy_dataset(count=2)
    seen, forward = [], models.final_hidden_states

    def recording(model, *args):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return forward(model, *args)

    monkeypatch.setattr(models, "final_hidden_states", recording)
    final = run_train(tiny_student_dir, tmp_path / "run", stage="sft", data=str(data), images=str(images),
                      batch_size=2, global_batch=2, max_steps=1, dtype=dtype)
    assert seen == [autocast]
    assert {t.dtype for t in load_file(final / "model.safetensors").values()} == {torch.float32}
    step = checkpoint.latest_checkpoint(tmp_path / "run")
    state = load_file(step / "optimizer.safetensors")
    assert state and {t.dtype for t in state.values()} == {torch.float32}


def test_the_lm_head_gemm_takes_bf16_operands_only_on_cuda_in_bf16():
    assert lm_head_matmul_dtype(torch.device("cuda", 0), torch.bfloat16) == torch.bfloat16
    assert lm_head_matmul_dtype(torch.device("cuda", 0), torch.float32) is None
    assert lm_head_matmul_dtype(torch.device("cpu"), torch.bfloat16) is None      # the CPU path stays float32
    assert lm_head_matmul_dtype(torch.device("cpu"), torch.float32) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_step_losses_match_the_float32_run(tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path):
    student, temperatures, micro = _micro_batches(tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path)
    student.model.cuda()
    micro = [{k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in micro]
    cfg = TrainConfig(stage="dft", student=str(tiny_student_dir), out=str(tmp_path / "run"), cache=str(tmp_path / "c"))
    bf16 = _accumulate(student, temperatures, micro, dataclasses.replace(cfg, dtype="bf16"), per_step=True)
    fp32 = _accumulate(student, temperatures, micro, dataclasses.replace(cfg, dtype="float32"), per_step=True)
    for got, want in zip(bf16[0], fp32[0]):
        for name in ("ce", "kl_response", "kl_visual", "relation"):
            assert got[name] == pytest.approx(want[name], rel=3e-2, abs=1e-3), name
