"""Dump throughput: the real `teacher_targets` + shard-writer path against a bare teacher forward.

Part 1 runs the scaled teacher (benchmarks/common.py: Qwen1.5-4B proportions, 728 visual rows,
~200 response rows per sample) over the same batches twice per round: once as `model(**batch)`
(full logits, nothing kept, inputs prepared beforehand) and once as the dump does it
(`teacher_dump.dump.dump_records`: image decoding and tokenisation, image preprocessing, final
hidden states, top-k of both roles, relation, then `ShardWriter.write`, shard close and
`finalize_cache`). Rounds alternate the order; medians are reported.

Part 2 times target extraction alone at LLaVA scale (V = 151,936, D = 2,560, 728 visual rows):
top-k log-probs, the Gram relation `H G Hᵀ` with `G = WᵀW` precomputed, and the direct `Y Yᵀ`.
`G`'s one-off cost is measured on the first `--gram-rows` vocabulary rows and scaled to V (it is
a sum of identical per-chunk matmuls, linear in V); pass `--gram-rows 151936` to time all of it.

Times are process CPU seconds (torch threads = --threads, 1 by default: on a shared machine CPU
time of a single-threaded process is what the work costs, wall time is what the neighbours leave);
wall seconds are printed beside them. Last stdout line: one JSON object.

    python benchmarks/bench_dump.py [--samples 4] [--batch-size 2] [--rounds 4] [--threads 1] [--gram-rows 32768]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from kdcache import models, samples, targets, writer  # noqa: E402
from teacher_dump import dump, forward, prepare  # noqa: E402

GOAL_DUMP_OVER_FORWARD = 1.15


# --- part 1: dump against bare forward


class Clock:
    """Accumulates CPU seconds per named stage (wrapping module functions the dump calls).

    The dump's stages run in three threads (and image decoding in a small pool), so each call is
    timed with its own thread's CPU clock (`time.thread_time`), not the process's.
    """

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.pipeline: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str):
        start = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - start
            with self._lock:
                self.cpu[name] = self.cpu.get(name, 0.0) + spent

    def add_pipeline(self, timings: dict) -> None:
        """Sum `dump_records`' per-stage `StageTimes` (busy wall, busy CPU, waiting) over the rounds."""
        for stage, t in timings.items():
            total = self.pipeline.setdefault(stage, {"busy_s": 0.0, "busy_cpu_s": 0.0, "wait_s": 0.0})
            total["busy_s"] += t.busy_s
            total["busy_cpu_s"] += t.busy_cpu_s
            total["wait_s"] += t.wait_s

    def wrap(self, module, attr: str, name: str):
        original = getattr(module, attr)

        def timed(*args, **kwargs):
            with self.stage(name):
                return original(*args, **kwargs)

        setattr(module, attr, timed)
        return lambda: setattr(module, attr, original)


def run_forward(model, inputs: list[dict]) -> None:
    with torch.inference_mode():
        for batch in inputs:
            model(**batch)


def run_dump(teacher: forward.Teacher, records: list, cfg, run: dict, out: Path, timings: dict | None = None) -> dict:
    """The dump's own loop (`dump_records`: prepare -> teacher_targets -> ShardWriter), then rank report + manifest."""
    return common.write_cache(teacher, records, dataclasses.replace(cfg, out=str(out)), run, timings=timings)


@dataclasses.dataclass
class DumpInputs:
    """Everything both timed paths need, built before any timing."""
    teacher: forward.Teacher
    cfg: object
    run: dict
    records: list
    prepared: list                  # dump.prepare of every record (for the bare forward and the row counts)
    inputs: list[dict]              # model_inputs per batch: what `model(**batch)` gets
    gram_cpu: float                 # CPU s of Teacher.from_bundle (G = WᵀW), once per dump
    prepare_cpu: float              # CPU s of dump.prepare over all records


