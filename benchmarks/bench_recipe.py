"""The paper's Table 2 at toy scale: held-out accuracy of four training schemes over several seeds.

    python benchmarks/bench_recipe.py [--seeds 0 1 2] [--out /tmp/kdcache-recipe] [--student-steps-factor 1]
                                      [--codec lossless|compact | --compare-codecs] [--schemes DPT-SFT-DFT ...]

The stored toy teacher (`python -m kdcache.toy.build`) and one pair of caches serve every scheme and
seed (as in the paper, one teacher); each (scheme, seed) trains toy-student (stored tower and
text-pretrained LM, fresh projector) through the scheme's stages with the quickstart plan's steps,
data order seeded by `seed`, and is evaluated on the held-out split by greedy generation.
`--student-steps-factor F` multiplies every student stage's steps; `--teacher-from DIR` reuses the
caches of an earlier run's `--out` DIR (they do not depend on the student plan or seeds). Prints a table, then one JSON line:
{"schemes": {"PT-SFT": {"mean": .., "std": .., "runs": [..]}, ...}, "teacher": .., "codec": .., ...}

`--codec` (default lossless, the dump's default) is the caches' `kdcache dump --codec`. `--compare-codecs`
dumps both caches with each codec from the same teacher and trains every (scheme, seed) from each (issue 10:
a student distilled from a `compact` cache should reach the accuracy of one from a `lossless` cache within
one standard deviation over 3 seeds); its JSON line has "codecs": {codec: schemes} and "comparison":
{scheme: {"lossless": {mean, std}, "compact": {mean, std}, "difference": compact - lossless mean,
"within_one_std": compact mean >= lossless mean - lossless std}}. `--schemes` limits the schemes (default all).
Caches go to OUT/caches-CODEC (`Recipe.dump` takes no codec, so `dump_caches` here repeats its settings
with `codec=`); student runs to OUT/runs/CODEC-SCHEME-sSEED.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from kdcache.toy.recipe import SCHEMES, Plan, Recipe

CODECS = ("lossless", "compact")


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
    codecs = list(CODECS) if args.compare_codecs else [args.codec]
    teacher, caches = teacher_and_caches(recipe, args.teacher_from, codecs)
    teacher_acc = recipe.evaluate("teacher", teacher)["accuracy"]
    summaries = {}
    for codec in codecs:
        runs, per_type = train_schemes(recipe, caches[codec], args.seeds, args.schemes, codec)
        summaries[codec] = summarise(runs)
        print(f"\ncaches: --codec {codec}")
        print_tables(summaries[codec], per_type, plan, teacher_acc, len(args.seeds))
    report = {"teacher": teacher_acc, "seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1),
              "plan": plan.__dict__}
    if args.compare_codecs:
        report.update(codecs=summaries, comparison=compare_codecs(summaries["lossless"], summaries["compact"]))
        print_comparison(report["comparison"], len(args.seeds))
    else:
        report.update(schemes=summaries[args.codec], codec=args.codec)
    print(json.dumps(report))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="/tmp/kdcache-recipe")
    parser.add_argument("--student-steps-factor", type=float, default=1.0)
    parser.add_argument("--teacher-from", default=None,
                        help="an earlier run's --out: reuse its caches (same data) instead of dumping")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--codec", choices=CODECS, default="lossless", help="the caches' kdcache dump --codec")
    which.add_argument("--compare-codecs", action="store_true",
                       help="train every scheme and seed from lossless and from compact caches; compare")
    return parser.parse_args(argv)


def teacher_and_caches(recipe: Recipe, teacher_from: str | None, codecs: list[str]) -> tuple[str, dict]:
    """The teacher (the stored toy-teacher) and, per codec, the two caches: dumped now, or an earlier run's
    (its OUT/caches-CODEC, or for lossless its OUT/caches, what `Recipe.dump` wrote; dumped if it has neither)."""
    earlier = Path(teacher_from) if teacher_from else None
    teacher = "toy-teacher"                 # the stored toy teacher (kdcache.toy.build); earlier runs used it too
    caches = {}
    for codec in codecs:
        candidates = [] if earlier is None else [earlier / f"caches-{codec}"] + (
            [earlier / "caches"] if codec == "lossless" else [])
        found = [d for d in candidates if (d / "captions" / "manifest.json").exists()]
        caches[codec] = ({name: str(found[0] / name) for name in ("captions", "questions")} if found
                         else dump_caches(recipe, teacher, codec))
    return teacher, caches


def dump_caches(recipe: Recipe, teacher: str, codec: str) -> dict[str, str]:
    """`Recipe.dump`'s two caches with `--codec codec`, under OUT/caches-CODEC."""
    return recipe.dump(teacher, codec=codec, into=f"caches-{codec}")


