"""The toy world's stored weights (kdcache/toy/weights) and the command that builds them (issue 13)."""

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.toy import build, weights
from kdcache.toy.models import load_toy
from kdcache.toy.pretrain import LMPlan, TowerPlan, dialogue, max_objects

TINY = build.BuildPlan(tower=TowerPlan(steps=2, batch_size=4), student_lm=(LMPlan(steps=2, batch_size=2),),
                       teacher_lm=(LMPlan(steps=2, batch_size=2, task="binding", decay=False, stream="bindtrain"),
                                   LMPlan(steps=1, batch_size=2, task="scenes")),
                       teacher_num_train=8, teacher_pt_steps=1, teacher_batch_size=4, teacher_binding_steps=1,
                       teacher_sft_steps=1)


def _json(value):
    return json.loads(json.dumps(value))


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
    assert index[0]["teacher"]["build"]["plan"] == _json(asdict(TINY))
    assert index[0]["student-lm"]["build"]["plan"] == [asdict(p) for p in TINY.student_lm]
    assert index[0]["teacher-lm"]["build"]["plan"] == [asdict(p) for p in TINY.teacher_lm]
    assert 0.0 <= whole["teacher_accuracy"]["overall"] <= 1.0
    teacher = load_toy("toy-teacher", stored=tmp_path / "a")
    assert teacher.projector_trained
    assert not load_toy("toy-student", stored=tmp_path / "a").projector_trained


def test_the_stored_weights_are_the_documented_plans_output():
    index = json.loads((weights.WEIGHTS_DIR / weights.INDEX).read_text())
    plan = build.BuildPlan()
    assert index["tower"]["build"]["plan"] == asdict(plan.tower)
    assert index["student-lm"]["build"]["plan"] == [asdict(p) for p in plan.student_lm]
    assert index["teacher-lm"]["build"]["plan"] == [asdict(p) for p in plan.teacher_lm]
    assert index["teacher"]["build"]["plan"] == _json(asdict(plan))
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


def test_stored_weights_of_another_shape_are_refused(tmp_path, monkeypatch):
    from kdcache.toy import models

    stored = tmp_path / "weights"
    shutil.copytree(weights.WEIGHTS_DIR, stored)
    monkeypatch.setitem(models.TOY_PRESETS, "toy-student",
                        {**models.TOY_PRESETS["toy-student"], "text": {**models.TOY_PRESETS["toy-student"]["text"],
                                                                     "intermediate_size": 256}})
    with pytest.raises(KdcacheError, match="the stored toy weights 'student-lm' .* do not fit toy-student"):
        load_toy("toy-student", stored=stored)
    with pytest.raises(KdcacheError, match="'tower' .* do not fit toy-teacher: [0-9]+ missing, [0-9]+ unexpected tensors"):
        load_toy("toy-teacher", stored=stored, start="tower")


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



def test_binding_dialogues_ask_for_one_attribute_of_one_of_several_objects():
    import random
    import re

    from kdcache.toy.pretrain import binding_dialogue

    rng = random.Random(1)
    for _ in range(20):
        rendered = binding_dialogue(rng, 4)
        caption = rendered.text.split("USER: ", 1)[1].split("\n")[0]
        assert caption.count(" and ") == 1 and len(rendered.answers) == 4
        questions = re.findall(r"(?:USER: |\n)((?:What|Is) [^?]+\?) ASSISTANT:", rendered.text)
        assert len(questions) == 4 and all(re.match(r"What (color|shape|size) is |Is .+ small or large", q)
                                           for q in questions)


def test_the_schedule_decays_over_the_last_quarter_or_stays_constant():
    from kdcache.toy.pretrain import _lr_factor

    plain, constant = LMPlan(steps=1000), LMPlan(steps=1000, decay=False)
    assert [_lr_factor(s, plain) for s in (0, 49, 50, 749, 750)] == [1 / 50, 1.0, 1.0, 1.0, 1.0]
    assert _lr_factor(875, plain) == pytest.approx(0.5) and _lr_factor(999, plain) < 1e-4
    assert _lr_factor(0, constant) == 1 / 50 and all(_lr_factor(s, constant) == 1.0 for s in range(50, 1000))


def test_an_unknown_pretraining_task_is_refused():
    from kdcache.toy.pretrain import pretrain_lm

    with pytest.raises(ValueError, match="curriculum, scenes or binding, not 'captions'"):
        pretrain_lm(torch.nn.Linear(1, 1), None, LMPlan(task="captions"), progress=False)


def test_dialogues_without_the_system_prompt_keep_their_answer_spans():
    import random

    from kdcache.templates import SYSTEM_PROMPT
    from kdcache.toy.pretrain import _batch

    plan = LMPlan(batch_size=3, task="binding", describe=0.0)
    with_prompt = _batch(random.Random("s"), plan, 0)
    without = _batch(random.Random("s"), replace(plan, system_prompt=False), 0)
    for a, b in zip(with_prompt, without, strict=True):
        assert a.text == SYSTEM_PROMPT + b.text and not b.text.startswith(SYSTEM_PROMPT)
        assert [a.text[s:e] for s, e in a.answers] == [b.text[s:e] for s, e in b.answers]
