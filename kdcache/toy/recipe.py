"""`kdcache quickstart`: the whole LLaVA-KD recipe on the embedded toy world, on a CPU, in minutes.

    toy data -> toy-teacher (stored, trained: text pretraining, PT, SFT; or --train-teacher)
             -> dump (captions: plain, questions: qwen2_base)
             -> baseline student PT -> SFT
             -> distilled student DPT -> SFT -> DFT
             -> greedy evaluation of all three on held-out images -> report.json, report.png

Both students start from toy-student (the stored pretrained tower and text-pretrained LM, a fresh
projector), as the paper's start from pretrained Qwen LLMs. Every step calls the same functions as
`kdcache dump` / `kdcache train` / `kdcache eval`, with the same config dataclasses; only the sizes
are small. The job packages are imported inside the function so that `kdcache` (the core) does not
depend on them at import time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from kdcache.files import write_json_atomic
from kdcache.toy import data as toy_data
from kdcache.toy.build import BuildPlan


@dataclass(frozen=True)
class Plan:
    """Sizes of the toy run. PT and DPT get equal steps; a scheme without DFT gives its steps to SFT,
    so every scheme trains the student for the same number of steps on the same data."""

    num_train: int = 1500
    num_eval: int = 1000                  # held-out scenes (~1,750 questions): paired SE of the gain ~0.012
    turns: int | None = None              # questions per train scene (toy_data.generate); None: 1-3 at random
    batch_size: int = 16
    teacher_pt_steps: int = BuildPlan.teacher_pt_steps       # --train-teacher only: the stored teacher's steps
    teacher_binding_steps: int = BuildPlan.teacher_binding_steps
    teacher_sft_steps: int = BuildPlan.teacher_sft_steps
    teacher_captions: bool = BuildPlan.teacher_captions
    teacher_batch_size: int = BuildPlan.teacher_batch_size
    student_pt_steps: int = 60
    student_sft_steps: int = 50           # the distilled student's SFT; the baseline's is SFT + DFT steps (300)
    student_dft_steps: int = 250          # most of the budget with the teacher's targets (docs/decisions.md)
    lr_pt: float = 1e-3                   # projector-only stages (pt, dpt), as the paper
    lr_ft: float = 1e-3                   # full-model stages: tiny LMs, a few hundred steps; far above
                                          # the paper's 2e-5 for billions of parameters
    topk: int = 64
    num_workers: int = 0


SCHEMES = {                     # the paper's Table 2: which student stages, in order
    "PT-SFT": ("pt", "sft"),
    "DPT-SFT": ("dpt", "sft"),
    "PT-SFT-DFT": ("pt", "sft", "dft"),
    "DPT-SFT-DFT": ("dpt", "sft", "dft"),
}


class Recipe:
    """The toy world's pieces, each through the real jobs: data, teacher, caches, students, evaluation."""

    def __init__(self, out: str | Path, *, plan: Plan = Plan(), seed: int = 0, progress: bool = True):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()        # per-checkpoint load/save bars: noise at toy sizes
        self.out, self.plan, self.seed, self.progress = Path(out), plan, seed, progress
        self.seconds: dict[str, float] = {}
        self.cache_bytes: dict[str, int] = {}         # cache name -> bytes of its shards (from the manifest)

    def timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 1)
        return result

    def data(self) -> None:
        """Generate the toy world under out/data; every later step reads it from `self.world`."""
        plan = self.plan
        self.world = self.timed("data", toy_data.generate, self.out / "data", num_train=plan.num_train,
                                num_eval=plan.num_eval, seed=self.seed, turns=plan.turns)

    def train(self, name: str, stage: str, student: str, steps: int, *, seed: int | None = None,
              batch_size: int | None = None, **source) -> str:
        """One `kdcache train` stage into out/runs/NAME (batch: the plan's students' unless given); returns RUN/final."""
        from student_train.config import TrainConfig
        from student_train.train import train

        plan = self.plan
        lr = plan.lr_pt if stage in ("pt", "dpt") else plan.lr_ft
        batch = batch_size or plan.batch_size
        cfg = TrainConfig(stage=stage, student=str(student), out=str(self.out / "runs" / name), lr=lr,
                          batch_size=batch, global_batch=batch, epochs=1000, max_steps=steps,
                          seed=self.seed if seed is None else seed, device="cpu", num_workers=plan.num_workers,
                          save_every=10**9, progress=self.progress, **source)
        return str(self.timed(name, train, cfg))

    def teacher(self, init: str) -> str:
        """Checkpoint `init` (a text-pretrained teacher, fresh projector) trained PT (captions), then SFT on the
        questions about scenes of two or more objects (`teacher_binding_steps`; where binding attributes to
        objects over the image tokens is learned, docs/decisions.md "Visual binding"), then SFT on all the
        questions and, with `teacher_captions`, the captions (the stored teacher's last SFT had none: it answers
        better, 0.888 against 0.825, and forgets the captions, whose targets the students' DPT then follows;
        docs/decisions.md), with the students' trainer."""
        world, plan = self.world, self.plan
        images = str(world["images_dir"])
        batch = plan.teacher_batch_size
        model = self.train("teacher-pt", "pt", init, plan.teacher_pt_steps, batch_size=batch,
                           data=str(world["captions"]), images=images)
        if plan.teacher_binding_steps:
            several = toy_data.several_objects(world["train"], world["out_dir"] / "several.json")
            model = self.train("teacher-binding", "sft", model, plan.teacher_binding_steps, batch_size=batch,
                               data=str(several), images=images)
        last = world["teacher"] if plan.teacher_captions else world["train"]       # questions (+ captions)
        return self.train("teacher-sft", "sft", model, plan.teacher_sft_steps, batch_size=batch,
                          data=str(last), images=images)

    def dump(self, teacher: str, *, codec: str = "lossless", into: str = "caches",
             visual_targets: str = "topk", temperature: float = 1.0) -> dict[str, str]:
        """Two caches through `kdcache dump --codec codec --visual-targets visual_targets --temperature
        temperature` under out/INTO: captions (plain), questions (qwen2_base)."""
        from teacher_dump.config import DumpConfig
        from teacher_dump.dump import dump

        caches = {}
        for name, template in (("captions", "plain"), ("questions", "qwen2_base")):
            source = self.world["captions" if name == "captions" else "train"]
            cfg = DumpConfig(teacher=teacher, data=str(source), images=str(self.world["images_dir"]),
                             out=str(self.out / into / name), template=template, topk_response=self.plan.topk,
                             topk_visual=self.plan.topk, batch_size=32, device="cpu", dtype="float32",
                             progress=self.progress, codec=codec, visual_targets=visual_targets,
                             temperature_response=temperature, temperature_visual=temperature)
            label = f"dump-{name}" if into == "caches" else f"dump-{into}-{name}"
            manifest = self.timed(label, dump, cfg)
            self.cache_bytes[name if into == "caches" else f"{into}/{name}"] = manifest["stats"]["num_bytes"]
            caches[name] = cfg.out
        return caches

    def student(self, scheme: str, caches: dict[str, str], *, tag: str, seed: int | None = None,
                kd: dict | None = None) -> str:
        """Train toy-student through a scheme's stages (all from the caches); returns the final checkpoint.
        `kd` (alpha / beta / gamma) goes to the distilling stages' TrainConfig; default: TrainConfig's."""
        plan, model = self.plan, "toy-student"
        stages = SCHEMES[scheme]
        # Every scheme gets the same number of steps: without a DFT stage, SFT runs DFT's steps too.
        sft_steps = plan.student_sft_steps + (0 if "dft" in stages else plan.student_dft_steps)
        steps = {"pt": plan.student_pt_steps, "dpt": plan.student_pt_steps, "sft": sft_steps,
                 "dft": plan.student_dft_steps}
        for stage in stages:
            cache = caches["captions" if stage in ("pt", "dpt") else "questions"]
            weights = (kd or {}) if stage in ("dpt", "dft") else {}
            model = self.train(f"{tag}-{stage}", stage, model, steps[stage], seed=seed, cache=cache, **weights)
        return model

    def evaluate(self, name: str, checkpoint: str) -> dict:
        from kdcache.evaluate import evaluate_bundle
        from kdcache.models import load_bundle

        return self.timed(f"eval-{name}", evaluate_bundle, load_bundle(checkpoint), self.world["eval"],
                          self.world["images_dir"], template="qwen2_base", progress=self.progress, per_question=True)


