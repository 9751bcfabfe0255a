"""GPU benchmark (issue 12): the overlapped dump, the tensor-core LM head and the student step, at real shapes.

ONE unattended command, sized for at most 8 minutes on one H100/H200 (about 4 expected):

    python benchmarks/bench_gpu.py --json gpu.json           # a CUDA machine: real shapes
    python benchmarks/bench_gpu.py --tiny --json tiny.json   # the whole script on the CPU, toy-sized (< 1 minute)

Real shapes: a Qwen1.5-4B-shaped teacher (V = 151,936, D = 2,560, 40 layers; head rescaled to logits of
std 3 as benchmarks/common.py does) and a Qwen1.5-0.5B-shaped student, each with a SigLIP-so400m-shaped
tower (384 px, patch 14: 728 visual tokens), random weights created directly on the GPU (teacher bf16,
student float32 master weights); synthetic LLaVA-shaped samples (728 visual + ~200 response rows, a
~64 kB JPEG each). Parts, in order:

1. fidelity (benchmarks/gpu_fidelity.py; the tests' tiny models, on the device): `--dtype float32` and
   `--dtype bfloat16` dumps against a float64 CPU reference (top-k log-probs at the stored ids, top-k
   agreement, relation cosine and norm); `kdcache train --stage dft` step-1 loss components on the device
   (float32, bf16) against the CPU run.
2. head_gemm: top-k through the tensor-core route (bf16 operands, float32 accumulation) against today's
   float32 route (a float32 copy of W per call) on the same inputs, time and agreement (within float16
   storage rounding?); the student's LM-head losses forward + backward, bf16 operands against float32.
3. dump: samples/s of `dump_records` (the real dump code, its three threads) against a bare
   `model(**batch)` on the same prepared inputs (`dump_over_forward`, wall), per-thread busy/wait times
   and a sequential breakdown of one batch (forward, top-k, relations), median of --rounds.
4. student_steps: s/step and peak GiB of sft, ce_same_rows, dft (the trainer's StudentLoss on the cache of
   part 3) and online KD (teacher resident in bf16, full logits, the paper's way) at per-device batch 4.
5. train_end_to_end: `kdcache train` (loader, workers, metrics; checkpoint excluded) samples/s, sft and dft.

Every part is written to --json as soon as it is measured (a timeout loses only the part running); a
part that fails records its one-line error and the run goes on; a part that would start after --budget-s
is skipped. The last stdout line is the whole JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402
import common  # noqa: E402
from gpu_fidelity import part_fidelity  # noqa: E402

from kdcache import losses, models, samples, targets  # noqa: E402
from kdcache.batches import CacheDataset, make_loader  # noqa: E402
from kdcache.errors import one_line  # noqa: E402
from kdcache.files import write_json_atomic  # noqa: E402
from kdcache.reader import CacheReader  # noqa: E402
from kdcache.sampler import ResumableSampler  # noqa: E402
from student_train.config import TrainConfig  # noqa: E402
from student_train.train import train  # noqa: E402
from teacher_dump import dump, forward, prepare  # noqa: E402

GOALS = {"dump_over_forward_wall": ("<=", 1.10), "dft_over_ce_same_rows": ("<=", 1.10),
         "online_over_dft": (">=", 3.0), "head_topk_max_over_fp16_half_ulp": ("<=", 1.0)}
SO400M = dict(common.REAL["vision"], num_attention_heads=16)


@dataclasses.dataclass(frozen=True)
class Shapes:
    teacher: dict
    student: dict
    vision: dict
    answer_words: int           # response rows = answer words + eos (one toy token per word)
    samples: int                # dumped (and trained on) in parts 3-5
    dump_batch: int
    train_batch: int            # per-device batch of parts 4-5
    steps: int                  # timed steps per variant (part 4)
    train_steps: int            # optimizer steps per `kdcache train` run (part 5)
    head_rows: int              # rows of the head GEMM in part 2 (728 visual + ~200 response)


REAL = Shapes(common.REAL["teacher"], common.REAL["student"], SO400M, answer_words=199, samples=32, dump_batch=8,
              train_batch=4, steps=5, train_steps=8, head_rows=929)
TINY = Shapes(common.TINY["teacher"], common.TINY["student"], common.TINY["vision"], answer_words=20, samples=8,
              dump_batch=2, train_batch=2, steps=2, train_steps=3, head_rows=35)


class Results:
    """What has been measured so far, rewritten to --json (atomically) after every part."""

    def __init__(self, path: str | None, info: dict):
        self.path, self.data = path, {"benchmark": "bench_gpu", **info, "parts": {}, "summary": {}}

    def put(self, name: str, value: dict) -> None:
        self.data["parts"][name] = value
        self.data["summary"] = summary(self.data["parts"])
        if self.path:
            write_json_atomic(self.path, common.rounded(self.data))


def summary(parts: dict) -> dict:
    """The issue's target ratios from the parts measured so far, each with its goal and whether it is met."""
    found = {"dump_over_forward_wall": parts.get("dump", {}).get("dump_over_forward_wall"),
             "dft_over_ce_same_rows": parts.get("student_steps", {}).get("dft_over_ce_same_rows"),
             "online_over_dft": parts.get("student_steps", {}).get("online_over_dft"),
             "head_topk_max_over_fp16_half_ulp": parts.get("head_gemm", {}).get("topk_max_over_fp16_half_ulp")}
    out = {}
    for key, value in found.items():
        if value is not None:
            op, goal = GOALS[key]
            out[key] = {"value": value, "goal": f"{op} {goal}", "met": value <= goal if op == "<=" else value >= goal}
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 3) -> tuple[object, float]:
    """(fn()'s last result, median wall seconds of `repeat` calls), the device synchronised around each."""
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --- 2. the LM-head GEMM, both routes on the same inputs


