"""Part 1 of benchmarks/bench_gpu.py: dump and train fidelity on the device, with the tests' tiny models.

`--dtype float32` and `--dtype bfloat16` dumps against a float64 CPU forward of the same teacher (top-k
log-probs at the stored ids, top-k agreement, relation cosine and norm), and `kdcache train --stage dft`
step 1's loss components on the device (float32, bf16) against the CPU run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from kdcache import models, samples, targets
from kdcache.reader import CacheReader
from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump import dump
from teacher_dump.config import DumpConfig


def tiny_checkpoints(work: Path) -> tuple[Path, Path]:
    """The tests' tiny teacher (head rescaled to logits of std 3) and student, saved as trained checkpoints."""
    dirs = []
    for role, seed, std in (("teacher", 11, common.TEACHER_LOGIT_STD), ("student", 12, None)):
        bundle = common.build_bundle(common.TINY[role], seed=seed, source=f"tiny-{role}", logit_std=std,
                                     vision=common.TINY["vision"])
        models.save_bundle(bundle, work / f"tiny-{role}", stages=["pt", "sft"])
        dirs.append(work / f"tiny-{role}")
    return dirs[0], dirs[1]


def against_float64(cache: Path, teacher_dir: Path) -> dict:
    """The worst disagreement of a cache with a float64 CPU forward of its teacher over the same samples."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    processor = models.load_bundle(str(teacher_dir)).image_processor
    worst = {"logprob_abs_err": 0.0, "topk_agreement": 1.0, "relation_cos_min": 1.0, "relation_norm_rel_err": 0.0}
    for sample in CacheReader(cache, verify=True):
        pixels = None
        if sample["image"] is not None:
            pixels = samples.pixel_values([Image.open(io.BytesIO(sample["image"])).convert("RGB")], processor).double()
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(sample["input_ids"].astype(np.int64))[None],
                           pixel_values=pixels).logits[0]                                       # (T, V) float64
        worst = merge_worst(worst, sample_errors(sample, torch.log_softmax(logits, -1), logits))
    return worst


def sample_errors(sample: dict, logprobs: torch.Tensor, logits: torch.Tensor) -> dict:
    """One sample's errors: stored log-probs vs the reference at the stored ids, top-k set agreement, relation."""
    vs, vl = sample["visual_start"], sample["visual_len"]
    errors = {"logprob_abs_err": 0.0, "topk_agreement": 1.0}
    for role, rows in (("response", sample["response_rows"]), ("visual", np.arange(vs, vs + vl))):
        ids = torch.from_numpy(sample[f"{role}_topk_ids"].astype(np.int64))                 # (R, K)
        if ids.numel() == 0:
            continue
        ref = logprobs[torch.from_numpy(np.asarray(rows, dtype=np.int64))]                  # (R, V)
        stored = torch.from_numpy(sample[f"{role}_topk_logprobs"].astype(np.float64))
        errors["logprob_abs_err"] = max(errors["logprob_abs_err"], float((stored - ref.gather(1, ids)).abs().max()))
        ref_ids = ref.topk(ids.shape[1], dim=-1).indices
        agree = (ids[:, :, None] == ref_ids[:, None, :]).any(-1).double().mean()
        errors["topk_agreement"] = min(errors["topk_agreement"], float(agree))
    if sample["relation"] is not None:
        y = logits[vs: vs + vl]
        exact = y @ y.T
        restored = targets.unpack_upper(torch.from_numpy(sample["relation"].astype(np.float64)), vl)
        errors["relation_cos_min"] = float(torch.nn.functional.cosine_similarity(restored.flatten(), exact.flatten(), 0))
        errors["relation_norm_rel_err"] = abs(sample["relation_norm"] / float(exact.norm()) - 1)
    return errors


def merge_worst(worst: dict, errors: dict) -> dict:
    lower_is_worse = ("topk_agreement", "relation_cos_min")
    return {k: (min if k in lower_is_worse else max)(v, errors.get(k, v)) for k, v in worst.items()}


def dft_step_one(student_dir: Path, cache: Path, device: torch.device, work: Path) -> dict:
    """`kdcache train --stage dft` step 1's loss components on the device (float32, bf16) against the CPU run."""
    runs = {"cpu": ("cpu", "float32")}
    if device.type == "cuda":
        runs.update({"device_float32": (str(device), "float32"), "device_bf16": (str(device), "bf16")})
    components = {}
    for name, (where, dtype) in runs.items():
        out = work / f"fid-run-{name}"
        train(TrainConfig(stage="dft", student=str(student_dir), cache=str(cache), out=str(out), batch_size=3,
                          global_batch=3, max_steps=1, num_workers=0, device=where, dtype=dtype, progress=False,
                          seed=0))
        line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        components[name] = {k: line[k] for k in ("loss", "ce", "kl_response", "kl_visual", "relation")}
    result = {"components": components}
    for name in components.keys() - {"cpu"}:
        result[f"{name}_max_rel_diff_vs_cpu"] = max(
            abs(components[name][k] - v) / max(abs(v), 1e-6) for k, v in components["cpu"].items())
    return result


def part_fidelity(args, device: torch.device, work: Path) -> dict:
    teacher_dir, student_dir = tiny_checkpoints(work)
    data = common.make_dataset(work / "fid-data", 6, answer_words=12)
    result = {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
              "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for dtype in ("float32", "bfloat16"):
        cache = work / f"fid-cache-{dtype}"
        dump.dump(DumpConfig(teacher=str(teacher_dir), data=str(data), images=str(data.parent / "images"),
                             out=str(cache), device=str(device), dtype=dtype, topk_response=16, topk_visual=16,
                             batch_size=3, progress=False))
        result[f"dump_{dtype}_vs_float64"] = against_float64(cache, teacher_dir)
    result["dft_step1"] = dft_step_one(student_dir, work / "fid-cache-float32", device, work)
    return result