def run_quickstart(out: str | Path, *, seed: int = 0, plan: Plan = Plan(), progress: bool = True,
                   train_teacher: bool = False) -> dict:
    """Run the recipe under `out`; returns the report (also written to out/report.json).

    The teacher is the stored toy-teacher, or with `train_teacher` one trained now from a freshly
    text-pretrained LM on this seed's data (`kdcache.toy.build`'s steps; several minutes more).
    """
    recipe = Recipe(out, plan=plan, seed=seed, progress=progress)
    recipe.data()
    teacher = recipe.timed("teacher-lm", _pretrained_teacher, recipe.out, progress) if train_teacher else "toy-teacher"
    if train_teacher:
        teacher = recipe.teacher(teacher)
    caches = recipe.dump(teacher)
    models = {"teacher": teacher,
              "baseline": recipe.student("PT-SFT", caches, tag="baseline"),
              "distilled": recipe.student("DPT-SFT-DFT", caches, tag="distilled")}
    results = {name: recipe.evaluate(name, checkpoint) for name, checkpoint in models.items()}
    report = {"seed": seed, "plan": plan.__dict__, "models": models,
              "accuracy": {name: r["accuracy"] for name, r in results.items()},
              "per_type": {name: {t: v["accuracy"] for t, v in r["per_type"].items()} for name, r in results.items()},
              "num_questions": results["teacher"]["num_questions"],
              "gain": paired_gain(results["baseline"]["correct"], results["distilled"]["correct"]),
              "correct": {name: [int(hit) for hit in r["correct"]] for name, r in results.items()},
              "seconds": recipe.seconds,
              "cache_bytes": recipe.cache_bytes, "environment": environment()}
    recipe.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(recipe.out / "report.json", report)
    write_report_png(recipe.out, report)
    print(format_table(report))
    return report


