"""benchmarks/bench_binding.py (issue 13's binding probe): its no-binding baseline, its training text, and a
few real training steps end to end (the curve and the JSON line)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_binding  # noqa: E402

from kdcache.templates import SYSTEM_PROMPT  # noqa: E402
from kdcache.toy.models import build_toy_tokenizer  # noqa: E402
from kdcache.toy.pretrain import BINDING_TYPES, _labels  # noqa: E402


def _scene(*colors):
    return {"background": "white", "objects": [{"color": c, "shape": "circle", "size": "small"} for c in colors]}


def test_chance_is_one_over_the_distinct_values_of_the_asked_attribute():
    assert bench_binding.chance(_scene("red", "red", "blue"), "color") == 0.5
    assert bench_binding.chance(_scene("red", "green", "blue"), "color") == pytest.approx(1 / 3)
    assert bench_binding.chance(_scene("red", "green"), "shape") == 1.0      # both circles: nothing to bind


@pytest.mark.parametrize("question, form", [
    ("What color is the square?", "shape"),
    ("What shape is the small blue object on the left?", "color+size+pos"),
    ("Is the red circle in the middle small or large?", "color+shape+pos"),
    ("What size is the object on the right?", "pos"),
    ("What color is the large object?", "size"),
])
def test_the_reference_form_names_the_attributes_that_pick_the_object(question, form):
    assert bench_binding.reference_form(question) == form


def test_probes_are_attribute_questions_about_several_objects_and_fixed():
    probes = bench_binding.probe_set(50)
    assert probes == bench_binding.probe_set(50)
    for scene, question, answer, qtype in probes:
        assert len(scene["objects"]) >= 2 and qtype in BINDING_TYPES
        assert answer in {o[qtype] for o in scene["objects"]} and question.endswith("?")


@pytest.mark.parametrize("system_prompt", [True, False])
def test_the_training_text_supervises_exactly_the_answers(system_prompt):
    rendered = bench_binding.dialogue(random.Random(3), 4, system_prompt)
    assert rendered.text.startswith(SYSTEM_PROMPT) == system_prompt
    assert len(rendered.answers) == 4
    tokenizer = build_toy_tokenizer()
    encoded = _labels(tokenizer, [rendered], True)
    supervised = tokenizer.decode([int(t) for t in encoded["labels"][0] if t >= 0])
    answers = [rendered.text[a:b] for a, b in rendered.answers]          # " red<|endoftext|>" ...
    assert supervised.replace(" ", "") == "".join(answers).replace(" ", "")


def test_a_short_run_prints_its_curve_and_one_json_line(capsys):
    bench_binding.main(["--steps", "4", "--probe-every", "2", "--probe", "10", "--batch-size", "2", "--turns", "2",
                        "--layers", "1", "--hidden", "32", "--intermediate", "64", "--heads", "2", "--kv-heads", "1",
                        "--tied"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "binding" and [p["step"] for p in result["curve"]] == [2, 4]
    assert result["lm"]["num_hidden_layers"] == 1 and result["lm"]["hidden_size"] == 32
    assert result["lm"]["num_key_value_heads"] == 1 and result["lm"]["tie_word_embeddings"] is True
    assert sum(v["n"] for v in result["by_form"].values()) == 10
    assert all(set(form.split("+")) <= {"color", "shape", "size", "pos"} for form in result["by_form"])
    assert 0.0 <= result["final"] <= 1.0 and 0.0 < result["chance"] <= 1.0
    assert result["curve"][0]["loss"] > 0 and result["settings"]["turns"] == 2
