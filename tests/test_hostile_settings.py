"""Hostile settings: every flag is range-checked when it is parsed (one line naming field and value), and a
student whose image processor differs from the teacher's, or a manifest without what compat compares,
is refused in one line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli_lines import dump_args, error_line
from conftest import TINY_STUDENT, TINY_VISION, TINY_VISUAL_LEN
from kdcache import compat, models
from kdcache.cli import app
from kdcache.errors import CacheError, KdcacheError
from kdcache.toy import models as toy_models


# --- 3: every flag is range-checked when it is parsed


DUMP = ["dump", "--teacher", "t", "--data", "d.json", "--out", "cache"]
TRAIN = ["train", "--stage", "dft", "--student", "s", "--cache", "c", "--out", "run"]


@pytest.mark.parametrize("args, message", [
    (DUMP + ["--temperature", "inf"], "temperature_response must be a finite number, got inf"),
    (DUMP + ["--temperature", "nan"], "temperature_response must be a finite number, got nan"),
    (DUMP + ["--temperature-visual", "-1"], "temperature_visual must be > 0, got -1"),
    (DUMP + ["--shard-size", "nan"], "shard_size_mb must be a finite number, got nan"),
    (DUMP + ["--shard-size", "inf"], "shard_size_mb must be a finite number, got inf"),
    (DUMP + ["--max-samples", "-1"], "max_samples must be >= 1, got -1"),
    (DUMP + ["--max-samples", "0"], "max_samples must be >= 1, got 0"),
    (DUMP + ["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (DUMP + ["--topk", "0"], "topk_response must be >= 1, got 0"),
    (DUMP + ["--max-length", "0"], "max_length must be >= 1, got 0"),
    (DUMP + ["--chunk-rows", "-5"], "chunk_rows must be >= 1, got -5"),
    (DUMP + ["--max-image-mb", "nan"], "max_image_mb must be a finite number, got nan"),
    (DUMP + ["--max-image-mb", "0"], "max_image_mb must be > 0, got 0"),
    (DUMP + ["--max-image-pixels", "0"], "max_image_pixels must be >= 1, got 0"),
    (DUMP + ["--device", "gpu"], "unknown device 'gpu'; expected auto, cpu, cuda or cuda:N"),
    (["dump", "--teacher", "t", "--data", "d.json", "--out", ""], "out must not be empty"),
    (TRAIN + ["--lr", "nan"], "lr must be a finite number, got nan"),
    (TRAIN + ["--lr", "-1"], "lr must be > 0, got -1"),
    (TRAIN + ["--lr", "inf"], "lr must be a finite number, got inf"),
    (TRAIN + ["--alpha", "nan"], "alpha must be a finite number, got nan"),
    (TRAIN + ["--alpha", "-1"], "alpha must be >= 0, got -1"),
    (TRAIN + ["--beta", "inf"], "beta must be a finite number, got inf"),
    (TRAIN + ["--gamma", "nan"], "gamma must be a finite number, got nan"),
    (TRAIN + ["--num-workers", "-1"], "num_workers must be >= 0, got -1"),
    (TRAIN + ["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (TRAIN + ["--save-every", "0"], "save_every must be >= 1, got 0"),
    (TRAIN + ["--epochs", "0"], "epochs must be >= 1, got 0"),
    (TRAIN + ["--max-steps", "0"], "max_steps must be >= 1, got 0"),
    (TRAIN + ["--log-every", "0"], "log_every must be >= 1, got 0"),
    (TRAIN + ["--global-batch", "0"], "global_batch must be >= 1, got 0"),
    (TRAIN + ["--grad-accum", "0"], "grad_accum must be >= 1, got 0"),
    (TRAIN + ["--warmup-ratio", "1.5"], "warmup_ratio must be <= 1, got 1.5"),
    (TRAIN + ["--warmup-ratio", "nan"], "warmup_ratio must be a finite number, got nan"),
    (TRAIN + ["--weight-decay", "inf"], "weight_decay must be a finite number, got inf"),
    (TRAIN + ["--clip-grad", "inf"], "clip_grad must be a finite number, got inf"),
    (TRAIN + ["--clip-grad", "0"], "clip_grad must be > 0, got 0"),
    (TRAIN + ["--seed", "-1"], "seed must be >= 0, got -1"),
    (TRAIN + ["--max-image-pixels", "-3"], "max_image_pixels must be >= 1, got -3"),
    (TRAIN + ["--device", "cuda:x"], "unknown device 'cuda:x'"),
])
def test_flags_out_of_range_are_refused_in_one_line_naming_field_and_value(jobs, args, message):
    result = CliRunner().invoke(app, args)
    line = error_line(result)
    assert line == f"error: {message}" or line.startswith(f"error: {message}"), line
    assert not jobs


def test_yaml_nan_and_huge_ints_are_refused_too(jobs, tmp_path):
    (tmp_path / "t.yaml").write_text("lr: .nan\n")
    assert error_line(CliRunner().invoke(app, TRAIN + ["--config", str(tmp_path / "t.yaml")])) == \
        "error: lr must be a finite number, got nan"
    (tmp_path / "t.yaml").write_text(f"alpha: {10 ** 400}\n")
    assert "alpha must be a finite number" in error_line(
        CliRunner().invoke(app, TRAIN + ["--config", str(tmp_path / "t.yaml")]))
    (tmp_path / "t.yaml").write_text("out: 5\n")
    assert error_line(CliRunner().invoke(app, ["dump", "--teacher", "t", "--data", "d", "--config",
                                               str(tmp_path / "t.yaml")])) == "error: out must be text, got 5"


def test_values_in_range_are_accepted(jobs):
    result = CliRunner().invoke(app, DUMP + ["--temperature", "2", "--device", "cuda:1", "--max-image-mb", "0.5",
                                             "--max-image-pixels", "1000"])
    assert result.exit_code == 0, result.output
    cfg = jobs["dump"]
    assert (cfg.temperature_visual, cfg.device, cfg.max_image_mb, cfg.max_image_pixels) == (2.0, "cuda:1", 0.5, 1000)
    result = CliRunner().invoke(app, TRAIN + ["--lr", "1e-4", "--warmup-ratio", "1", "--alpha", "0"])
    assert result.exit_code == 0, result.output
    assert (jobs["train"].lr, jobs["train"].max_image_pixels) == (1e-4, 50_000_000)


# --- 5: compat refuses another image processor and a manifest without the keys it compares


def test_a_student_with_another_image_processor_is_refused_naming_both_sizes(tiny_teacher_dir, toy_dataset,
                                                                           tmp_path):
    data, images = toy_dataset(count=2)
    cache = tmp_path / "cache"
    assert CliRunner().invoke(app, dump_args(tiny_teacher_dir, data, images, cache)).exit_code == 0
    # 64 px with 16 px patches: the same 15 visual tokens as the teacher's 32 px tower with 8 px patches.
    bundle = toy_models.build_toy_bundle(TINY_STUDENT, seed=3, source="wide-student",
                                         vision_config={**TINY_VISION, "image_size": 64, "patch_size": 16})
    assert models.visual_len_of(bundle.model.config) == TINY_VISUAL_LEN
    models.save_bundle(bundle, tmp_path / "student", stages=["pt", "sft"])
    result = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", str(tmp_path / "student"), "--cache",
                                      str(cache), "--out", str(tmp_path / "run"), "--device", "cpu",
                                      "--num-workers", "0", "--no-progress"])
    line = error_line(result)
    assert "image processor size is {'height': 32, 'width': 32} in the cache" in line
    assert "{'height': 64, 'width': 64} in the student" in line


def test_other_mean_std_or_resample_are_refused_and_equal_settings_pass():
    teacher = compat.processor_settings(models.siglip_image_processor(32))
    compat.check_image_processors(teacher, dict(teacher, image_mean=[0.5, 0.5, 0.5000000001]), cache="c")
    for key, value in (("image_mean", [0.48, 0.46, 0.41]), ("image_std", [0.27, 0.26, 0.28]), ("resample", 2),
                       ("do_normalize", False), ("rescale_factor", 1.0)):
        with pytest.raises(KdcacheError, match=f"image processor {key} is .* in the cache .* but .* in the student"):
            compat.check_image_processors(teacher, dict(teacher, **{key: value}), cache="c")


@pytest.mark.parametrize("drop, message", [
    ("tokenizer", "manifest.json has no 'tokenizer'"),
    ("image_processor", "manifest.json has no 'image_processor'"),
    ("visual_len", "manifest.json has no 'visual_len'"),
])
def test_a_manifest_missing_what_compat_compares_is_a_one_line_cache_error(tiny_student_dir, drop, message):
    bundle = models.load_bundle(str(tiny_student_dir))
    manifest = {
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(bundle.tokenizer)},
        "image_token_id": int(bundle.model.config.image_token_id), "visual_len": TINY_VISUAL_LEN,
        "vocab_size": len(bundle.tokenizer), "image_processor": compat.processor_settings(bundle.image_processor),
    }
    compat.check_student_matches_cache(manifest, bundle, "c")
    del manifest[drop]
    with pytest.raises(CacheError, match=message) as caught:
        compat.check_student_matches_cache(manifest, bundle, "c")
    assert "\n" not in str(caught.value)
    with pytest.raises(CacheError, match="'tokenizer.fingerprint' must be a string, got None"):
        compat.check_student_matches_cache({**manifest, "tokenizer": {"fingerprint": None}}, bundle, "c")