def paired_gain(baseline: list[bool], distilled: list[bool]) -> dict:
    """Distilled minus baseline accuracy over the same questions, with the standard error of that paired
    difference (the sample standard deviation of distilled_i - baseline_i over sqrt(n); None below two
    questions) and the number of questions exactly one of the two answers right."""
    import math

    diffs = [int(d) - int(b) for b, d in zip(baseline, distilled, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1) / n) if n > 1 else None
    return {"distilled_minus_baseline": mean, "paired_se": se, "discordant": sum(x != 0 for x in diffs),
            "num_questions": n}


def environment() -> dict:
    """What the numbers depend on besides the seed: library versions, CPU, threads (docs/decisions.md, "Toy world")."""
    import platform

    import tokenizers
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu_model() or platform.processor() or "unknown",
            "threads": torch.get_num_threads()}


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo; None where there is none (also used by benchmarks/common.py)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _pretrained_teacher(out: Path, progress: bool) -> str:
    """The stored text-pretrained toy-teacher LM on the stored tower, fresh projector; saved under out."""
    from kdcache.models import save_bundle
    from kdcache.toy.models import load_toy

    path = out / "runs" / "teacher-init"
    save_bundle(load_toy("toy-teacher", start="teacher-lm"), path, stages=[])
    return str(path)


def format_table(report: dict) -> str:
    types = sorted(report["per_type"]["teacher"])
    header = f"{'model':<10} {'overall':>8} " + " ".join(f"{t:>9}" for t in types)
    lines = [f"held-out exact-match accuracy ({report['num_questions']} questions)", header, "-" * len(header)]
    for name in ("teacher", "baseline", "distilled"):
        lines.append(f"{name:<10} {report['accuracy'][name]:>8.3f} "
                     + " ".join(f"{report['per_type'][name][t]:>9.3f}" for t in types))
    gain = report["gain"]
    se = "" if gain["paired_se"] is None else f" ± {gain['paired_se']:.3f} (paired standard error)"
    lines.append(f"distilled - baseline: {gain['distilled_minus_baseline']:+.3f}{se}; {gain['discordant']} of "
                 f"{gain['num_questions']} questions answered right by one student only")
    lines.append(f"total {sum(report['seconds'].values()):.0f} s: "
                 + ", ".join(f"{k} {v:.0f}s" for k, v in report["seconds"].items()))
    return "\n".join(lines)


STUDENT_RUNS = {"baseline": ("pt", "sft"), "distilled": ("dpt", "sft", "dft")}
PARTS = {"ce": "-", "kl_response": "--", "kl_visual": ":", "relation": "-."}


def write_report_png(out: Path, report: dict) -> None:
    """Left: both students' loss parts (CE and KD) over their stages, one step axis. Right: accuracy per type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 4.8))
    for student, color in (("baseline", "tab:blue"), ("distilled", "tab:orange")):
        offset = 0
        for stage in STUDENT_RUNS[student]:
            path = out / "runs" / f"{student}-{stage}" / "metrics.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            steps = [offset + r["step"] for r in rows]
            for part, style in PARTS.items():
                values = [r[part] for r in rows]
                if any(values):
                    curves.plot(steps, values, style, color=color, lw=1, label=f"{student} {stage} {part}")
            offset = steps[-1] if steps else offset
            curves.axvline(offset, color=color, alpha=0.2)
    curves.set(xlabel="student optimizer step (stages in sequence)", ylabel="loss part", yscale="log",
               title="student training: CE (solid) and KD parts (dashed/dotted)")
    curves.legend(fontsize=6, ncol=2)
    _accuracy_bars(bars, report)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=100)
    plt.close(fig)


def _accuracy_bars(ax, report: dict) -> None:
    """Grouped bars: overall and per question type, for teacher, baseline and distilled."""
    names = ["teacher", "baseline", "distilled"]
    groups = ["overall", *sorted(report["per_type"]["teacher"])]
    width = 0.27
    for i, (name, color) in enumerate(zip(names, ("grey", "tab:blue", "tab:orange"))):
        values = [report["accuracy"][name] if g == "overall" else report["per_type"][name][g] for g in groups]
        xs = [x + (i - 1) * width for x in range(len(groups))]
        ax.bar(xs, values, width, color=color, label=f"{name} ({report['accuracy'][name]:.3f})")
        for x, v in zip(xs, values):
            ax.text(x, v + 0.01, f"{v:.2f}", ha="center", fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylim=(0, 1.08), title=f"held-out exact-match accuracy ({report['num_questions']} questions)")
    ax.legend(fontsize=7, loc="lower right")


def small_plan() -> Plan:
    """A plan that exercises every step in seconds (tests)."""
    return replace(Plan(), num_train=24, num_eval=8, batch_size=4, teacher_pt_steps=2, teacher_binding_steps=2,
                   teacher_sft_steps=2, teacher_batch_size=4, student_pt_steps=2, student_sft_steps=2,
                   student_dft_steps=2, topk=8)
