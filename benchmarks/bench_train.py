"""Student step time from a cache against SFT and online KD, and the loss path's peak memory.

Default run (step times): one scaled student (benchmarks/common.py: Qwen1.5-0.5B proportions), the
same batches (728 visual + ~200 response rows per sample, read from real shards that the scaled
teacher wrote, through CacheDataset + ResumableSampler + collate), and four steps, each forward +
backward + AdamW step of projector + LLM (the DFT/SFT trainables):

* sft           `StudentLoss` of an SFT config: CE over the response rows;
* ce_same_rows  the same, with CE over the response AND visual rows (LM-head work equal to DFT's);
* dft           `StudentLoss` of a DFT config: CE + sparse KL (response, visual) + relation, targets from the cache;
* online        online KD as the paper's code does it: the teacher resident in this process, full
                teacher and student logits (`model(**batch).logits`), dense KL over the full
                vocabulary and the relation `Y Yᵀ` from full logits.

Rounds rotate the order of the four; the median step is reported. Times are process CPU seconds
(--threads 1 by default, see README); wall seconds are printed beside them.

`--memory` (not in the default run: at V = 151,936 it is ~20 TFLOP, several minutes on 2 cores)
measures the peak memory of the loss path alone at V = 151,936, D = 1,024, 728 visual + 200
response rows per sample, B = 1, 4, 8: naive full logits against kdcache's chunked `distill_loss`,
each configuration in a fresh subprocess (peak RSS above the RSS once the inputs exist; see README).

    python benchmarks/bench_train.py [--batch-size 2] [--batches 2] [--rounds 3] [--threads 1]
    python benchmarks/bench_train.py --memory [--mem-batches 1 4 8] [--mem-threads 2]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache import losses, schema, targets  # noqa: E402
from kdcache.batches import CacheDataset, make_loader  # noqa: E402
from kdcache.sampler import ResumableSampler  # noqa: E402
from kdcache.reader import CacheReader  # noqa: E402
from student_train.config import TrainConfig  # noqa: E402
from student_train.train import StudentLoss, set_trainable  # noqa: E402

GOAL_DFT_OVER_CE = 1.15
GOAL_ONLINE_OVER_DFT = 2.5
GOAL_MEM_GROWTH = 1.5
VARIANTS = ("sft", "ce_same_rows", "dft", "online")
TARGET_KEYS = ("response_topk_ids", "response_topk_logprobs", "visual_index", "visual_topk_ids",
               "visual_topk_logprobs", "relation_index", "relation_visual_start", "relation_upper")


# --- step times


def load_batches(cache: Path, image_processor, batch_size: int, pad_id: int) -> tuple[list[dict], float]:
    """Collated batches from the cache exactly as the trainer gets them (0 workers here); CPU s per batch."""
    dataset = CacheDataset(CacheReader(cache, verify=True), image_processor, with_targets=True)
    sampler = ResumableSampler(dataset.shard_sizes, seed=0, batch_size=batch_size)
    loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=0, pad_id=pad_id)
    start = time.process_time()
    batches = list(loader)
    return batches, (time.process_time() - start) / len(batches)


def variant_batches(batch: dict) -> dict[str, dict]:
    """The same samples as each variant consumes them."""
    sft = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
    index = torch.cat([batch["response_index"], batch["visual_index"]])               # (N_r + N_v, 2)
    ce_same = dict(sft, response_index=index, response_labels=batch["input_ids"][index[:, 0], index[:, 1] + 1])
    return {"sft": sft, "ce_same_rows": ce_same, "dft": batch, "online": batch}


def online_loss(student, teacher, batch: dict) -> torch.Tensor:
    """The paper code's online KD: full logits of both models, dense KL over V, relation from full logits."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "pixel_values": batch["pixel_values"]}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits                             # (B, T, V)
    student_logits = student(**inputs).logits                                 # (B, T, V), with grad
    r, v = batch["response_index"], batch["visual_index"]
    ce = F.cross_entropy(student_logits[r[:, 0], r[:, 1]].float(), batch["response_labels"])
    kl_response = losses.dense_kl(student_logits[r[:, 0], r[:, 1]], teacher_logits[r[:, 0], r[:, 1]]).mean()
    kl_visual = losses.dense_kl(student_logits[v[:, 0], v[:, 1]], teacher_logits[v[:, 0], v[:, 1]]).mean()
    relation = []
    visual_len = targets.visual_len_of_packed(batch["relation_upper"].shape[-1])
    for b, start in zip(batch["relation_index"].tolist(), batch["relation_visual_start"].tolist()):
        span = slice(start, start + visual_len)
        y_s, y_t = student_logits[b, span].float(), teacher_logits[b, span].float()   # (L, V)
        packed_t = targets.pack_upper(y_t @ y_t.T)
        relation.append(losses.relation_loss((y_s @ y_s.T)[None], packed_t[None]))
    return ce + kl_response + kl_visual + 0.5 * torch.cat(relation).mean()


