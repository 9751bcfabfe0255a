"""benchmarks/bench_recipe.py's codec and targets switches (issue 10), without training: arguments, the caches'
dump settings (`Recipe.dump`'s plus the codec or visual targets), reuse of an earlier run's caches, and the
within-one-standard-deviation verdict."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_recipe  # noqa: E402

from kdcache.toy.recipe import Plan, Recipe  # noqa: E402


def test_the_codec_switch_defaults_to_lossless_and_excludes_the_comparison():
    args = bench_recipe.parse_args([])
    assert args.codec == "lossless" and not args.compare_codecs and args.schemes == list(bench_recipe.SCHEMES)
    assert bench_recipe.parse_args(["--codec", "compact"]).codec == "compact"
    compared = bench_recipe.parse_args(["--compare-codecs", "--schemes", "DPT-SFT-DFT"])
    assert compared.schemes == ["DPT-SFT-DFT"] and compared.codec is None       # the JSON names no single codec
    assert bench_recipe.parse_args(["--compare-targets"]).codec == "lossless"
    with pytest.raises(SystemExit):
        bench_recipe.parse_args(["--codec", "compact", "--compare-codecs"])
    with pytest.raises(SystemExit):
        bench_recipe.parse_args(["--codec", "v1"])
    with pytest.raises(SystemExit):
        bench_recipe.parse_args(["--compare-codecs", "--compare-targets"])


@pytest.mark.parametrize("argv, expected", [
    ([], {"lossless": ("lossless", "topk")}),
    (["--codec", "compact"], {"compact": ("compact", "topk")}),
    (["--compare-codecs"], {"lossless": ("lossless", "topk"), "compact": ("compact", "topk")}),
    (["--compare-targets"], {"topk": ("lossless", "topk"), "sampled": ("lossless", "sampled")}),
    (["--compare-targets", "--codec", "compact"], {"topk": ("compact", "topk"), "sampled": ("compact", "sampled")}),
])
def test_the_variants_trained_and_compared_in_order(argv, expected):
    chosen = bench_recipe.variants(bench_recipe.parse_args(argv))
    assert chosen == expected and list(chosen) == list(expected)          # the first is the reference


def fake_recipe(out: Path) -> Recipe:
    recipe = Recipe.__new__(Recipe)                      # no toy world: only what the dump settings read
    recipe.out, recipe.plan, recipe.progress = out, Plan(), False
    recipe.seconds, recipe.cache_bytes = {}, {}
    recipe.world = {"captions": out / "captions.json", "train": out / "train.json", "images_dir": out / "images"}
    return recipe


def captured_dumps(monkeypatch) -> list:
    import teacher_dump.dump

    configs = []
    monkeypatch.setattr(teacher_dump.dump, "dump", lambda cfg: configs.append(cfg) or {"stats": {"num_bytes": 1}})
    return configs


def test_the_caches_are_dumped_with_the_recipes_settings_and_the_codec(tmp_path, monkeypatch):
    configs = captured_dumps(monkeypatch)
    recipe = fake_recipe(tmp_path)
    recipe.dump("teacher-dir")                                          # the Recipe's own (lossless, default)
    caches = bench_recipe.dump_caches(recipe, "teacher-dir", "compact")
    assert caches == {name: str(tmp_path / "caches-compact" / name) for name in ("captions", "questions")}
    sampled = bench_recipe.dump_caches(recipe, "teacher-dir", "lossless", "sampled")
    assert sampled == {name: str(tmp_path / "caches-lossless-sampled-visual" / name) for name in ("captions", "questions")}
    theirs, ours, drawn = configs[:2], configs[2:4], configs[4:]
    for mine, recipes in zip(ours, theirs):
        assert mine.codec == "compact" and recipes.codec == "lossless"
        assert dataclasses.replace(mine, codec="lossless", out=recipes.out) == recipes
    for mine, recipes in zip(drawn, theirs):
        assert mine.visual_targets == "sampled" and recipes.visual_targets == "topk" and mine.response_targets == "topk"
        assert dataclasses.replace(mine, visual_targets="topk", out=recipes.out) == recipes


def test_an_earlier_runs_caches_are_reused_per_codec_and_a_missing_codec_is_dumped(tmp_path, monkeypatch):
    earlier = tmp_path / "earlier"
    for name in ("captions", "questions"):
        (earlier / "caches" / name).mkdir(parents=True)                   # Recipe.dump's: lossless
        (earlier / "caches" / name / "manifest.json").write_text("{}")
    dumped = []
    monkeypatch.setattr(bench_recipe, "dump_caches", lambda recipe, teacher, codec, targets:
                        dumped.append((teacher, codec, targets)) or {"captions": "new", "questions": "new"})
    recipe = SimpleNamespace(teacher=lambda *a: pytest.fail("the stored teacher is used, never trained"))
    chosen = {"lossless": ("lossless", "topk"), "compact": ("compact", "topk"), "sampled": ("lossless", "sampled")}
    teacher, caches = bench_recipe.teacher_and_caches(recipe, str(earlier), chosen)
    assert teacher == "toy-teacher"
    assert caches["lossless"] == {name: str(earlier / "caches" / name) for name in ("captions", "questions")}
    assert caches["compact"] == caches["sampled"] == {"captions": "new", "questions": "new"}
    assert dumped == [(teacher, "compact", "topk"), (teacher, "lossless", "sampled")]   # top-k caches are not sampled ones


@pytest.mark.parametrize("compact_runs, within", [([0.41, 0.40, 0.42], True), ([0.39, 0.40, 0.38], False),
                                                  ([0.47, 0.46, 0.48], True)])
def test_compact_is_within_one_standard_deviation_of_lossless_or_not(compact_runs, within):
    lossless = bench_recipe.summarise({"DPT-SFT-DFT": [0.40, 0.42, 0.44]})     # mean 0.42, std 0.02
    compact = bench_recipe.summarise({"DPT-SFT-DFT": compact_runs})
    verdict = bench_recipe.compare({"lossless": lossless, "compact": compact}, "lossless", "compact")["DPT-SFT-DFT"]
    assert verdict["compact"]["mean"] == pytest.approx(sum(compact_runs) / 3)
    assert verdict["lossless"]["std"] == pytest.approx(0.02)
    assert verdict["difference"] == pytest.approx(sum(compact_runs) / 3 - 0.42)
    assert verdict["within_one_std"] is within