def prepare_dump_inputs(args, work: Path) -> DumpInputs:
    bundle = common.teacher_bundle()
    data = common.make_dataset(work / "data", args.samples)
    cfg = common.dump_config(data, work / "cache", batch_size=args.batch_size)
    start = time.process_time()
    teacher = forward.Teacher.from_bundle(bundle, device=torch.device("cpu"), dtype=torch.float32, relation=True)
    gram_cpu = time.process_time() - start                              # G = WᵀW, once per dump
    run = dump.run_description(cfg, bundle, teacher, world_size=1)
    records = samples.load_records(data)

    start = time.process_time()
    prepared = [prepare.prepare(r, cfg, teacher) for r in records]
    prepare_cpu = time.process_time() - start
    inputs = [prepare.model_inputs(batch, teacher) for batch in prepare.batched(prepared, cfg.batch_size)]
    return DumpInputs(teacher, cfg, run, records, prepared, inputs, gram_cpu, prepare_cpu)


def wrap_dump_stages(clock: Clock) -> list:
    """Time the dump's stages by wrapping the functions it calls; returns the undo callables."""
    return [clock.wrap(prepare, "read_image", "read + decode images (decoding threads)"),
            clock.wrap(prepare, "prepare", "tokenise (preparing thread)"),
            clock.wrap(samples, "pixel_values", "image preprocessing (preparing thread)"),
            clock.wrap(models, "final_hidden_states", "teacher forward (hidden states)"),
            clock.wrap(targets, "topk_logprobs", "top-k log-probs (both roles)"),
            clock.wrap(targets, "relation_from_hidden", "relation H G H^T"),
            clock.wrap(targets, "normalized_relation_on_device", "relation normalise + pack"),
            clock.wrap(writer.ShardWriter, "write", "ShardWriter.write (check, buffer, compress; writing thread)"),
            clock.wrap(writer.ShardWriter, "close", "shard close (flush, sha256, rename)"),
            clock.wrap(writer, "finalize_cache", "finalize_cache (manifest)")]


def time_rounds(args, d: DumpInputs, work: Path) -> tuple[dict, dict, Clock, dict]:
    """Warm-up, then `args.rounds` rounds of forward and dump, alternating their order: (fwd, dmp, clock, manifest)."""
    model = d.teacher.model
    # warm-up: one batch each (allocator, oneDNN kernels)
    run_forward(model, d.inputs[:1])
    run_dump(d.teacher, d.records[: d.cfg.batch_size], d.cfg, d.run, work / "warmup")

    clock = Clock()
    restore = wrap_dump_stages(clock)
    fwd = {"cpu": [], "wall": []}
    dmp = {"cpu": [], "wall": []}
    manifest = None
    try:
        for r in range(args.rounds):
            order = ("forward", "dump") if r % 2 == 0 else ("dump", "forward")
            for what in order:
                c, w = time.process_time(), time.perf_counter()
                if what == "forward":
                    run_forward(model, d.inputs)
                    target = fwd
                else:
                    timings: dict = {}
                    manifest = run_dump(d.teacher, d.records, d.cfg, d.run, work / f"cache-{r}", timings)
                    clock.add_pipeline(timings)
                    target = dmp
                target["cpu"].append(time.process_time() - c)
                target["wall"].append(time.perf_counter() - w)
    finally:
        for undo in restore:
            undo()
    return fwd, dmp, clock, manifest


