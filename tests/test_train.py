"""`kdcache train` on the tiny student: the cache loss against the live teacher, stage freezing, PT/SFT
from LLaVA JSON, reloading RUN/final with transformers, refusals, kill-and-resume and a 2-process
torchrun run equal to a 1-process one (checkpoint files themselves: tests/test_checkpoint.py; precision and
the Gram matrix once per step: tests/test_train_precision.py)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

from kdcache import losses, models, templates
from kdcache.batches import CacheDataset, collate
from kdcache.errors import KdcacheError
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.train import StudentLoss

from train_runs import run_dump, run_train

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"step", "loss", "ce", "kl_response", "kl_visual", "relation", "lr"}


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(checkpoint_dir) -> dict[str, torch.Tensor]:
    return LlavaForConditionalGeneration.from_pretrained(checkpoint_dir).state_dict()


def part_of(name: str) -> str:
    if "vision_tower" in name:
        return "vision"
    return "projector" if "multi_modal_projector" in name else "llm"


def cli(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --- the cache loss


def test_loss_from_cache_equals_loss_against_the_live_teacher(tiny_teacher_dir, tiny_student_dir, toy_dataset,
                                                              tmp_path):
    # The random tiny teacher is almost uniform over its vocabulary: its KL to the student would be ~1e-3, the
    # size of the float16 storage noise. A sharper LM head (x8) makes every term O(0.1-1) and the test telling.
    teacher = models.load_bundle(str(tiny_teacher_dir))
    with torch.no_grad():
        models.lm_head_weight(teacher.model).mul_(8.0)
    models.save_bundle(teacher, tmp_path / "teacher", stages=teacher.stages)
    vocab = int(models.lm_head_weight(teacher.model).shape[0])
    assert vocab == len(teacher.tokenizer) == 600
    data, images = toy_dataset(count=3, text_only=1)
    run_dump(tmp_path / "teacher", data, images, tmp_path / "cache", topk_response=vocab, topk_visual=vocab)

    # from the cache: the trainer's own forward (StudentLoss) on a collated batch of every sample
    student = models.load_bundle(str(tiny_student_dir))
    cfg = TrainConfig(stage="dft", student=str(tiny_student_dir), out=str(tmp_path / "run"),
                      cache=str(tmp_path / "cache"))
    dataset = CacheDataset(tmp_path / "cache", student.image_processor)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=student.tokenizer.pad_token_id)
    assert batch["relation_index"].numel() == 2 and batch["response_index"].shape[0] > 0
    with torch.no_grad():
        cached = StudentLoss(student.model, cfg, dataset.reader.manifest["temperature"], gram=None)(batch)

    # against the live teacher: dense KL over the full logits, relation from Y Yᵀ
    live_teacher = LlavaForConditionalGeneration.from_pretrained(tmp_path / "teacher").eval()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  pixel_values=batch["pixel_values"])
    with torch.no_grad():
        t_logits = live_teacher(**inputs).logits                                            # (B, T, V)
        s_logits = student.model(**inputs).logits                                           # (B, T, V)
    r, v = batch["response_index"], batch["visual_index"]
    live = {
        "ce": F.cross_entropy(s_logits[r[:, 0], r[:, 1]], batch["response_labels"]),
        "kl_response": losses.dense_kl(s_logits[r[:, 0], r[:, 1]], t_logits[r[:, 0], r[:, 1]]).mean(),
        "kl_visual": losses.dense_kl(s_logits[v[:, 0], v[:, 1]], t_logits[v[:, 0], v[:, 1]]).mean(),
    }
    relation = []
    for b, start in zip(batch["relation_index"].tolist(), batch["relation_visual_start"].tolist()):
        y_s, y_t = s_logits[b, start: start + 15], t_logits[b, start: start + 15]           # (L, V)
        relation.append(1 - F.cosine_similarity((y_s @ y_s.T).flatten(), (y_t @ y_t.T).flatten(), dim=0))
    live["relation"] = torch.stack(relation).mean()
    live["loss"] = live["ce"] + live["kl_response"] + live["kl_visual"] + 0.5 * live["relation"]

    assert float(live["kl_response"]) > 0.1 and float(live["kl_visual"]) > 0.1 and float(live["relation"]) > 1e-3
    assert float(cached["ce"]) == pytest.approx(float(live["ce"]), rel=1e-5)
    # float16 log-probs carry ~2^-11 relative error per entry; the measured differences are ~1e-4
    for name in ("kl_response", "kl_visual", "loss"):
        assert float(cached[name]) == pytest.approx(float(live[name]), rel=2e-3), name
    assert float(cached["relation"]) == pytest.approx(float(live["relation"]), abs=1e-4)


# --- stages


@pytest.mark.parametrize("stage, trained", [("dpt", {"projector"}), ("dft", {"projector", "llm"})])
def test_dpt_trains_only_the_projector_dft_also_the_llm_and_neither_the_vision_tower(
        stage, trained, tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path, monkeypatch):
    data, images = toy_dataset(count=4)
    run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=8, topk_visual=8)
    modes = []
    forward = models.final_hidden_states

    def recording(model, *args):           # the LM must be in train() for gradient checkpointing to apply
        modes.append((model.model.language_model.training, model.model.vision_tower.training))
        return forward(model, *args)

    monkeypatch.setattr(models, "final_hidden_states", recording)
    final = run_train(tiny_student_dir, tmp_path / "run", stage=stage, cache=str(tmp_path / "cache"), batch_size=2,
                      global_batch=2, max_steps=2, grad_checkpointing=True)
    assert modes == [(True, False)] * 2
    before, after = weights(tiny_student_dir), weights(final)
    assert before.keys() == after.keys()
    assert {part_of(name) for name in before} == {"vision", "projector", "llm"}
    assert any(name.startswith("lm_head") for name in before)
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == (part_of(name) in trained), f"{stage}: {name} {'changed' if changed else 'unchanged'}"


@pytest.mark.parametrize("stage, template", [("pt", "plain"), ("sft", "qwen2_base")])
def test_pt_and_sft_from_llava_json_write_config_metrics_plot_and_final_student(stage, template, tiny_student_dir,
                                                                               toy_dataset, tmp_path):
    data, images = toy_dataset(count=5, template=template, text_only=1)
    run = tmp_path / "run"
    final = run_train(tiny_student_dir, run, stage=stage, data=str(data), images=str(images), batch_size=2,
                      global_batch=2, max_steps=2)
    assert final == run / "final"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["stage"] == stage and config["data"] == str(data) and config["max_steps"] == 2
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == [1, 2]                         # one line per optimizer step
    for m in metrics:
        assert METRIC_KEYS <= m.keys()
        assert m["kl_response"] == m["kl_visual"] == m["relation"] == 0.0
        assert m["loss"] == m["ce"] and math.isfinite(m["loss"]) and m["loss"] > 0
        assert m["lr"] == pytest.approx(1e-3 if stage == "pt" else 2e-5)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert json.loads((final / "kdcache.json").read_text())["stages"][-1] == stage


def test_final_student_reloads_with_transformers_and_generates(tiny_student_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    final = run_train(tiny_student_dir, tmp_path / "run", stage="sft", data=str(data), images=str(images),
                      batch_size=2, global_batch=2, max_steps=1)
    model = LlavaForConditionalGeneration.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    image_processor = AutoImageProcessor.from_pretrained(final)
    prompt = templates.build_prompt([], "<image>\nWhat color is the shape?", tokenizer, template="qwen2_base",
                                    image_token_id=model.config.image_token_id,
                                    visual_len=models.visual_len_of(model.config), has_image=True)
    pixel_values = image_processor(images=[Image.open(images / "img-000.png").convert("RGB")],
                                   return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                             max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len(prompt) + 4)
    assert out[0, : len(prompt)].tolist() == prompt
    assert isinstance(tokenizer.decode(out[0, len(prompt):]), str)


# --- refusals


def test_train_refuses_a_cache_from_another_tokenizer_naming_both_fingerprints(tiny_teacher_dir, tiny_student_dir,
                                                                               toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    run_dump(tiny_teacher_dir, data, images, tmp_path / "cache", topk_response=4, topk_visual=4)
    other = models.load_bundle(str(tiny_student_dir))
    other.tokenizer.add_tokens(["<zebra>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    models.save_bundle(other, tmp_path / "other-student", stages=other.stages)
    cached = json.loads((tmp_path / "cache" / "manifest.json").read_text())["tokenizer"]["fingerprint"]
    student = models.tokenizer_fingerprint(other.tokenizer)
    assert cached != student
    with pytest.raises(KdcacheError, match="tokenizer fingerprint") as error:
        run_train(tmp_path / "other-student", tmp_path / "run", stage="dpt", cache=str(tmp_path / "cache"))
    assert cached in str(error.value) and student in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage", ["dpt", "dft"])
def test_dpt_and_dft_without_a_cache_are_refused(stage, tiny_student_dir, toy_dataset, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    data, images = toy_dataset(count=1)
    with pytest.raises(KdcacheError, match="pass --cache"):
        TrainConfig(stage=stage, student=str(tiny_student_dir), out=str(tmp_path / "run"), data=str(data))
    result = CliRunner().invoke(app, ["train", "--stage", stage, "--student", str(tiny_student_dir),
                                      "--out", str(tmp_path / "run"), "--data", str(data), "--images", str(images)])
    assert result.exit_code != 0 and "pass --cache" in result.output
    assert not (tmp_path / "run").exists()


# --- checkpoints


def test_resume_without_a_checkpoint_starts_over_without_duplicate_metric_lines(tiny_student_dir, toy_dataset,
                                                                                tmp_path):
    data, images = toy_dataset(count=4, template="plain")
    run = tmp_path / "run"
    run.mkdir()                                    # a run killed at step 3, before its first checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
    run_train(tiny_student_dir, run, stage="pt", data=str(data), images=str(images), batch_size=2, global_batch=2,
              max_steps=2, resume=True)
    assert [(m["step"], m["loss"] != 9.0) for m in read_metrics(run)] == [(1, True), (2, True)]


# --- kill and resume; torchrun


def train_args(student, cache, out, *extra) -> list:
    return ["train", "--stage", "dft", "--student", student, "--cache", cache, "--out", out, "--batch-size", "2",
            "--global-batch", "2", "--lr", "1e-3", "--save-every", "2", "--num-workers", "0", "--device", "cpu",
            "--seed", "3", *extra]


@pytest.mark.slow
def test_killed_and_resumed_run_sees_the_same_samples_and_ends_with_the_same_weights(
        tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=16, text_only=2)                    # 8 optimizer steps of 2 samples
    cache = tmp_path / "cache"
    run_dump(tiny_teacher_dir, data, images, cache, topk_response=8, topk_visual=8)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                       # as in the subprocesses (OMP_NUM_THREADS=1): same arithmetic
    try:                                           # the uninterrupted reference, in-process to save an import
        run_train(tiny_student_dir, whole, stage="dft", cache=str(cache), batch_size=2, global_batch=2, lr=1e-3,
                  save_every=2, seed=3)
    finally:
        torch.set_num_threads(threads)
    proc = cli(*train_args(tiny_student_dir, cache, killed))
    metrics, deadline = killed / "metrics.jsonl", time.time() + 120
    # killed just after step 5's metrics line: it resumes from step 4's checkpoint and must drop that line
    while not (metrics.exists() and metrics.read_text().count("\n") >= 5) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    resumed_from = int(checkpoint.latest_checkpoint(killed).name.removeprefix("step-"))
    kept = metrics.read_text().splitlines()[:resumed_from]
    assert 4 <= resumed_from < 8
    resumed = cli(*train_args(tiny_student_dir, cache, killed, "--resume"))
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    # lines up to the checkpoint are the killed run's own (samples_per_s is timing): the run did not start over
    assert metrics.read_text().splitlines()[:resumed_from] == kept

    expected, got = read_metrics(whole), read_metrics(killed)
    assert [m["step"] for m in got] == list(range(1, 9))
    for a, b in zip(expected, got):                                      # CPU, one thread: bit-identical
        for key in ("loss", "ce", "kl_response", "kl_visual", "relation", "lr", "samples_seen"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    assert len({m["loss"] for m in got}) == 8                            # the steps really differ
    final_whole, final_resumed = load_file(whole / "final" / "model.safetensors"), load_file(
        killed / "final" / "model.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for name, value in final_whole.items():
        assert torch.equal(value, final_resumed[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("sharding, global_batch", [("ddp", 4), ("fsdp", 4), ("ddp", 8)])
def test_two_process_torchrun_run_equals_a_one_process_run_with_the_same_global_batch(
        sharding, global_batch, tiny_teacher_dir, tiny_student_dir, toy_dataset, tmp_path):
    # Per-step metrics are means over ranks of each rank's loss, and DDP averages gradients over ranks. With the
    # default token normalisation a rank's loss is a mean over ITS rows, and the one-process run's a mean of its
    # micro-batches' means; the two group the samples differently (ranks take positions r::2 of the step, micro-
    # batches consecutive pairs), so with unequal row counts they differ (here ~5e-3 in ce). With --loss-norm
    # sample and equal samples per rank (every sample has an image, so the relation term counts each sample too)
    # both are the mean of per-sample means: equal up to float rounding, loss and gradients alike.
    # global batch 8: 2 micro-batches per rank (4 in one process), so the once-per-step Gram meets DDP's no_sync
    data, images = toy_dataset(count=2 * global_batch)                   # 2 optimizer steps
    records = json.loads(data.read_text())
    for i, record in enumerate(records):                                 # answers of 1, 2 or 3 sentences
        record["conversations"][-1]["value"] += " It is a small shape in the middle of the image." * (i % 3)
    data.write_text(json.dumps(records))
    cache = tmp_path / "cache"
    run_dump(tiny_teacher_dir, data, images, cache, topk_response=8, topk_visual=8)
    common = dict(stage="dft", cache=str(cache), batch_size=2, global_batch=global_batch, lr=1e-3, loss_norm="sample")
    run_train(tiny_student_dir, tmp_path / "one", **common)              # 1 process: 2 micro-batches of 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--student", tiny_student_dir, "--out", tmp_path / "two", "--stage", "dft", "--cache", cache,
            "--batch-size", "2", "--global-batch", str(global_batch), "--lr", "1e-3", "--loss-norm", "sample", "--device", "cpu",
            "--num-workers", "0"] + (["--fsdp"] if sharding == "fsdp" else [])
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str({"ddp": 29541, "fsdp": 29542}[sharding] + 10 * (global_batch == 8)),
                          "-m", "kdcache.cli", "train", *map(str, args)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2] and [m["samples_seen"] for m in two] == [global_batch, 2 * global_batch]
    for a, b in zip(one, two):                  # step 2 also checks that the rank-averaged update was the same
        for key in ("loss", "ce", "kl_response", "kl_visual", "relation"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # the same update: the final students agree (FSDP gathers its shards into an ordinary checkpoint)
    a, b = weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")
    assert a.keys() == b.keys()
    for name in a:
        # atol: Adam divides by sqrt(v), so an embedding row with a near-zero gradient turns summation-order
        # rounding into up to ~1e-5 of the 1e-3 step (seen: 1 element of 19200); a wrong update is ~1e-3.
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
def test_fsdp_trains_through_micro_batches_without_images_on_one_rank(tiny_teacher_dir, tiny_student_dir,
                                                                      toy_dataset, tmp_path):
    # With 4 text-only samples out of 8 and batch 1 per rank, some step gives one rank no image: its
    # projector then gets no gradient while the other rank's does, which FSDP's gradient
    # reduce-scatter must still match across ranks.
    data, images = toy_dataset(count=8, text_only=4)
    cache = tmp_path / "cache"
    run_dump(tiny_teacher_dir, data, images, cache, topk_response=8, topk_visual=8)
    args = ["--student", tiny_student_dir, "--out", tmp_path / "two", "--stage", "dft", "--cache", cache,
            "--batch-size", "1", "--global-batch", "2", "--lr", "1e-3", "--device", "cpu", "--num-workers", "0",
            "--fsdp", "--epochs", "2"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29543", "-m", "kdcache.cli", "train", *map(str, args)],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-4000:]
    assert [m["step"] for m in read_metrics(tmp_path / "two")] == list(range(1, 9))
    assert (tmp_path / "two" / "final" / "model.safetensors").is_file()