def train_schemes(recipe: Recipe, caches: dict[str, str], seeds: list[int], schemes: list[str], codec: str):
    """Train and evaluate every (seed, scheme); ({scheme: [accuracy]}, {scheme: [{qtype: accuracy}]})."""
    runs: dict[str, list[float]] = {scheme: [] for scheme in schemes}
    per_type: dict[str, list[dict]] = {scheme: [] for scheme in schemes}
    for seed in seeds:
        for scheme in schemes:
            tag = f"{codec}-{scheme.lower()}-s{seed}"
            final = recipe.student(scheme, caches, tag=tag, seed=seed)
            result = recipe.evaluate(tag, final)
            runs[scheme].append(result["accuracy"])
            per_type[scheme].append({t: v["accuracy"] for t, v in result["per_type"].items()})
            print(f"{codec:<9} {scheme:<12} seed {seed}: {result['accuracy']:.3f}", flush=True)
    return runs, per_type


def summarise(runs: dict[str, list[float]]) -> dict:
    """{scheme: {mean, std (sample; 0 for one run), runs}}."""
    return {scheme: {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "runs": accs} for scheme, accs in runs.items()}


def compare_codecs(lossless: dict, compact: dict) -> dict:
    """Per scheme: both codecs' mean and std, compact - lossless, and whether compact is within one of
    lossless's standard deviations of it (issue 10: compact mean >= lossless mean - lossless std)."""
    out = {}
    for scheme, ref in lossless.items():
        got = compact[scheme]
        out[scheme] = {"lossless": {"mean": ref["mean"], "std": ref["std"]},
                       "compact": {"mean": got["mean"], "std": got["std"]},
                       "difference": got["mean"] - ref["mean"],
                       "within_one_std": got["mean"] >= ref["mean"] - ref["std"]}
    return out


def print_comparison(comparison: dict, num_seeds: int) -> None:
    print(f"\ncompact vs lossless caches, {num_seeds} seeds (within: compact mean >= lossless mean - lossless std)")
    print(f"{'scheme':<12} {'lossless':>15} {'compact':>15} {'diff':>7}  within")
    for scheme, c in comparison.items():
        pair = [f"{c[k]['mean']:.3f} ± {c[k]['std']:.3f}" for k in ("lossless", "compact")]
        print(f"{scheme:<12} {pair[0]:>15} {pair[1]:>15} {c['difference']:>+7.3f}  "
              f"{'yes' if c['within_one_std'] else 'no'}")


def print_tables(summary: dict, per_type: dict[str, list[dict]], plan: Plan, teacher_acc: float,
                 num_seeds: int) -> None:
    print(f"\nteacher {teacher_acc:.3f}; {num_seeds} seeds; steps per stage: pt/dpt {plan.student_pt_steps}, "
          f"sft {plan.student_sft_steps} (+{plan.student_dft_steps} without dft), dft {plan.student_dft_steps}; "
          f"batch {plan.batch_size}")
    print(f"{'scheme':<12} {'mean':>6} {'std':>6}  runs")
    for scheme, s in summary.items():
        print(f"{scheme:<12} {s['mean']:>6.3f} {s['std']:>6.3f}  {' '.join(f'{a:.3f}' for a in s['runs'])}")
    types = sorted(next(iter(per_type.values()))[0])
    print(f"\nper question type (mean over seeds)\n{'scheme':<12} " + " ".join(f"{t:>9}" for t in types))
    for scheme, rows in per_type.items():
        print(f"{scheme:<12} " + " ".join(f"{statistics.mean(r[t] for r in rows):>9.3f}" for t in types))


if __name__ == "__main__":
    main()