def dump_summary(args, d: DumpInputs, fwd: dict, dmp: dict, clock: Clock, manifest: dict) -> dict:
    prepared = d.prepared
    n = len(prepared)
    tokens = sum(len(p.sequence.input_ids) for p in prepared)
    rows = {"response": sum(len(p.sequence.response_rows) for p in prepared) / n,
            "visual": sum(p.sequence.visual_len for p in prepared) / n}
    fwd_cpu, dmp_cpu = statistics.median(fwd["cpu"]), statistics.median(dmp["cpu"])
    fwd_wall, dmp_wall = statistics.median(fwd["wall"]), statistics.median(dmp["wall"])
    breakdown = {name: sec / args.rounds for name, sec in clock.cpu.items()}           # mean per round
    breakdown["other (padding, row gathers, numpy, threads, Python)"] = statistics.mean(dmp["cpu"]) - sum(breakdown.values())
    pipeline = {stage: {k: v / args.rounds for k, v in t.items()} for stage, t in clock.pipeline.items()}
    stats = manifest["stats"]
    return {
        "samples": n, "batch_size": d.cfg.batch_size, "rounds": args.rounds, "tokens": tokens,
        "rows_per_sample": rows, "mean_seq_len": tokens / n,
        "forward_cpu_s": fwd["cpu"], "dump_cpu_s": dmp["cpu"], "forward_wall_s": fwd["wall"], "dump_wall_s": dmp["wall"],
        "forward_samples_per_cpu_s": n / fwd_cpu, "dump_samples_per_cpu_s": n / dmp_cpu,
        "forward_tokens_per_cpu_s": tokens / fwd_cpu, "dump_tokens_per_cpu_s": tokens / dmp_cpu,
        "forward_samples_per_wall_s": n / fwd_wall, "dump_samples_per_wall_s": n / dmp_wall,
        "dump_over_forward": dmp_cpu / fwd_cpu, "dump_over_forward_wall": dmp_wall / fwd_wall,
        "breakdown_cpu_s": breakdown, "pipeline_per_round": pipeline,
        "prepare_cpu_s_per_sample": d.prepare_cpu / n, "gram_cpu_s": d.gram_cpu,
        "cache_bytes_per_sample": stats["bytes_per_sample"], "cache_bytes_per_token": stats["bytes_per_token"],
        "mean_tail_mass": stats["mean_tail_mass"],
    }


def measure_dump_vs_forward(args, work: Path) -> dict:
    d = prepare_dump_inputs(args, work)
    fwd, dmp, clock, manifest = time_rounds(args, d, work)
    return dump_summary(args, d, fwd, dmp, clock, manifest)


# --- part 2: extraction alone at LLaVA scale


def measure_llava_scale(args) -> dict:
    V, D, L, K = 151936, 2560, common.VISUAL_LEN, 64
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(V, D, generator=gen).mul_(common.TEACHER_LOGIT_STD / math.sqrt(D))   # (V, D) float32
    hidden = torch.randn(L, D, generator=gen)                                                    # (L, D)

    def cpu(fn):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        return out, time.process_time() - c, time.perf_counter() - w

    _, topk_cpu, topk_wall = cpu(lambda: targets.topk_logprobs(hidden, weight, k=K, chunk_rows=256))
    gram_rows = min(args.gram_rows, V)
    gram, gram_cpu, gram_wall = cpu(lambda: targets.gram_matrix(weight[:gram_rows]))
    scale = V / gram_rows
    targets.relation_from_hidden(hidden, gram)                                                   # warm-up
    rel_cpu, rel_wall = min(cpu(lambda: targets.relation_from_hidden(hidden, gram))[1:] for _ in range(3))
    _, pack_cpu, _ = cpu(lambda: targets.normalized_relation(targets.relation_from_hidden(hidden, gram)))

    def direct():
        logits = hidden @ weight.T                                           # (L, V) float32, 442 MB
        return logits @ logits.T                                             # (L, L)

    _, direct_cpu, direct_wall = cpu(direct)
    # equivalence on the rows G was built from: H G Hᵀ against Y Yᵀ with Y over those rows
    y = hidden @ weight[:gram_rows].T
    reference = (y.double() @ y.double().T)
    err = ((targets.relation_from_hidden(hidden, gram).double() - reference).norm() / reference.norm()).item()
    return {
        "V": V, "D": D, "visual_rows": L, "k": K,
        "topk_cpu_s": topk_cpu, "topk_wall_s": topk_wall, "topk_cpu_ms_per_row": 1e3 * topk_cpu / L,
        "gram_relation_cpu_s": rel_cpu, "gram_relation_wall_s": rel_wall, "relation_pack_cpu_s": pack_cpu,
        "direct_relation_cpu_s": direct_cpu, "direct_relation_wall_s": direct_wall,
        "direct_over_gram_relation": direct_cpu / rel_cpu,
        "gram_rows_timed": gram_rows, "gram_cpu_s_measured": gram_cpu, "gram_wall_s_measured": gram_wall,
        "gram_cpu_s_full_vocab": gram_cpu * scale, "gram_extrapolated": gram_rows < V,
        "gram_breakeven_samples": gram_cpu * scale / max(direct_cpu - rel_cpu, 1e-9),
        "gram_vs_direct_rel_frobenius_error": err,
    }