def part_head_gemm(args, shapes: Shapes, device: torch.device) -> dict:
    v, d = shapes.teacher["vocab_size"], shapes.teacher["hidden_size"]
    gen = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(v, d, generator=gen, device=device) * common.TEACHER_LOGIT_STD / math.sqrt(d)).bfloat16()
    hidden = torch.randn(shapes.head_rows, d, generator=gen, device=device).bfloat16()
    route = targets.head_route(device.type, hidden.dtype, weight.dtype)
    (ids, logprobs), t_route = timed(lambda: targets.topk_logprobs(hidden, weight, k=64), device)
    (ref_ids, ref_logprobs), t_float = timed(lambda: targets.topk_logprobs(hidden.float(), weight.float(), k=64),
                                             device)                       # today's: W upcast on every call
    half_ulp = torch.finfo(torch.float16).eps / 2 * ref_logprobs.abs().clamp_min(2 ** -14)   # float16 rounding
    result = {"V": v, "D": d, "rows": shapes.head_rows, "k": 64, "route": route,
              "topk_route_s": t_route, "topk_float32_upcast_s": t_float, "speedup": t_float / t_route,
              "topk_ids_equal_fraction": float((ids == ref_ids).double().mean()),
              "topk_logprob_max_abs_diff": float((logprobs - ref_logprobs).abs().max()),
              "topk_max_over_fp16_half_ulp": float(((logprobs - ref_logprobs).abs() / half_ulp).max()),
              "stored_float16_equal_fraction": float((logprobs.half() == ref_logprobs.half()).double().mean())}
    result["student_losses"] = student_head(shapes, device)
    return result


def student_head(shapes: Shapes, device: torch.device) -> dict:
    """The student's CE + sparse KL over one batch of rows, forward + backward: bf16 operands vs float32."""
    v, d, rows = shapes.student["vocab_size"], shapes.student["hidden_size"], shapes.train_batch * shapes.head_rows
    gen = torch.Generator(device=device).manual_seed(1)
    weight = (torch.randn(v, d, generator=gen, device=device) * 0.02).requires_grad_()
    hidden = torch.randn(rows, d, generator=gen, device=device).requires_grad_()
    labels = torch.randint(0, v, (rows,), generator=gen, device=device)
    ids = torch.randint(0, v, (rows, 64), generator=gen, device=device)
    logprobs = torch.log_softmax(torch.randn(rows, 64, generator=gen, device=device) * 2, -1) - 0.2

    def run(matmul_dtype):
        weight.grad = hidden.grad = None
        lowered = losses.lowered_head(weight, matmul_dtype)
        ce, kl = losses.row_losses(hidden, weight, labels=labels, topk_ids=ids, topk_logprobs=logprobs, lowered=lowered)
        loss = ce.mean() + kl.mean()
        loss.backward()
        return float(loss.detach()), weight.grad.clone(), hidden.grad.clone()

    low_matmul = torch.bfloat16 if device.type == "cuda" else None          # the trainer's choice on this device
    run(low_matmul), run(None)                                               # warm-up
    (low, t_low), (f32, t_f32) = timed(lambda: run(low_matmul), device), timed(lambda: run(None), device)
    return {"rows": rows, "V": v, "D": d, "matmul_dtype": str(low_matmul), "fwd_bwd_s": t_low, "float32_fwd_bwd_s": t_f32,
            "speedup": t_f32 / t_low, "loss_rel_diff": abs(low[0] - f32[0]) / abs(f32[0]),
            "grad_w_rel_diff": float((low[1] - f32[1]).norm() / f32[1].norm()),
            "grad_h_rel_diff": float((low[2] - f32[2]).norm() / f32[2].norm())}


