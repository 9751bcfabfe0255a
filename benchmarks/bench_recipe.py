"""The paper's Table 2 at toy scale: held-out accuracy of four training schemes over several seeds.

    python benchmarks/bench_recipe.py [--seeds 0 1 2] [--out /tmp/kdcache-recipe] [--student-steps-factor 1]

One teacher (PT -> SFT) and one pair of caches serve every scheme and seed (as in the paper, one
teacher); each (scheme, seed) trains toy-student from scratch through the scheme's stages with the
quickstart plan's steps, data order seeded by `seed`, and is evaluated on the held-out split by
greedy generation. `--student-steps-factor F` multiplies every student stage's steps (the teacher's
stay); `--teacher-from DIR` reuses the teacher and caches of an earlier run's `--out` DIR (they do
not depend on the student plan or seeds). Prints a table, then one JSON line:
{"schemes": {"PT-SFT": {"mean": .., "std": .., "runs": [..]}, ...}, "teacher": .., ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from kdcache.toy.recipe import SCHEMES, Plan, Recipe


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    factor = args.student_steps_factor
    plan = Plan()
    plan = replace(plan, student_pt_steps=round(factor * plan.student_pt_steps),
                   student_sft_steps=round(factor * plan.student_sft_steps),
                   student_dft_steps=round(factor * plan.student_dft_steps))
    recipe = Recipe(args.out, plan=plan, seed=0, progress=False)
    recipe.data()
    teacher, caches = teacher_and_caches(recipe, args.teacher_from)
    teacher_acc = recipe.evaluate("teacher", teacher)["accuracy"]
    runs, per_type = train_schemes(recipe, caches, args.seeds)
    summary = {scheme: {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "runs": accs} for scheme, accs in runs.items()}
    print_tables(summary, per_type, plan, teacher_acc, len(args.seeds))
    print(json.dumps({"schemes": summary, "teacher": teacher_acc, "seeds": args.seeds,
                      "seconds": round(time.perf_counter() - started, 1), "plan": plan.__dict__}))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/kdcache-recipe")
    parser.add_argument("--student-steps-factor", type=float, default=1.0)
    parser.add_argument("--teacher-from", default=None,
                        help="an earlier run's --out: reuse its teacher and caches (same plan) instead of training")
    return parser.parse_args()


def teacher_and_caches(recipe: Recipe, teacher_from: str | None) -> tuple[str, dict[str, str]]:
    """The teacher checkpoint and the two caches: trained and dumped now, or an earlier run's."""
    if not teacher_from:
        teacher = recipe.teacher()
        return teacher, recipe.dump(teacher)
    earlier = Path(teacher_from)
    caches = {name: str(earlier / "caches" / name) for name in ("captions", "questions")}
    return str(earlier / "runs" / "teacher-sft" / "final"), caches


def train_schemes(recipe: Recipe, caches: dict[str, str], seeds: list[int]):
    """Train and evaluate every (seed, scheme); ({scheme: [accuracy]}, {scheme: [{qtype: accuracy}]})."""
    runs: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    per_type: dict[str, list[dict]] = {scheme: [] for scheme in SCHEMES}
    for seed in seeds:
        for scheme in SCHEMES:
            tag = f"{scheme.lower()}-s{seed}"
            final = recipe.student(scheme, caches, tag=tag, seed=seed)
            result = recipe.evaluate(tag, final)
            runs[scheme].append(result["accuracy"])
            per_type[scheme].append({t: v["accuracy"] for t, v in result["per_type"].items()})
            print(f"{scheme:<12} seed {seed}: {result['accuracy']:.3f}", flush=True)
    return runs, per_type


def print_tables(summary: dict, per_type: dict[str, list[dict]], plan: Plan, teacher_acc: float,
                 num_seeds: int) -> None:
    print(f"\nteacher {teacher_acc:.3f}; {num_seeds} seeds; steps per stage: pt/dpt {plan.student_pt_steps}, "
          f"sft {plan.student_sft_steps} (+{plan.student_dft_steps} without dft), dft {plan.student_dft_steps}; "
          f"batch {plan.batch_size}")
    print(f"{'scheme':<12} {'mean':>6} {'std':>6}  runs")
    for scheme, s in summary.items():
        print(f"{scheme:<12} {s['mean']:>6.3f} {s['std']:>6.3f}  {' '.join(f'{a:.3f}' for a in s['runs'])}")
    types = sorted(per_type["PT-SFT"][0])
    print(f"\nper question type (mean over seeds)\n{'scheme':<12} " + " ".join(f"{t:>9}" for t in types))
    for scheme, rows in per_type.items():
        print(f"{scheme:<12} " + " ".join(f"{statistics.mean(r[t] for r in rows):>9.3f}" for t in types))


if __name__ == "__main__":
    main()
