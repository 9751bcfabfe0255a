"""The toy world's stored weights (kdcache/toy/weights) and the command that builds them (issue 13)."""

import json
import shutil
from dataclasses import asdict

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.toy import build, weights
from kdcache.toy.models import load_toy
from kdcache.toy.pretrain import LMPlan, TowerPlan, dialogue, max_objects

TINY = build.BuildPlan(tower=TowerPlan(steps=2, batch_size=4), student_lm=LMPlan(steps=2, batch_size=2),
                       teacher_lm=LMPlan(steps=2, batch_size=2), teacher_num_train=8, teacher_pt_steps=1, teacher_batch_size=4,
                       teacher_sft_steps=1)


@pytest.mark.slow
def test_build_is_deterministic_step_by_step_and_records_its_plan(tmp_path):
    torch.manual_seed(123)                            # the global RNG state must not matter
    whole = build.build(tmp_path / "a", TINY, progress=False)
    torch.manual_seed(456)
    for step in build.STEPS:                          # one step at a time, as separate `--step` runs do
        build.build(tmp_path / "b", TINY, steps=(step,), progress=False)
    index = [json.loads((tmp_path / d / weights.INDEX).read_text()) for d in ("a", "b")]
    assert {name: index[0][name]["sha256"] for name in build.STEPS} == whole["sha256"]
    assert all(index[0][name]["sha256"] == index[1][name]["sha256"] for name in build.STEPS)
    assert index[0]["teacher"]["build"]["plan"] == asdict(TINY)
    assert index[0]["student-lm"]["build"]["plan"] == asdict(TINY.student_lm)
    assert 0.0 <= whole["teacher_accuracy"]["overall"] <= 1.0
    teacher = load_toy("toy-teacher", stored=tmp_path / "a")
    assert teacher.projector_trained
    assert not load_toy("toy-student", stored=tmp_path / "a").projector_trained


def test_the_stored_weights_are_the_documented_plans_output():
    index = json.loads((weights.WEIGHTS_DIR / weights.INDEX).read_text())
    plan = build.BuildPlan()
    assert index["tower"]["build"]["plan"] == asdict(plan.tower)
    assert index["student-lm"]["build"]["plan"] == asdict(plan.student_lm)
    assert index["teacher-lm"]["build"]["plan"] == asdict(plan.teacher_lm)
    assert index["teacher"]["build"]["plan"] == asdict(plan)
    size = sum((weights.WEIGHTS_DIR / index[n]["file"]).stat().st_size for n in build.STEPS)
    assert size < 12 * 2**20


@pytest.mark.slow
def test_the_stored_teacher_scores_what_its_build_recorded(tmp_path):
    """The stored (float16) teacher on its build's held-out split: the accuracy the build measured in float32."""
    from kdcache.evaluate import evaluate_bundle
    from kdcache.toy import data as toy_data

    plan = build.BuildPlan()
    recorded = json.loads((weights.WEIGHTS_DIR / weights.INDEX).read_text())["teacher"]["build"]["accuracy"]
    world = toy_data.generate(tmp_path, num_train=plan.teacher_num_train, seed=plan.teacher_data_seed)
    result = evaluate_bundle(load_toy("toy-teacher"), world["eval"], world["images_dir"], template="qwen2_base",
                             progress=False)
    assert abs(result["accuracy"] - recorded["overall"]) <= 0.02
    assert result["accuracy"] > 0.5                   # chance is 1/6 to 1/2 per question type


def test_a_damaged_weights_file_is_refused_in_one_line(tmp_path):
    stored = tmp_path / "weights"
    shutil.copytree(weights.WEIGHTS_DIR, stored)
    path = stored / "student-lm.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(KdcacheError, match="student-lm.safetensors is missing or its sha256 differs") as e:
        load_toy("toy-student", stored=stored)
    assert "\n" not in str(e.value)
    (stored / weights.INDEX).unlink()
    with pytest.raises(KdcacheError, match="rebuild them with `python -m kdcache.toy.build`"):
        load_toy("toy-student", stored=stored)


def test_stored_weights_of_another_shape_are_refused(tmp_path):
    stored = tmp_path / "weights"
    shutil.copytree(weights.WEIGHTS_DIR, stored)
    with pytest.raises(KdcacheError, match="do not fit toy-student"):
        load_toy("toy-student", stored=stored, start="teacher-lm")


def test_the_curriculum_grows_scenes_and_dialogues_read_like_training_text():
    assert [max_objects(s, 900) for s in (0, 299, 300, 599, 600, 899)] == [1, 1, 2, 2, 3, 3]
    import random

    rng = random.Random(0)
    one = dialogue(rng, 1, 5, describe=1.0)
    caption = one.text.split("USER: ", 1)[1].split("\n")[0]
    assert " and " not in caption and f"Describe the image. ASSISTANT: {caption}<|endoftext|>" in one.text
    assert one.text.startswith("A chat between") and len(one.answers) >= 2
    for start, end in one.answers:                    # answer spans end with the end token, as SFT supervises
        assert one.text[start:end].endswith("<|endoftext|>")


def test_pretraining_loss_can_be_limited_to_the_answers():
    import random

    from kdcache.toy.models import build_toy_tokenizer
    from kdcache.toy.pretrain import _labels

    tokenizer = build_toy_tokenizer()
    texts = [dialogue(random.Random(i), 2, 2) for i in range(3)]
    every, answers = _labels(tokenizer, texts, False), _labels(tokenizer, texts, True)
    assert torch.equal(every["input_ids"], answers["input_ids"])
    for row, text in enumerate(texts):
        kept = tokenizer.decode([t for t in answers["labels"][row].tolist() if t >= 0])
        assert kept == "".join(text.text[s:e] for s, e in text.answers)
        assert (every["labels"][row] >= 0).sum() == every["attention_mask"][row].sum()