# --- 3. the dump at real shapes


def build_teacher(shapes: Shapes, device: torch.device, dtype: torch.dtype):
    bundle = common.build_bundle(shapes.teacher, seed=1, source="bench-teacher", logit_std=common.TEACHER_LOGIT_STD,
                                 vision=shapes.vision, device=str(device), dtype=dtype)
    return bundle, forward.Teacher.from_bundle(bundle, device=device, dtype=dtype, relation=True)


def part_dump(args, shapes: Shapes, device: torch.device, work: Path, teacher_parts) -> dict:
    bundle, teacher = teacher_parts
    data = common.make_dataset(work / "data", shapes.samples, answer_words=shapes.answer_words)
    cfg = dataclasses.replace(common.dump_config(data, work / "cache", batch_size=shapes.dump_batch),
                              device=str(device), dtype=str(teacher.dtype).removeprefix("torch."))
    run = dump.run_description(cfg, bundle, teacher, world_size=1)
    records = samples.load_records(data)
    prepared = [prepare.prepare(r, cfg, teacher) for r in records]
    inputs = [device_inputs(prepare.model_inputs(batch, teacher), teacher) for batch in prepare.batched(prepared, cfg.batch_size)]

    def forward():
        with torch.inference_mode():
            for batch in inputs:
                teacher.model(**batch)

    def dump_round(out: Path, timings: dict):
        common.write_cache(teacher, records, dataclasses.replace(cfg, out=str(out)), run, timings=timings)

    forward()                                                    # warm-up: kernels, allocator, cuBLAS handles
    dump_round(work / "warm", {})
    wall = {"forward": [], "dump": []}
    threads: dict = {}
    for r in range(args.rounds):
        for what in (("forward", "dump") if r % 2 == 0 else ("dump", "forward")):
            timings: dict = {}
            _, seconds = timed(forward if what == "forward" else lambda: dump_round(work / f"cache-{r}", timings),
                               device, repeat=1)
            wall[what].append(seconds)
            for stage, t in timings.items():
                threads.setdefault(stage, []).append({"busy_s": t.busy_s, "busy_cpu_s": t.busy_cpu_s, "wait_s": t.wait_s})
    n = len(records)
    fwd, dmp = statistics.median(wall["forward"]), statistics.median(wall["dump"])
    return {"samples": n, "batch_size": cfg.batch_size, "rounds": args.rounds,
            "mean_seq_len": statistics.mean(len(p.sequence.input_ids) for p in prepared),
            "rows_per_sample": {"response": statistics.mean(len(p.sequence.response_rows) for p in prepared),
                                "visual": statistics.mean(p.sequence.visual_len for p in prepared)},
            "forward_wall_s": wall["forward"], "dump_wall_s": wall["dump"],
            "forward_samples_per_s": n / fwd, "dump_samples_per_s": n / dmp, "dump_over_forward_wall": dmp / fwd,
            "threads_median": {stage: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
                               for stage, rows in threads.items()},
            "one_batch_sequential_s": one_batch_breakdown(teacher, cfg, prepared[: cfg.batch_size], device),
            "cache": str(work / f"cache-{args.rounds - 1}")}


def device_inputs(batch: dict, teacher) -> dict:
    """`model_inputs` on the teacher's device, pixel values in its dtype: what the bare forward gets, ready."""
    pixels = batch["pixel_values"]
    return {"input_ids": batch["input_ids"].to(teacher.device), "attention_mask": batch["attention_mask"].to(teacher.device),
            "pixel_values": None if pixels is None else pixels.to(teacher.device, teacher.dtype)}


