"""Which teacher and which student budget make distillation help: the quickstart over several seeds, one teacher.

    python benchmarks/bench_teachers.py [--teacher toy-teacher] [--seeds 20 21 22 23 24 25] [--pt 60]
                                        [--sft 50 --dft 250]
                                        [--temperature 1] [--alpha 1 --beta 1 --gamma 0.5] [--out DIR]

For each seed, `kdcache quickstart --seed S`'s recipe (`kdcache.toy.recipe`: data of that seed, the two caches
dumped from `--teacher` (a checkpoint directory or a preset) at `--temperature`, the baseline student PT `--pt` ->
SFT (`--sft` + `--dft` steps) and the distilled one DPT `--pt` -> SFT `--sft` -> DFT `--dft` with the KD weights
`--alpha` / `--beta` / `--gamma`, all evaluated on the seed's held-out split). Unlike bench_recipe.py (one data
seed, student seeds) the seed here sets everything, as the quickstart's does. The teacher's targets are
described by their mean entropy at response rows (nats, top-k plus the tail bucket) and the share of rows
whose top-1 probability exceeds 0.99. Prints a line per seed and the mean and sample standard deviation of
distilled - baseline, then one JSON line. Results: benchmarks/README.md, "Teachers and budgets".
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.reader import CacheReader
from kdcache.toy.recipe import Plan, Recipe, paired_gain


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="toy-teacher", help="checkpoint directory or preset")
    parser.add_argument("--seeds", type=int, nargs="+", default=[20, 21, 22, 23, 24, 25])
    parser.add_argument("--pt", type=int, default=Plan.student_pt_steps, help="both students' PT / DPT steps")
    parser.add_argument("--sft", type=int, default=Plan.student_sft_steps, help="the distilled student's SFT steps")
    parser.add_argument("--dft", type=int, default=Plan.student_dft_steps, help="its DFT steps")
    parser.add_argument("--temperature", type=float, default=1.0, help="the dump's softmax temperature (both roles)")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--out", default="/tmp/kdcache-teachers")
    return parser.parse_args(argv)


def target_sharpness(cache: str, limit: int = 400) -> dict:
    """Mean entropy of the teacher's response rows (top-k plus the tail bucket) and the share of confident rows."""
    reader = CacheReader(cache)
    entropy, top1 = [], []
    for i in range(min(len(reader), limit)):
        logp = reader.read_sample(i)["response_topk_logprobs"].astype(np.float64)
        p = np.exp(logp)                                                   # -inf (underflow) -> probability 0
        tail = np.clip(1.0 - p.sum(-1), 1e-12, None)
        entropy.append(-(p * np.where(p > 0, logp, 0.0)).sum(-1) - tail * np.log(tail))
        top1.append(p.max(-1))
    entropy, top1 = np.concatenate(entropy), np.concatenate(top1)
    return {"entropy_nats": round(float(entropy.mean()), 3), "top1_over_0.99": round(float((top1 > 0.99).mean()), 3)}


def one_seed(args: argparse.Namespace, seed: int, base: Plan = Plan()) -> dict:
    """The recipe of `seed` with `base`'s sizes (the quickstart's) and the arguments' student split and KD settings."""
    plan = replace(base, student_pt_steps=args.pt, student_sft_steps=args.sft, student_dft_steps=args.dft)
    recipe = Recipe(Path(args.out) / f"seed{seed}", plan=plan, seed=seed, progress=False)
    recipe.data()
    caches = recipe.dump(args.teacher, temperature=args.temperature)
    kd = {"alpha": args.alpha, "beta": args.beta, "gamma": args.gamma}
    results = {name: recipe.evaluate(name, recipe.student(scheme, caches, tag=name, kd=kd))
               for name, scheme in (("baseline", "PT-SFT"), ("distilled", "DPT-SFT-DFT"))}
    results["teacher"] = recipe.evaluate("teacher", args.teacher)
    gain = paired_gain(results["baseline"]["correct"], results["distilled"]["correct"])
    return {"seed": seed, **{name: round(r["accuracy"], 4) for name, r in results.items()},
            "gain": round(gain["distilled_minus_baseline"], 4), "paired_se": round(gain["paired_se"], 4),
            "targets": target_sharpness(caches["questions"])}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(args, seed))
        r = rows[-1]
        print(f"seed {seed}: teacher {r['teacher']:.3f} baseline {r['baseline']:.3f} distilled {r['distilled']:.3f} "
              f"gain {r['gain']:+.3f} ± {r['paired_se']:.3f}; targets {r['targets']}", flush=True)
    gains = [r["gain"] for r in rows]
    mean = statistics.mean(gains)
    std = statistics.stdev(gains) if len(gains) > 1 else None
    std_text = "n/a" if std is None else f"{std:.3f}"
    print(f"distilled - baseline over {len(gains)} seeds: mean {mean:+.3f}, std {std_text}, min {min(gains):+.3f}")
    print(json.dumps({"benchmark": "bench_teachers", **{k: v for k, v in vars(args).items() if k != "out"},
                      "gain_mean": round(mean, 4), "gain_std": std if std is None else round(std, 4),
                      "gain_min": min(gains), "seeds_detail": rows,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
