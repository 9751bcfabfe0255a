"""Build the toy world's stored weights from code and seeds: ``python -m kdcache.toy.build``.

    tower        `pretrain.pretrain_tower` from the TOWER_SEED initialisation                  -> tower
    student-lm   toy-student's LM, text-only `pretrain.pretrain_lm`                              -> student-lm
    teacher-lm   toy-teacher's LM, the same way                                                 -> teacher-lm
    teacher      teacher-lm joined to the tower, then PT (projector only, captions), SFT on the
                 questions about 2-3-object scenes (`teacher_binding_steps`) and SFT on the
                 questions (and the captions with `teacher_captions`), through `kdcache train` on the toy data
                 of seed `teacher_data_seed` (not a quickstart seed), evaluated on its held-out
                 split                                                                            -> teacher

Writes kdcache/toy/weights/ (or --out); `--step` runs some steps only (each reads what the earlier
ones wrote, so steps can run in separate processes). Prints one JSON line: the plan, the sha256s,
the teacher's held-out accuracy and the seconds per step. Deterministic on a given machine; on
another CPU, float summation order differs and the rebuilt weights are equivalent, not bit-equal
(docs/decisions.md, "Toy world").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kdcache.toy import weights
from kdcache.toy.pretrain import LMPlan, TowerPlan

STEPS = ("tower", "student-lm", "teacher-lm", "teacher")


@dataclass(frozen=True)
class BuildPlan:
    tower: TowerPlan = TowerPlan()
    student_lm: tuple[LMPlan, ...] = (LMPlan(),)      # phases, each from the float16 weights of the one before
    # The teacher's LM binds attributes to objects in text (docs/decisions.md, "Visual binding"): binding
    # dialogues from the stream "bindtrain" without the system prompt, then 800 steps of scene dialogues.
    teacher_lm: tuple[LMPlan, ...] = (
        LMPlan(task="binding", decay=False, describe=0.0, stream="bindtrain", system_prompt=False),
        LMPlan(steps=800, lr=5e-4, task="scenes", decay=False, stream="contC"))
    teacher_data_seed: int = 100
    teacher_num_train: int = 10000
    teacher_turns: int | None = 5     # questions per training scene (toy_data.generate); None: 1-3 at random
    teacher_pt_steps: int = 200
    teacher_binding_steps: int = 3000  # SFT on the scenes of 2-3 objects before the last SFT (Recipe.teacher)
    teacher_sft_steps: int = 1500
    teacher_captions: bool = False    # the last SFT on the questions and the captions; False: the questions only
    teacher_batch_size: int = 32
    lr_pt: float = 2e-3
    lr_sft: float = 1e-3


def build(out: Path, plan: BuildPlan = BuildPlan(), *, steps=STEPS, work: Path | None = None,
          progress: bool = True) -> dict:
    """Run `steps` (in STEPS order) into `out`; returns the summary (also the JSON line of the command).

    Runs on one CPU thread: the tower trained with 1 and with 2 threads differed by up to 0.41 in a weight
    (summation order, amplified by training), so a fixed thread count is what makes a rebuild equal."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _build(out, plan, steps, work, progress)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, plan: BuildPlan, steps, work: Path | None, progress: bool) -> dict:
    summary: dict = {"plan": asdict(plan), "sha256": {}, "seconds": {}}
    for step in (s for s in STEPS if s in steps):
        started = time.perf_counter()
        if step == "tower":
            summary["sha256"][step] = _tower(out, plan, progress)
        elif step in ("student-lm", "teacher-lm"):
            preset = "toy-student" if step == "student-lm" else "toy-teacher"
            lm_plans = plan.student_lm if step == "student-lm" else plan.teacher_lm
            bundle = text_pretrained(preset, lm_plans, progress=progress)
            summary["sha256"][step] = weights.save(weights.language_model_state(bundle.model), step, out,
                                                   dtype=_dtype("float16"),
                                                   build={"plan": [asdict(p) for p in lm_plans]})
        else:
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                trained, accuracy = _train_teacher(out, Path(tmp), plan, progress)
            summary["teacher_accuracy"] = accuracy
            summary["sha256"][step] = weights.save(weights.trained_state(trained.model), step, out,
                                                   dtype=_dtype("float16"), build={"plan": asdict(plan),
                                                                                   "accuracy": accuracy})
        summary["seconds"][step] = round(time.perf_counter() - started, 1)
    return summary


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _tower(out: Path, plan: BuildPlan, progress: bool) -> str:
    from kdcache.models import siglip_image_processor
    from kdcache.toy.models import TOY_VISION, toy_vision_tower
    from kdcache.toy.pretrain import pretrain_tower

    tower = toy_vision_tower()
    losses = pretrain_tower(tower, siglip_image_processor(TOY_VISION["image_size"]), plan.tower, progress=progress)
    return weights.save(tower.state_dict(), "tower", out, dtype=_dtype("float32"),
                        build={"plan": asdict(plan.tower), "loss_first_last": [losses[0], losses[-1]]})