def one_batch_breakdown(teacher, cfg, batch: list, device: torch.device) -> dict:
    """The teacher thread's work on one batch, one step at a time with the device synchronised (not overlapped)."""
    prepared = prepare.PreparedBatch(batch, prepare.batch_inputs(batch, teacher))
    with torch.inference_mode():
        _, t_all = timed(lambda: forward.teacher_targets(prepared, teacher, cfg), device)
        inputs = device_inputs(prepared.inputs, teacher)
        hidden, t_fwd = timed(lambda: models.final_hidden_states(teacher.model, inputs["input_ids"],
                                                                 inputs["attention_mask"], inputs["pixel_values"]),
                              device)
        rows = torch.cat([hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len]
                          for b, p in enumerate(batch)] + [hidden[b, p.sequence.response_rows] for b, p in enumerate(batch)])
        _, t_topk = timed(lambda: targets.topk_logprobs(rows, teacher.lm_head, k=cfg.topk_visual), device)
        _, t_rel = timed(lambda: [targets.normalized_relation_on_device(targets.relation_from_hidden(
            hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len], teacher.gram))
            for b, p in enumerate(batch) if p.sequence.visual_len], device)
    return {"teacher_targets": t_all, "forward_hidden_states": t_fwd, "topk_both_roles": t_topk, "relations": t_rel}


# --- 4. student steps at real shapes


def cache_batches(cache: Path, image_processor, batch_size: int, pad_id: int, device: torch.device, count: int):
    """`count` collated batches of the cache, as the trainer's loader makes them, on the device."""
    dataset = CacheDataset(CacheReader(cache, verify=True), image_processor, with_targets=True)
    loader = make_loader(dataset, ResumableSampler(dataset.shard_sizes, seed=0, batch_size=batch_size),
                         batch_size=batch_size, num_workers=0, pad_id=pad_id)
    batches = []
    for batch in loader:
        batches.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()})
        if len(batches) == count:
            break
    return batches


def part_student_steps(args, shapes: Shapes, device: torch.device, work: Path, cache: Path, teacher_parts) -> dict:
    student = common.build_bundle(shapes.student, seed=2, source="bench-student", vision=shapes.vision,
                                  device=str(device), dtype=torch.float32)
    batches = cache_batches(cache, student.image_processor, shapes.train_batch, student.tokenizer.pad_token_id, device, 2)
    per_variant = [bench_train.variant_batches(b) for b in batches]
    model = student.model
    loss_of, optimizer = bench_train.setup_variants(model, cache, work / "run")
    teacher_model = teacher_parts[0].model.eval().requires_grad_(False)
    result = {"batch_size": shapes.train_batch, "steps": shapes.steps}
    for variant in bench_train.VARIANTS:
        step = lambda i: bench_train.train_step(variant, per_variant[i % len(batches)][variant], model,  # noqa: E731
                                                teacher_model, loss_of, optimizer)
        step(0)                                                              # warm-up (and AdamW's state)
        reset_peak(device)
        seconds = [timed(lambda: step(i), device, repeat=1)[1] for i in range(shapes.steps)]
        result[variant] = {"s_per_step": statistics.median(seconds), "all_s": seconds, "peak_gib": peak_gib(device)}
    s = {v: result[v]["s_per_step"] for v in bench_train.VARIANTS}
    result.update(dft_over_ce_same_rows=s["dft"] / s["ce_same_rows"], online_over_dft=s["online"] / s["dft"],
                  dft_over_sft=s["dft"] / s["sft"])
    return result, student


# --- 5. kdcache train end to end