# --- report


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gram-rows", type=int, default=32768, help="vocabulary rows G is timed on (scaled to V)")
    parser.add_argument("--skip-llava-scale", action="store_true")
    return parser.parse_args()


def print_dump_tables(part1: dict, args) -> None:
    n = part1["samples"]
    common.print_table(
        f"Dump vs bare forward, scaled teacher, {n} samples x {part1['mean_seq_len']:.0f} tokens "
        f"({part1['rows_per_sample']['visual']:.0f} visual + {part1['rows_per_sample']['response']:.0f} response rows), "
        f"batch {part1['batch_size']}, median of {part1['rounds']} rounds, {args.threads} thread(s)",
        ["path", "CPU s", "samples/CPU-s", "tokens/CPU-s", "wall s", "samples/wall-s"],
        [["model(**batch)", common.fmt(statistics.median(part1["forward_cpu_s"]), 2),
          common.fmt(part1["forward_samples_per_cpu_s"], 3), f"{part1['forward_tokens_per_cpu_s']:,.0f}",
          common.fmt(statistics.median(part1["forward_wall_s"]), 2), common.fmt(part1["forward_samples_per_wall_s"], 3)],
         ["dump (teacher_targets + shards)", common.fmt(statistics.median(part1["dump_cpu_s"]), 2),
          common.fmt(part1["dump_samples_per_cpu_s"], 3), f"{part1['dump_tokens_per_cpu_s']:,.0f}",
          common.fmt(statistics.median(part1["dump_wall_s"]), 2), common.fmt(part1["dump_samples_per_wall_s"], 3)],
         ["dump / forward", common.fmt(part1["dump_over_forward"], 3), "", "",
          common.fmt(part1["dump_over_forward_wall"], 3), ""]])
    dump_cpu = statistics.median(part1["dump_cpu_s"])
    common.print_table("Where the dump's CPU time goes (per round)", ["stage", "CPU s", "share"],
                       [[k, common.fmt(v, 3), f"{100 * v / dump_cpu:.1f}%"] for k, v in part1["breakdown_cpu_s"].items()])
    stages = part1["pipeline_per_round"]
    waits = {"prepare": "teacher_waiting_for_prepare", "write": "teacher_waiting_for_write"}
    common.print_table("The dump's threads (per round): their own work, and the teacher thread's waits on them",
                       ["thread", "busy wall s", "busy CPU s", "teacher waited s"],
                       [[k, common.fmt(stages[k]["busy_s"], 3), common.fmt(stages[k]["busy_cpu_s"], 3),
                         common.fmt(stages[waits[k]]["wait_s"], 3) if k in waits else ""]
                        for k in ("prepare", "teacher", "write")])
    print(f"\nprepare (decode + tokenise, in the timed dump) {part1['prepare_cpu_s_per_sample'] * 1e3:.1f} ms/sample; not in it: "
          f"G = WᵀW once per dump {part1['gram_cpu_s'] * 1e3:.0f} ms; cache {part1['cache_bytes_per_sample'] / 1e3:.0f} kB/sample, "
          f"{part1['cache_bytes_per_token']:.0f} B/token; mean tail mass {part1['mean_tail_mass']}")