def setup_variants(model, cache: Path, run: Path) -> tuple[dict, torch.optim.Optimizer]:
    """Projector + LLM trainable (as DFT/SFT), AdamW, and the trainer's StudentLoss of each cached variant
    (the config's --dtype default: bf16 autocast and bf16 LM-head GEMMs on CUDA, float32 on the CPU)."""
    set_trainable(model, ("projector", "llm"))
    model.train()
    model.model.vision_tower.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
    temperatures = {"response": 1.0, "visual": 1.0}
    loss_of = {
        name: StudentLoss(model, TrainConfig(stage=stage, student="bench-student", out=str(run), cache=str(cache)),
                          temperatures, None)
        for name, stage in (("sft", "sft"), ("ce_same_rows", "sft"), ("dft", "dft"))}
    return loss_of, optimizer


def train_step(variant: str, batch: dict, model, teacher_model, loss_of: dict, optimizer) -> None:
    """One optimizer step of `variant` on `batch`: forward, backward, AdamW, as the trainer runs it."""
    if variant == "online":           # the student under the trainer's autocast (bf16 on CUDA), the teacher bf16
        cuda = batch["input_ids"].device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext():
            loss = online_loss(model, teacher_model, batch)
    else:
        loss_of[variant].start_micro_batch(0, 1)
        parts = loss_of[variant](batch)
        loss = parts["loss"]
        [float(v.detach()) for v in parts.values()]                           # as the trainer does, for its log
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def step_flops(batch: dict) -> dict[str, float]:
    """Analytic FLOPs of one step of each variant on `batch` (common.py's counting)."""
    B, T = batch["input_ids"].shape
    n_r, n_v = batch["response_index"].shape[0], batch["visual_index"].shape[0]
    V, Ds, L = common.VOCAB, common.STUDENT["hidden_size"], common.VISUAL_LEN
    per_sample = lambda rows, recompute=True: common.student_step_flops(T, rows, recompute_head=recompute)  # noqa: E731
    sft = B * per_sample(n_r / B)
    ce_same = B * per_sample((n_r + n_v) / B)
    relation_s = B * 3 * 2 * (L * Ds * Ds + L * L * Ds)                      # H G Hᵀ forward + backward
    gram = 2 * 2 * V * Ds * Ds                                                # G = WᵀW forward + one-matmul backward
    dft = ce_same + relation_s + gram
    teacher_fwd = B * (common.tower_flops() + common.body_flops(common.TEACHER, T) + common.head_flops(common.TEACHER, T))
    student_full = B * per_sample(T, recompute=False)                         # logits at every position
    relation_logits = B * (3 * 2 * L * L * V + 2 * L * L * V)                 # Y_s Y_sᵀ fwd + bwd, Y_t Y_tᵀ
    return {"sft": sft, "ce_same_rows": ce_same, "dft": dft, "online": teacher_fwd + student_full + relation_logits}