def part_train(args, shapes: Shapes, device: torch.device, work: Path, cache: Path, student) -> dict:
    student_dir = work / "student"
    models.save_bundle(student, student_dir, stages=["pt", "sft"])
    result = {"batch_size": shapes.train_batch, "global_batch": 2 * shapes.train_batch, "num_workers": args.workers}
    for stage in ("sft", "dft"):
        out = work / f"run-{stage}"
        steps_per_epoch = max(1, shapes.samples // (2 * shapes.train_batch))
        cfg = TrainConfig(stage=stage, student=str(student_dir), cache=str(cache), out=str(out),
                          batch_size=shapes.train_batch, global_batch=2 * shapes.train_batch,
                          epochs=math.ceil(shapes.train_steps / steps_per_epoch), max_steps=shapes.train_steps,
                          num_workers=args.workers, device=str(device), progress=False,
                          save_every=shapes.train_steps)
        _, wall = timed(lambda: train(cfg), device, repeat=1)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        result[stage] = {"steps": len(lines), "run_wall_s": wall, **steady_rate(lines)}
    return result


def steady_rate(lines: list[dict]) -> dict:
    """Samples/s from metrics.jsonl: over the whole run (start-up included), and from step 2 on (steady)."""
    elapsed = [line["samples_seen"] / line["samples_per_s"] for line in lines]      # seconds since the start
    out = {"samples_per_s_whole_run": lines[-1]["samples_per_s"]}
    if len(lines) > 2:
        out["samples_per_s_from_step_2"] = (lines[-1]["samples_seen"] - lines[1]["samples_seen"]) / (elapsed[-1] - elapsed[1])
    return out


# --- driver


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here, after every part")
    parser.add_argument("--tiny", action="store_true", help="toy-sized models on the CPU: tests the whole script")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    parser.add_argument("--rounds", type=int, default=3, help="dump rounds (forward and dump alternated)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of part 5 (default 4; 2 tiny)")
    parser.add_argument("--budget-s", type=float, default=None, help="start no part after this (default 420; 50 tiny)")
    parser.add_argument("--parts", nargs="+", default=["fidelity", "head_gemm", "dump", "student_steps", "train"])
    return parser.parse_args()


def machine(device: torch.device, shapes: Shapes) -> dict:
    info = {**common.machine(), "device": str(device), "tiny": shapes is TINY}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    return info


def main() -> None:
    args = parse_args()
    shapes = TINY if args.tiny else REAL
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    budget = args.budget_s if args.budget_s is not None else (50.0 if args.tiny else 420.0)
    args.workers = args.workers if args.workers is not None else (2 if args.tiny else 4)
    if device.type == "cpu":
        common.set_threads(1)                        # a shared CPU: see benchmarks/README.md, "How it is measured"
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device here; run with --tiny to test the script on the CPU")
    started = time.perf_counter()
    results = Results(args.json, machine(device, shapes))
    state: dict = {}
    steps = [("fidelity", lambda w: part_fidelity(args, device, w)),
             ("head_gemm", lambda w: part_head_gemm(args, shapes, device)),
             ("dump", lambda w: part_dump(args, shapes, device, w, state.setdefault("teacher", build_teacher(
                 shapes, device, torch.bfloat16 if device.type == "cuda" else torch.float32)))),
             ("student_steps", lambda w: keep(state, "student", part_student_steps(
                 args, shapes, device, w, Path(results.data["parts"]["dump"]["cache"]), state["teacher"]))),
             ("train", lambda w: part_train(args, shapes, device, w, Path(results.data["parts"]["dump"]["cache"]),
                                            state.pop("student")))]
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-gpu-") as tmp:
        for name, run in steps:
            run_part(results, name, run, Path(tmp), args, started, budget)
            if name == "student_steps":
                state.pop("teacher", None)                   # free the teacher's memory before training
    results.data["elapsed_wall_s"] = round(time.perf_counter() - started, 1)
    results.put("done", {"elapsed_wall_s": results.data["elapsed_wall_s"]})
    print(json.dumps(common.rounded(results.data)))


def keep(state: dict, key: str, value: tuple):
    """A part's result, keeping the object it made (the student) for a later part."""
    result, state[key] = value
    return result


def run_part(results: Results, name: str, run, work: Path, args, started: float, budget: float) -> None:
    if name not in args.parts:
        return
    elapsed = time.perf_counter() - started
    if elapsed > budget:
        results.put(name, {"skipped": f"time budget: {elapsed:.0f} s > {budget:.0f} s when it would start"})
        return
    part_started = time.perf_counter()
    try:
        value = run(work)
    except Exception as e:                   # record it and go on: the other parts' numbers still count
        traceback.print_exc()
        value = {"error": one_line(e, limit=500)}
    value["part_wall_s"] = time.perf_counter() - part_started
    results.put(name, value)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"bench_gpu: {name} done in {value['part_wall_s']:.1f} s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
