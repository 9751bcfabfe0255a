"""Build the toy world's stored weights from code and seeds: ``python -m kdcache.toy.build``.

    1. the tower: `pretrain.pretrain_tower` from the TOWER_SEED initialisation      -> tower
    2. toy-student's LM: text-only `pretrain.pretrain_lm`                            -> student-lm
    3. toy-teacher: its LM pretrained on text the same way, joined to the tower, then
       PT (projector only, captions) and SFT (questions and captions) through `kdcache train`
       on the seed-0 toy data                                                         -> teacher

Writes kdcache/toy/weights/ (or --out) and prints one JSON line with the plan, the sha256s, the
teacher's held-out accuracy and the seconds per step. Deterministic on a given machine; on another
CPU, float summation order differs and the rebuilt weights are equivalent, not bit-equal
(tests/test_toy_build.py compares behaviour, docs/decisions.md "Toy world").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from kdcache.toy import weights
from kdcache.toy.pretrain import LMPlan, TowerPlan


@dataclass(frozen=True)
class BuildPlan:
    tower: TowerPlan = TowerPlan()
    student_lm: LMPlan = LMPlan(steps=600)
    teacher_lm: LMPlan = LMPlan(steps=600)
    teacher_num_train: int = 3000
    teacher_pt_steps: int = 200
    teacher_sft_steps: int = 1200
    lr_pt: float = 2e-3
    lr_sft: float = 1e-3
    extra: dict = field(default_factory=dict)


def build(out: Path, plan: BuildPlan = BuildPlan(), *, work: Path | None = None, progress: bool = True) -> dict:
    """Run steps 1-3 into `out`; returns the summary (also the JSON line of the command)."""
    from kdcache.models import siglip_image_processor
    from kdcache.toy.models import TOY_VISION, toy_vision_tower
    from kdcache.toy.pretrain import pretrain_tower

    seconds: dict[str, float] = {}
    started = time.perf_counter()
    tower = toy_vision_tower()
    pretrain_tower(tower, siglip_image_processor(TOY_VISION["image_size"]), plan.tower, progress=progress)
    summary = {"plan": asdict(plan), "sha256": {}}
    summary["sha256"]["tower"] = weights.save(tower.state_dict(), "tower", out, dtype=_f32())
    seconds["tower"] = time.perf_counter() - started
    student = pretrained_lm("toy-student", plan.student_lm, tower_dir=out, progress=progress)
    summary["sha256"]["student-lm"] = weights.save(weights.language_model_state(student.model), "student-lm", out,
                                                   dtype=_f16())
    seconds["student_lm"] = time.perf_counter() - started - sum(seconds.values())
    teacher = pretrained_lm("toy-teacher", plan.teacher_lm, tower_dir=out, progress=progress)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        trained, accuracy = _train_teacher(teacher, Path(tmp), plan, progress)
    seconds["teacher"] = time.perf_counter() - started - sum(seconds.values())
    summary.update(teacher_accuracy=accuracy, seconds={k: round(v, 1) for k, v in seconds.items()})
    summary["sha256"]["teacher"] = weights.save(weights.trained_state(trained.model), "teacher", out,
                                                dtype=_f16(), build=summary)
    return summary


def _f16():
    import torch

    return torch.float16


def _f32():
    import torch

    return torch.float32


def pretrained_lm(name: str, lm_plan: LMPlan, *, tower_dir: Path = weights.WEIGHTS_DIR, progress: bool = True):
    """Preset `name`'s architecture on the tower stored in `tower_dir`, its LM pretrained on text (fresh projector)."""
    from transformers import Qwen2ForCausalLM

    from kdcache.toy.models import TOY_PRESETS, build_toy_bundle
    from kdcache.toy.pretrain import pretrain_lm

    preset = TOY_PRESETS[name]
    bundle = build_toy_bundle(preset["text"], seed=preset["seed"], source=name)
    bundle.model.model.vision_tower.load_state_dict(weights.load("tower", tower_dir))
    causal_lm = Qwen2ForCausalLM(bundle.model.config.text_config)       # a view sharing the LLaVA model's modules
    causal_lm.model, causal_lm.lm_head = bundle.model.model.language_model, bundle.model.lm_head
    pretrain_lm(causal_lm, bundle.tokenizer, lm_plan, progress=progress)
    return bundle


def _train_teacher(bundle, tmp: Path, plan: BuildPlan, progress: bool):
    """PT then SFT of the pretrained teacher on seed-0 toy data through `kdcache train`; (bundle, accuracy)."""
    from kdcache.models import load_bundle, save_bundle
    from kdcache.toy.recipe import Plan, Recipe

    save_bundle(bundle, tmp / "init", stages=[])
    recipe = Recipe(tmp, plan=replace(Plan(), num_train=plan.teacher_num_train, teacher_pt_steps=plan.teacher_pt_steps,
                                      teacher_sft_steps=plan.teacher_sft_steps, lr_pt=plan.lr_pt,
                                      lr_ft=plan.lr_sft),
                    seed=0, progress=progress)
    recipe.data()
    final = recipe.teacher(str(tmp / "init"))
    accuracy = recipe.evaluate("teacher", final)
    return load_bundle(final), accuracy["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=weights.WEIGHTS_DIR)
    parser.add_argument("--work", type=Path, default=None, help="where the temporary teacher runs go")
    args = parser.parse_args()
    print(json.dumps(build(args.out, work=args.work)))


if __name__ == "__main__":
    main()