def measure_steps(args, work: Path) -> dict:
    teacher, student = common.teacher_bundle(), common.student_bundle()
    data = common.make_dataset(work / "data", args.batch_size * args.batches)
    (_, dump_cpu, _) = common.measure(lambda: common.dump_cache(teacher, data, work / "cache", batch_size=args.batch_size))
    batches, load_cpu = load_batches(work / "cache", student.image_processor, args.batch_size,
                                     student.tokenizer.pad_token_id)

    model = student.model
    loss_of, optimizer = setup_variants(model, work / "cache", work / "run")
    teacher_model = teacher.model.eval().requires_grad_(False)

    def step(variant: str, batch: dict) -> None:
        train_step(variant, batch, model, teacher_model, loss_of, optimizer)

    per_variant = [variant_batches(b) for b in batches]
    for variant in VARIANTS:                                                  # warm-up
        step(variant, per_variant[0][variant])
    cpu = {v: [] for v in VARIANTS}
    wall = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for variant in order:
            _, c, w = common.measure(lambda: step(variant, per_variant[r % len(batches)][variant]))
            cpu[variant].append(c)
            wall[variant].append(w)

    flops = {v: statistics.mean(step_flops(b)[v] for b in batches) for v in VARIANTS}
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    rows = {"response": statistics.mean(b["response_index"].shape[0] for b in batches) / args.batch_size,
            "visual": statistics.mean(b["visual_index"].shape[0] for b in batches) / args.batch_size}
    return {"cpu": cpu, "wall": wall, "flops": flops, "tokens_per_batch": tokens, "rows_per_sample": rows,
            "dump_cpu_s": dump_cpu, "load_cpu_s_per_batch": load_cpu}


def report_steps(args, res: dict, info: dict, started: float) -> dict:
    med = {v: statistics.median(res["cpu"][v]) for v in VARIANTS}
    med_wall = {v: statistics.median(res["wall"][v]) for v in VARIANTS}
    B, tok = args.batch_size, res["tokens_per_batch"]
    rows = []
    for v in VARIANTS:
        rows.append([v, common.fmt(med[v], 3), " ".join(f"{x:.2f}" for x in res["cpu"][v]), common.fmt(B / med[v], 3),
                     f"{tok / med[v]:,.0f}", f"{res['flops'][v] / 1e9:,.0f}", f"{res['flops'][v] / med[v] / 1e9:.1f}",
                     common.fmt(med_wall[v], 3)])
    common.print_table(
        f"Student step (fwd + bwd + AdamW), batch {B} x {tok / B:.0f} tokens ({res['rows_per_sample']['visual']:.0f} visual + "
        f"{res['rows_per_sample']['response']:.0f} response rows per sample), median of {args.rounds}, {args.threads} thread(s)",
        ["variant", "CPU s/step", "all rounds", "samples/CPU-s", "tokens/CPU-s", "GFLOP/step", "GFLOP/CPU-s", "wall s/step"],
        rows)
    floor = res["flops"]["ce_same_rows"] / res["flops"]["sft"]
    ratios = {
        "dft_over_sft": med["dft"] / med["sft"],
        "dft_over_sft_flops_floor": floor,
        "dft_over_ce_same_rows": med["dft"] / med["ce_same_rows"],
        "online_over_dft": med["online"] / med["dft"],
        "ce_same_rows_over_sft": med["ce_same_rows"] / med["sft"],
    }
    common.print_table("Ratios (CPU time)", ["ratio", "value", "goal", "met"], [
        ["dft / sft", common.fmt(ratios["dft_over_sft"]), f"floor {floor:.3f} from FLOPs (extra LM-head rows)", ""],
        ["ce_same_rows / sft", common.fmt(ratios["ce_same_rows_over_sft"]), "", ""],
        ["dft / ce_same_rows", common.fmt(ratios["dft_over_ce_same_rows"]), f"<= {GOAL_DFT_OVER_CE}",
         "yes" if ratios["dft_over_ce_same_rows"] <= GOAL_DFT_OVER_CE else "NO"],
        ["online / dft", common.fmt(ratios["online_over_dft"]), f">= {GOAL_ONLINE_OVER_DFT}",
         "yes" if ratios["online_over_dft"] >= GOAL_ONLINE_OVER_DFT else "NO"],
        ["online / dft, wall", common.fmt(med_wall["online"] / med_wall["dft"]), "", ""]])
    print(f"\nnot in the step: cache dump of {B * args.batches} samples {res['dump_cpu_s']:.1f} CPU s; "
          f"CacheDataset + collate {res['load_cpu_s_per_batch']:.3f} CPU s per batch of {B} (DataLoader workers in training)")
    return {
        "benchmark": "bench_train", **info, "threads": args.threads, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        **common.rounded(ratios),
        "dft_over_ce_same_rows_goal": GOAL_DFT_OVER_CE,
        "dft_over_ce_same_rows_goal_met": ratios["dft_over_ce_same_rows"] <= GOAL_DFT_OVER_CE,
        "online_over_dft_goal": GOAL_ONLINE_OVER_DFT,
        "online_over_dft_goal_met": ratios["online_over_dft"] >= GOAL_ONLINE_OVER_DFT,
        "step_cpu_s": common.rounded(med), "step_wall_s": common.rounded(med_wall),
        "step_cpu_s_rounds": common.rounded(res["cpu"]),
        "batch_size": B, "tokens_per_batch": tok, "rounds": args.rounds, "batches": args.batches,
        "gflop_per_step": common.rounded({v: f / 1e9 for v, f in res["flops"].items()}),
        "loss_path_mem_growth_b1_to_b8": None, "loss_path_memory": "run with --memory",
        "elapsed_wall_s": round(time.perf_counter() - started, 1),
    }


