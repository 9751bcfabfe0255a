"""The toy recipe end to end (small plan), and the evaluation arithmetic it reports."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.evaluate import Question, accuracy_report, normalize
from kdcache.models import load_bundle
from kdcache.toy.models import load_toy
from kdcache.toy.recipe import format_table, paired_gain, run_quickstart, small_plan


def test_exact_match_ignores_case_space_and_a_final_full_stop():
    assert normalize("  Red. ") == normalize("red")
    assert normalize("red circle") != normalize("red")


def test_accuracy_report_counts_per_question_type():
    qs = [Question("a", [1], "red", "color", None), Question("b", [1], "two", "count", None),
          Question("c", [1], "blue", "color", None)]
    report = accuracy_report(qs, ["Red", "three", "blue."])
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_type"]["color"] == {"accuracy": 1.0, "num_questions": 2}
    assert report["per_type"]["count"] == {"accuracy": 0.0, "num_questions": 1}


def test_paired_gain_matches_a_plain_computation():
    baseline, distilled = [1, 0, 0, 1, 1, 0], [1, 1, 0, 0, 1, 1]
    diffs = torch.tensor([d - b for b, d in zip(baseline, distilled)], dtype=torch.float64)
    gain = paired_gain([bool(x) for x in baseline], [bool(x) for x in distilled])
    assert gain["distilled_minus_baseline"] == pytest.approx(float(diffs.mean()))
    assert gain["paired_se"] == pytest.approx(float(diffs.std(unbiased=True) / len(diffs) ** 0.5))
    assert (gain["discordant"], gain["num_questions"]) == (3, 6)
    assert paired_gain([True], [False]) == {"distilled_minus_baseline": -1.0, "paired_se": None, "discordant": 1,
                                            "num_questions": 1}
    with pytest.raises(ValueError):
        paired_gain([True, False], [True])


@pytest.mark.slow
def test_quickstart_runs_the_whole_recipe_and_writes_its_report(tmp_path):
    report = run_quickstart(tmp_path / "qs", plan=small_plan(), progress=False)
    on_disk = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert set(on_disk["accuracy"]) == {"teacher", "baseline", "distilled"}
    assert all(0.0 <= a <= 1.0 for a in on_disk["accuracy"].values())
    assert on_disk["accuracy"] == report["accuracy"]
    n = on_disk["num_questions"]
    for name, hits in on_disk["correct"].items():           # per question, in eval order: the accuracy again
        assert len(hits) == n and sum(hits) / n == pytest.approx(on_disk["accuracy"][name])
    gain = on_disk["gain"]
    assert gain["num_questions"] == n
    assert gain["distilled_minus_baseline"] == pytest.approx(on_disk["accuracy"]["distilled"] - on_disk["accuracy"]["baseline"])
    assert gain["discordant"] == sum(b != d for b, d in zip(on_disk["correct"]["baseline"], on_disk["correct"]["distilled"]))
    assert f"distilled - baseline: {gain['distilled_minus_baseline']:+.3f}" in format_table(on_disk)
    assert (tmp_path / "qs" / "report.png").stat().st_size > 10_000
    for cache in ("captions", "questions"):
        manifest = json.loads((tmp_path / "qs" / "caches" / cache / "manifest.json").read_text())
        assert on_disk["cache_bytes"][cache] == manifest["stats"]["num_bytes"] > 0
    steps = {run: len((tmp_path / "qs" / "runs" / run / "metrics.jsonl").read_text().splitlines())
             for run in ("baseline-pt", "baseline-sft", "distilled-dpt", "distilled-sft", "distilled-dft")}
    # small plan: 2 steps per stage; the baseline's SFT also takes the 2 steps of the DFT it lacks
    assert steps == {"baseline-pt": 2, "baseline-sft": 4, "distilled-dpt": 2, "distilled-sft": 2, "distilled-dft": 2}
    dft = json.loads((tmp_path / "qs" / "runs" / "distilled-dft" / "metrics.jsonl").read_text().splitlines()[0])
    assert dft["kl_response"] > 0 and dft["kl_visual"] > 0 and dft["relation"] > 0

    result = CliRunner().invoke(app, ["eval", "--model", report["models"]["teacher"], "--data",
                                      str(tmp_path / "qs" / "data" / "eval.json"), "--images",
                                      str(tmp_path / "qs" / "data" / "images"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{"):])["accuracy"] == report["accuracy"]["teacher"]


@pytest.mark.slow
def test_quickstart_is_reproducible_on_the_same_machine(tmp_path):
    """Same seed, same machine: the same losses at every step of every run and the same report (issue 13 item 5)."""
    plan = small_plan()
    reports = [run_quickstart(tmp_path / name, seed=1, plan=plan, progress=False) for name in ("a", "b")]
    for run in sorted(p.name for p in (tmp_path / "a" / "runs").iterdir()):
        metrics = [(tmp_path / name / "runs" / run / "metrics.jsonl").read_text().splitlines() for name in ("a", "b")]
        strip = [[{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in m] for m in metrics]
        assert strip[0] == strip[1] and strip[0], run
    for key in ("accuracy", "per_type", "gain", "correct", "cache_bytes", "environment"):
        assert reports[0][key] == reports[1][key], key
    assert reports[0]["environment"]["torch"].startswith("2.")


@pytest.mark.slow
def test_quickstart_can_train_its_teacher_from_the_stored_text_pretrained_lm(tmp_path):
    report = run_quickstart(tmp_path / "qs", plan=small_plan(), progress=False, train_teacher=True)
    assert report["models"]["teacher"] == str(tmp_path / "qs" / "runs" / "teacher-sft" / "final")
    steps = {run: len((tmp_path / "qs" / "runs" / run / "metrics.jsonl").read_text().splitlines())
             for run in ("teacher-pt", "teacher-binding", "teacher-sft")}
    plan = small_plan()
    assert steps == {"teacher-pt": plan.teacher_pt_steps, "teacher-binding": plan.teacher_binding_steps,
                     "teacher-sft": plan.teacher_sft_steps}
    several = json.loads((tmp_path / "qs" / "data" / "several.json").read_text())
    assert several and all(len(s["scene"]["objects"]) >= 2 for s in several)
    init = load_bundle(str(tmp_path / "qs" / "runs" / "teacher-init")).model.state_dict()
    stored = load_toy("toy-teacher", start="teacher-lm").model.state_dict()
    assert all(torch.equal(v, stored[k]) for k, v in init.items())


@pytest.mark.parametrize("captions", [True, False])
def test_the_teachers_last_sft_takes_the_captions_only_with_teacher_captions(tmp_path, captions):
    from dataclasses import replace

    import yaml

    from kdcache.toy.recipe import Recipe, _pretrained_teacher

    recipe = Recipe(tmp_path, plan=replace(small_plan(), teacher_captions=captions, teacher_binding_steps=0),
                    progress=False)
    recipe.data()
    final = recipe.teacher(_pretrained_teacher(tmp_path, False))
    config = yaml.safe_load((tmp_path / "runs" / "teacher-sft" / "config.yaml").read_text())
    assert final == str(tmp_path / "runs" / "teacher-sft" / "final")
    assert config["data"] == str(recipe.world["teacher" if captions else "train"])
    assert not (tmp_path / "runs" / "teacher-binding").exists()
