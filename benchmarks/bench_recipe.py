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

from kdcache.quickstart import SCHEMES, Plan, Recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/kdcache-recipe")
    parser.add_argument("--student-steps-factor", type=float, default=1.0)
    parser.add_argument("--teacher-from", default=None,
                        help="an earlier run's --out: reuse its teacher and caches (same plan) instead of training")
    args = parser.parse_args()

    started = time.perf_counter()
    plan = Plan()
    plan = replace(plan, **{f"student_{s}_steps": round(args.student_steps_factor * getattr(plan, f"student_{s}_steps"))
                            for s in ("pt", "sft", "dft")})
    recipe = Recipe(args.out, plan=plan, seed=0, progress=False)
    recipe.data()
    if args.teacher_from:
        earlier = Path(args.teacher_from)
        teacher = str(earlier / "runs" / "teacher-sft" / "final")
        caches = {name: str(earlier / "caches" / name) for name in ("captions", "questions")}
    else:
        teacher = recipe.teacher()
        caches = recipe.dump(teacher)
    teacher_acc = recipe.evaluate("teacher", teacher)["accuracy"]
    runs: dict[str, list[float]] = {scheme: [] for scheme in SCHEMES}
    per_type: dict[str, list[dict]] = {scheme: [] for scheme in SCHEMES}
    for seed in args.seeds:
        for scheme in SCHEMES:
            tag = f"{scheme.lower()}-s{seed}"
            final = recipe.student(scheme, caches, tag=tag, seed=seed)
            result = recipe.evaluate(tag, final)
            runs[scheme].append(result["accuracy"])
            per_type[scheme].append({t: v["accuracy"] for t, v in result["per_type"].items()})
            print(f"{scheme:<12} seed {seed}: {result['accuracy']:.3f}", flush=True)

    summary = {scheme: {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "runs": accs} for scheme, accs in runs.items()}
    print(f"\nteacher {teacher_acc:.3f}; {len(args.seeds)} seeds; steps per stage: pt/dpt {plan.student_pt_steps}, "
          f"sft {plan.student_sft_steps} (+{plan.student_dft_steps} without dft), dft {plan.student_dft_steps}; "
          f"batch {plan.batch_size}")
    print(f"{'scheme':<12} {'mean':>6} {'std':>6}  runs")
    for scheme, s in summary.items():
        print(f"{scheme:<12} {s['mean']:>6.3f} {s['std']:>6.3f}  {' '.join(f'{a:.3f}' for a in s['runs'])}")
    types = sorted(per_type["PT-SFT"][0])
    print(f"\nper question type (mean over seeds)\n{'scheme':<12} " + " ".join(f"{t:>9}" for t in types))
    for scheme, rows in per_type.items():
        print(f"{scheme:<12} " + " ".join(f"{statistics.mean(r[t] for r in rows):>9.3f}" for t in types))
    print(json.dumps({"schemes": summary, "teacher": teacher_acc, "seeds": args.seeds,
                      "seconds": round(time.perf_counter() - started, 1), "plan": plan.__dict__}))


if __name__ == "__main__":
    main()