# --- loss-path memory (fresh subprocess per configuration)

MEM = dict(V=151936, D=1024, visual=728, response=200, prefix=31, question=21, k=64)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(impl: str, batch_size: int) -> dict:
    """One configuration: build the inputs, reset the peak-RSS mark, run loss forward + backward."""
    V, D, L, R, K = MEM["V"], MEM["D"], MEM["visual"], MEM["response"], MEM["k"]
    vs = MEM["prefix"]
    T = vs + L + MEM["question"] + R                                          # 980 tokens
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(V, D, generator=gen) * 0.02).requires_grad_()       # (V, D) trained LM head (DFT)
    hidden = torch.randn(batch_size, T, D, generator=gen).requires_grad_()    # (B, T, D)
    b_r = torch.arange(batch_size).repeat_interleave(R)
    b_v = torch.arange(batch_size).repeat_interleave(L)
    response_index = torch.stack([b_r, torch.arange(T - R - 1, T - 1).repeat(batch_size)], 1)
    visual_index = torch.stack([b_v, torch.arange(vs, vs + L).repeat(batch_size)], 1)

    def topk(n):   # collate's dtypes: ids int64, log-probs float32
        logprobs = torch.log_softmax(torch.randn(n, K, generator=gen) * 2, -1) - 0.2
        return torch.randint(0, V, (n, K), generator=gen), logprobs

    r_ids, r_lp = topk(batch_size * R)
    v_ids, v_lp = topk(batch_size * L)
    batch = {"response_index": response_index, "response_labels": torch.randint(0, V, (batch_size * R,), generator=gen),
             "response_topk_ids": r_ids, "response_topk_logprobs": r_lp, "visual_index": visual_index,
             "visual_topk_ids": v_ids, "visual_topk_logprobs": v_lp, "relation_index": torch.arange(batch_size),
             "relation_visual_start": torch.full((batch_size,), vs),
             "relation_upper": torch.rand(batch_size, schema.relation_size(L), generator=gen)}
    gc.collect()
    baseline = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")                        # reset VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    cpu, wall = time.process_time(), time.perf_counter()
    if impl == "kdcache":
        loss = losses.distill_loss(hidden, weight, batch)["loss"]
    else:   # naive: (B, T, V) float32 logits, then the same terms on rows gathered from them
        logits = hidden @ weight.T
        r, v = response_index, visual_index
        ce = F.cross_entropy(logits[r[:, 0], r[:, 1]], batch["response_labels"])
        kl_r = losses.sparse_kl(logits[r[:, 0], r[:, 1]], r_ids, r_lp).mean()
        kl_v = losses.sparse_kl(logits[v[:, 0], v[:, 1]], v_ids, v_lp).mean()
        y = logits[:, vs: vs + L]                                             # (B, L, V)
        rel = losses.relation_loss(y @ y.transpose(1, 2), batch["relation_upper"]).mean()
        loss = ce + kl_r + kl_v + 0.5 * rel
    loss.backward()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = _status_kb("VmHWM")
    return {"impl": impl, "batch_size": batch_size, "baseline_mib": baseline / 1024, "peak_mib": peak / 1024,
            "loss_path_mib": (peak - baseline) / 1024, "peak_reset": reset, "cpu_s": cpu, "wall_s": wall}