def text_pretrained(name: str, lm_plans: tuple[LMPlan, ...], *, progress: bool = True):
    """Preset `name`'s architecture (code-initialised tower, fresh projector), its LM pretrained on text by
    `lm_plans` in turn, each with a fresh optimizer from the float16 rounding of the weights before it (as if
    stored and loaded between them)."""
    import torch

    from transformers import Qwen2ForCausalLM

    from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
    from kdcache.toy.pretrain import pretrain_lm

    preset = TOY_PRESETS[name]
    bundle = build_toy_bundle(preset["text"], seed=preset["seed"], source=name)
    causal_lm = Qwen2ForCausalLM(bundle.model.config.text_config)       # a view sharing the LLaVA model's modules
    causal_lm.model, causal_lm.lm_head = bundle.model.model.language_model, bundle.model.lm_head
    for i, lm_plan in enumerate(lm_plans):
        if i:
            with torch.no_grad():
                for tensor in causal_lm.state_dict().values():
                    tensor.copy_(tensor.half())
        pretrain_lm(causal_lm, bundle.tokenizer, lm_plan, progress=progress)
    return bundle


def _train_teacher(out: Path, tmp: Path, plan: BuildPlan, progress: bool):
    """PT then SFT of the text-pretrained teacher through `kdcache train`; (bundle, held-out accuracy)."""
    from kdcache.models import load_bundle, save_bundle
    from kdcache.toy.models import load_toy
    from kdcache.toy.recipe import Plan, Recipe

    save_bundle(load_toy("toy-teacher", stored=out, start="teacher-lm"), tmp / "init", stages=[])
    recipe = Recipe(tmp, plan=replace(Plan(), num_train=plan.teacher_num_train, turns=plan.teacher_turns,
                                      teacher_pt_steps=plan.teacher_pt_steps,
                                      teacher_binding_steps=plan.teacher_binding_steps,
                                      teacher_sft_steps=plan.teacher_sft_steps,
                                      teacher_captions=plan.teacher_captions,
                                      teacher_batch_size=plan.teacher_batch_size, lr_pt=plan.lr_pt,
                                      lr_ft=plan.lr_sft),
                    seed=plan.teacher_data_seed, progress=progress)
    recipe.data()
    final = recipe.teacher(str(tmp / "init"))
    accuracy = recipe.evaluate("teacher", final)
    return load_bundle(final), {"overall": accuracy["accuracy"],
                                **{t: v["accuracy"] for t, v in accuracy["per_type"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=weights.WEIGHTS_DIR)
    parser.add_argument("--step", action="append", choices=STEPS, help="run this step only (repeatable)")
    parser.add_argument("--work", type=Path, default=None, help="where the temporary teacher runs go")
    args = parser.parse_args()
    print(json.dumps(build(args.out, steps=args.step or STEPS, work=args.work)))


if __name__ == "__main__":
    main()
