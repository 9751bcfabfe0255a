"""The paper's Table 2 at toy scale: held-out accuracy of four training schemes over several seeds.

    python benchmarks/bench_recipe.py [--seeds 0 1 2] [--out /tmp/kdcache-recipe] [--student-steps-factor 1]
                                      [--codec lossless|compact] [--compare-codecs | --compare-targets]
                                      [--schemes DPT-SFT-DFT ...]

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
"within_one_std": compact mean >= lossless mean - lossless std}}. `--compare-targets` does the same for
`--visual-targets topk` against `sampled` (RS-KD draws, `--draws` 16; response rows top-k in both), at
`--codec`: JSON "targets": {topk|sampled: schemes} and the "comparison" with those two names. `--schemes`
limits the schemes (default all). Caches go to OUT/caches-CODEC (OUT/caches-CODEC-sampled-visual for sampled
visual targets); student runs to OUT/runs/VARIANT-SCHEME-sSEED.
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
TARGETS = ("topk", "sampled")            # --visual-targets of the caches


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
    chosen = variants(args)
    teacher, caches = teacher_and_caches(recipe, args.teacher_from, chosen)
    teacher_acc = recipe.evaluate("teacher", teacher)["accuracy"]
    summaries = {}
    for name, (codec, targets) in chosen.items():
        runs, per_type = train_schemes(recipe, caches[name], args.seeds, args.schemes, name)
        summaries[name] = summarise(runs)
        print(f"\ncaches: --codec {codec} --visual-targets {targets}")
        print_tables(summaries[name], per_type, plan, teacher_acc, len(args.seeds))
    report = {"teacher": teacher_acc, "seeds": args.seeds, "seconds": round(time.perf_counter() - started, 1),
              "plan": plan.__dict__}
    if len(chosen) == 2:
        reference, other = chosen
        report.update({"codecs" if args.compare_codecs else "targets": summaries,
                       "comparison": compare(summaries, reference, other), "codec": args.codec})
        print_comparison(report["comparison"], reference, other, len(args.seeds))
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
    parser.add_argument("--codec", choices=CODECS, default=None, help="the caches' kdcache dump --codec (lossless)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--compare-codecs", action="store_true",
                       help="train every scheme and seed from lossless and from compact caches; compare")
    which.add_argument("--compare-targets", action="store_true",
                       help="train every scheme and seed from top-k and from sampled visual targets; compare")
    args = parser.parse_args(argv)
    if args.compare_codecs and args.codec:
        parser.error("--codec and --compare-codecs exclude each other")
    if not args.compare_codecs:          # with --compare-codecs both codecs are trained: no one codec to name
        args.codec = args.codec or "lossless"
    return args


def variants(args: argparse.Namespace) -> dict[str, tuple[str, str]]:
    """The caches to train from, in order (the first is the comparison's reference): name -> (codec, visual targets)."""
    if args.compare_codecs:
        return {codec: (codec, "topk") for codec in CODECS}
    if args.compare_targets:
        return {targets: (args.codec, targets) for targets in TARGETS}
    return {args.codec: (args.codec, "topk")}


def caches_dir(codec: str, targets: str) -> str:
    return f"caches-{codec}" if targets == "topk" else f"caches-{codec}-{targets}-visual"


def teacher_and_caches(recipe: Recipe, teacher_from: str | None, chosen: dict[str, tuple[str, str]]) -> tuple[str, dict]:
    """The teacher (the stored toy-teacher) and, per variant, the two caches: dumped now, or an earlier run's
    (its OUT/`caches_dir`, or for lossless top-k its OUT/caches, what `Recipe.dump` wrote; dumped if it has neither)."""
    earlier = Path(teacher_from) if teacher_from else None
    teacher = "toy-teacher"                 # the stored toy teacher (kdcache.toy.build); earlier runs used it too
    caches = {}
    for name, (codec, targets) in chosen.items():
        candidates = [] if earlier is None else [earlier / caches_dir(codec, targets)] + (
            [earlier / "caches"] if (codec, targets) == ("lossless", "topk") else [])
        found = [d for d in candidates if (d / "captions" / "manifest.json").exists()]
        caches[name] = ({part: str(found[0] / part) for part in ("captions", "questions")} if found
                        else dump_caches(recipe, teacher, codec, targets))
    return teacher, caches


def dump_caches(recipe: Recipe, teacher: str, codec: str, targets: str = "topk") -> dict[str, str]:
    """`Recipe.dump`'s two caches with `--codec codec --visual-targets targets`, under OUT/`caches_dir`."""
    return recipe.dump(teacher, codec=codec, into=caches_dir(codec, targets), visual_targets=targets)


def train_schemes(recipe: Recipe, caches: dict[str, str], seeds: list[int], schemes: list[str], name: str):
    """Train and evaluate every (seed, scheme); ({scheme: [accuracy]}, {scheme: [{qtype: accuracy}]})."""
    runs: dict[str, list[float]] = {scheme: [] for scheme in schemes}
    per_type: dict[str, list[dict]] = {scheme: [] for scheme in schemes}
    for seed in seeds:
        for scheme in schemes:
            tag = f"{name}-{scheme.lower()}-s{seed}"
            final = recipe.student(scheme, caches, tag=tag, seed=seed)
            result = recipe.evaluate(tag, final)
            runs[scheme].append(result["accuracy"])
            per_type[scheme].append({t: v["accuracy"] for t, v in result["per_type"].items()})
            print(f"{name:<9} {scheme:<12} seed {seed}: {result['accuracy']:.3f}", flush=True)
    return runs, per_type


def summarise(runs: dict[str, list[float]]) -> dict:
    """{scheme: {mean, std (sample; 0 for one run), runs}}."""
    return {scheme: {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                     "runs": accs} for scheme, accs in runs.items()}


def compare(summaries: dict[str, dict], reference: str, other: str) -> dict:
    """Per scheme: both variants' mean and std, other - reference, and whether other is within one of the
    reference's standard deviations of it (issue 10: other mean >= reference mean - reference std)."""
    out = {}
    for scheme, ref in summaries[reference].items():
        got = summaries[other][scheme]
        out[scheme] = {reference: {"mean": ref["mean"], "std": ref["std"]},
                       other: {"mean": got["mean"], "std": got["std"]},
                       "difference": got["mean"] - ref["mean"],
                       "within_one_std": got["mean"] >= ref["mean"] - ref["std"]}
    return out


def print_comparison(comparison: dict, reference: str, other: str, num_seeds: int) -> None:
    print(f"\n{other} vs {reference} caches, {num_seeds} seeds (within: {other} mean >= {reference} mean - "
          f"{reference} std)")
    print(f"{'scheme':<12} {reference:>15} {other:>15} {'diff':>7}  within")
    for scheme, c in comparison.items():
        pair = [f"{c[k]['mean']:.3f} ± {c[k]['std']:.3f}" for k in (reference, other)]
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