def run_child(impl: str, batch_size: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--mem-child", impl, str(batch_size), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def measure_memory(args, info: dict, started: float) -> dict:
    limit_mib = args.mem_limit_gib * 1024
    kd = {b: run_child("kdcache", b, args.mem_threads) for b in args.mem_batches}
    naive: dict[int, dict] = {}
    for b in sorted({1, 2, *args.mem_batches}):
        predicted = b * naive[1]["loss_path_mib"] if naive else 0.0            # linear in B, from B = 1
        if naive and (predicted > limit_mib or predicted > mem_available_mib() - 2048):
            continue
        naive[b] = run_child("naive", b, args.mem_threads)
    measured = sorted(naive)
    slope = ((naive[measured[-1]]["loss_path_mib"] - naive[measured[0]]["loss_path_mib"]) / (measured[-1] - measured[0])
             if len(measured) > 1 else naive[measured[0]]["loss_path_mib"])

    def naive_mib(b):
        if b in naive:
            return naive[b]["loss_path_mib"], "measured"
        return naive[measured[0]]["loss_path_mib"] + (b - measured[0]) * slope, "extrapolated"

    rows = []
    for b in args.mem_batches:
        n_mib, how = naive_mib(b)
        rows.append([b, f"{n_mib / 1024:.2f} ({how})", f"{kd[b]['loss_path_mib'] / 1024:.2f}",
                     f"{n_mib / kd[b]['loss_path_mib']:.1f}x", f"{kd[b]['cpu_s']:.0f}",
                     f"{naive[b]['cpu_s']:.0f}" if b in naive else "-"])
    common.print_table(
        f"Loss path peak memory (GiB above the inputs), V = {MEM['V']:,}, D = {MEM['D']:,}, {MEM['visual']} visual + "
        f"{MEM['response']} response rows per sample, LM head trained (DFT), {args.mem_threads} thread(s)",
        ["batch", "naive full logits", "kdcache distill_loss", "naive / kdcache", "kdcache CPU s", "naive CPU s"], rows)
    b_lo, b_hi = min(args.mem_batches), max(args.mem_batches)
    growth = kd[b_hi]["loss_path_mib"] / kd[b_lo]["loss_path_mib"]
    naive_measured = ", ".join(f"{b} ({naive[b]['loss_path_mib'] / 1024:.2f} GiB)" for b in measured)
    print(f"\nnaive measured at B = {naive_measured}; "
          f"sizes predicted above {args.mem_limit_gib} GiB were not run but extrapolated linearly from those. "
          f"kdcache B={b_lo} -> B={b_hi}: x{growth:.3f}")
    key = f"loss_path_mem_growth_b{b_lo}_to_b{b_hi}"
    return {
        "benchmark": "bench_train --memory", **info, "threads": args.mem_threads,
        "load_avg_1m_end": round(os.getloadavg()[0], 2),
        key: round(growth, 4), "loss_path_mem_growth_goal": GOAL_MEM_GROWTH,
        "loss_path_mem_growth_goal_met": growth <= GOAL_MEM_GROWTH,
        "kdcache_loss_path_gib": {str(b): round(kd[b]["loss_path_mib"] / 1024, 3) for b in args.mem_batches},
        "naive_loss_path_gib": {str(b): round(naive_mib(b)[0] / 1024, 3) for b in args.mem_batches},
        "naive_measured_batches": measured,
        "naive_measured_gib": {str(b): round(naive[b]["loss_path_mib"] / 1024, 3) for b in measured},
        "baseline_gib": {str(b): round(kd[b]["baseline_mib"] / 1024, 3) for b in args.mem_batches},
        "shape": MEM, "elapsed_wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches (cycled through the rounds)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory", action="store_true", help="measure the loss path's peak memory instead")
    parser.add_argument("--mem-batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--mem-threads", type=int, default=2)
    parser.add_argument("--mem-limit-gib", type=float, default=8.0, help="skip naive sizes predicted above this")
    parser.add_argument("--mem-child", nargs=2, metavar=("IMPL", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.set_threads(args.threads)
    if args.mem_child:
        print(json.dumps(memory_child(args.mem_child[0], int(args.mem_child[1]))))
        return
    started = time.perf_counter()
    if args.memory:
        common.set_threads(args.mem_threads)                                 # what the children run with
    info = common.machine()
    if args.memory:
        result = measure_memory(args, info, started)
    else:
        common.print_table("Configurations (real vs scaled; head : body in matmul FLOPs per token)",
                           common.CONFIG_HEADER, common.config_rows(980))
        with tempfile.TemporaryDirectory(prefix="kdcache-bench-train-") as tmp:
            result = report_steps(args, measure_steps(args, Path(tmp)), info, started)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