def print_llava_scale_table(g: dict, args) -> None:
    common.print_table(
        f"Target extraction alone at LLaVA scale (V = {g['V']:,}, D = {g['D']:,}, {g['visual_rows']} visual rows, "
        f"float32, {args.threads} thread(s))",
        ["operation", "CPU s", "wall s", "note"],
        [["top-k log-probs, k = 64 (728 rows)", common.fmt(g["topk_cpu_s"], 2), common.fmt(g["topk_wall_s"], 2),
          f"{g['topk_cpu_ms_per_row']:.1f} ms per row"],
         ["relation H G Hᵀ (G precomputed)", common.fmt(g["gram_relation_cpu_s"], 3), common.fmt(g["gram_relation_wall_s"], 3),
          "best of 3"],
         ["H G Hᵀ + normalise, pack, float16", common.fmt(g["relation_pack_cpu_s"], 3), "", "one run"],
         ["relation Y Yᵀ direct", common.fmt(g["direct_relation_cpu_s"], 2), common.fmt(g["direct_relation_wall_s"], 2),
          f"{g['direct_over_gram_relation']:.0f}x the Gram form"],
         ["G = WᵀW, one-off per dump", common.fmt(g["gram_cpu_s_full_vocab"], 2), "",
          (f"timed on {g['gram_rows_timed']:,} rows ({g['gram_cpu_s_measured']:.2f} s), x V/rows"
           if g["gram_extrapolated"] else "timed on all rows") +
          f"; pays for itself after {g['gram_breakeven_samples']:.1f} samples"],
         ["|H G Hᵀ - Y Yᵀ|_F / |Y Yᵀ|_F", f"{g['gram_vs_direct_rel_frobenius_error']:.1e}", "", "float32 vs float64 Y Yᵀ"]])


def result_json(args, info: dict, part1: dict, part2: dict | None, started: float) -> dict:
    goal_met = part1["dump_over_forward"] <= GOAL_DUMP_OVER_FORWARD
    return {
        "benchmark": "bench_dump", **info, "threads": args.threads, "load_avg_1m_end": round(os.getloadavg()[0], 2),
        "dump_over_forward": round(part1["dump_over_forward"], 4),
        "dump_over_forward_goal": GOAL_DUMP_OVER_FORWARD, "dump_over_forward_goal_met": goal_met,
        "dump_over_forward_wall": round(part1["dump_over_forward_wall"], 4),
        "dump_samples_per_cpu_s": round(part1["dump_samples_per_cpu_s"], 4),
        "dump_tokens_per_cpu_s": round(part1["dump_tokens_per_cpu_s"], 1),
        "forward_samples_per_cpu_s": round(part1["forward_samples_per_cpu_s"], 4),
        "forward_tokens_per_cpu_s": round(part1["forward_tokens_per_cpu_s"], 1),
        "dump_samples_per_wall_s": round(part1["dump_samples_per_wall_s"], 4),
        "samples": part1["samples"], "batch_size": part1["batch_size"], "rounds": part1["rounds"],
        "mean_seq_len": round(part1["mean_seq_len"], 1),
        "cache_bytes_per_sample": round(part1["cache_bytes_per_sample"]),
        "breakdown_cpu_s": common.rounded(part1["breakdown_cpu_s"]),
        "pipeline_per_round": common.rounded(part1["pipeline_per_round"]),
        "llava_scale": None if part2 is None else common.rounded(part2),
        "elapsed_wall_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    args = parse_args()
    common.set_threads(args.threads)
    started = time.perf_counter()
    info = common.machine()

    common.print_table("Configurations (real vs scaled; head : body in matmul FLOPs per token)",
                       common.CONFIG_HEADER, common.config_rows(980))
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-dump-") as tmp:
        part1 = measure_dump_vs_forward(args, Path(tmp))
    print_dump_tables(part1, args)

    part2 = None
    if not args.skip_llava_scale:
        part2 = measure_llava_scale(args)
        print_llava_scale_table(part2, args)
    print(json.dumps(result_json(args, info, part1, part2, started)))


if __name__ == "__main__":
    main()
