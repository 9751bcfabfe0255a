"""Each option is declared once, in its dataclass: the CLI derives flags, help, defaults and choices from it."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from kdcache.cli import app
from kdcache.config import choices_of, field_types
from kdcache.errors import KdcacheError
from student_train.config import STAGES, Stage, TrainConfig
from teacher_dump.config import DumpConfig

CONFIGS = {"dump": DumpConfig, "train": TrainConfig}
DUMP_REQUIRED = ["--teacher", "t", "--data", "d.json", "--out", "cache"]
TRAIN_REQUIRED = ["--stage", "dft", "--student", "s", "--cache", "cache", "--out", "run"]


def help_of(command: str) -> str:
    """The command's help on one line: a wide terminal, whitespace collapsed, so no wrap splits a default."""
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(command: str, *args: str):
    return CliRunner().invoke(app, [command, *args])


def parsed(jobs, command: str, *args: str):
    result = run(command, *args)
    assert result.exit_code == 0, result.output
    return jobs[command]


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- flags and help derived from the dataclasses

@pytest.mark.parametrize("command", CONFIGS)
def test_every_config_field_has_a_flag_and_every_switch_a_no_form(command):
    text = help_of(command)
    for f in dataclasses.fields(CONFIGS[command]):
        assert flag(f.name) in text, f.name
        if f.type == "bool":
            assert f"--no-{flag(f.name)[2:]}" in text, f.name


@pytest.mark.parametrize("command", CONFIGS)
def test_help_shows_each_field_help_and_every_literal_choice(command):
    cls = CONFIGS[command]
    text = help_of(command)
    for f in dataclasses.fields(cls):
        assert " ".join(f.metadata["help"].split()) in text, f.name
        choices = choices_of(field_types(cls)[f.name])
        if choices is not None:
            assert f"[choices: {' | '.join(choices)}]" in text, f.name


def test_help_shows_the_dataclass_defaults():
    dump, train = help_of("dump"), help_of("train")
    for expected in ("Target shard size in MB. [default: 512]", "k at response rows. [default: 64]",
                     "Conversation template. [choices: plain | qwen2_base] [default: qwen2_base]",
                     "Store relation matrices. [default: on]", "[default: 2048]"):
        assert expected in dump, expected
    for expected in ("[choices: pt | sft | dpt | dft]", "Weight of the relation loss. [default: 0.5]",
                     "[choices: bucket | renorm] [default: bucket]", "[choices: token | sample] [default: token]",
                     "pt 0.001, sft 2e-05", "Optimizer steps between metric lines. [default: 1]"):
        assert expected in train, expected


def test_a_required_field_missing_from_flags_and_yaml_is_named_by_its_flag(jobs, tmp_path):
    result = run("dump", "--data", "d.json")
    assert result.exit_code == 2 and "--teacher" in result.output and "--out" in result.output
    assert "--data" not in result.output.split("Error")[-1]
    config = tmp_path / "dump.yaml"
    config.write_text("teacher: t\nout: cache\n")
    assert parsed(jobs, "dump", "--config", str(config), "--data", "d.json").teacher == "t"


# --- YAML < flags

def test_flags_override_the_yaml_file_which_overrides_the_defaults(jobs, tmp_path):
    config = tmp_path / "dump.yaml"
    config.write_text("teacher: t\ndata: d.json\nout: from-yaml\nbatch_size: 3\ntopk_response: 5\nrelation: false\n")
    cfg = parsed(jobs, "dump", "--config", str(config), "--out", "from-flag", "--batch-size", "7")
    assert (cfg.out, cfg.batch_size, cfg.topk_response, cfg.relation) == ("from-flag", 7, 5, False)
    assert cfg.max_length == 2048 and cfg.template == "qwen2_base"


def test_train_flags_override_the_yaml_file(jobs, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("stage: dft\nstudent: s\ncache: c\nout: r\nlr: 1.0e-4\nwarmup_ratio: 0.1\n")
    cfg = parsed(jobs, "train", "--config", str(config), "--warmup-ratio", "0.2", "--weight-decay", "0.01")
    assert (cfg.lr, cfg.warmup_ratio, cfg.weight_decay) == (1e-4, 0.2, 0.01)


def test_unknown_yaml_keys_are_refused_in_one_line_naming_the_key(jobs, tmp_path):
    config = tmp_path / "dump.yaml"
    config.write_text("teacher: t\ndata: d.json\nout: c\ntop_k: 5\n")
    assert "top_k" in one_error_line(run("dump", "--config", str(config)))
    assert "dump" not in jobs


def test_a_yaml_number_written_as_text_is_refused_naming_the_field(jobs, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("stage: pt\nstudent: s\ndata: d.json\nout: r\nlr: 1e-3\n")   # YAML 1.1: a string
    line = one_error_line(run("train", "--config", str(config)))
    assert "lr" in line and "'1e-3'" in line


# --- Literal choices, checked in one place

@pytest.mark.parametrize("command, args, field, value", [
    ("dump", [*DUMP_REQUIRED, "--template", "chatml"], "template", "chatml"),
    ("dump", [*DUMP_REQUIRED, "--dtype", "int8"], "dtype", "int8"),
    ("train", [*TRAIN_REQUIRED, "--tail", "drop"], "tail", "drop"),
    ("train", [*TRAIN_REQUIRED, "--loss-norm", "batch"], "loss_norm", "batch"),
    ("train", [*TRAIN_REQUIRED[2:], "--stage", "rlhf"], "stage", "rlhf"),
    ("train", [*TRAIN_REQUIRED, "--template", "chatml"], "template", "chatml"),
])
def test_a_value_outside_its_literal_is_refused_in_one_line_naming_field_value_and_choices(jobs, command, args,
                                                                                           field, value):
    line = one_error_line(run(command, *args))
    assert field in line and repr(value) in line
    assert all(choice in line for choice in choices_of(field_types(CONFIGS[command])[field]))
    assert command not in jobs


def test_a_config_built_in_python_checks_its_literals_and_ranges_too():
    with pytest.raises(KdcacheError, match="unknown tail 'drop'; choose one of bucket, renorm"):
        TrainConfig(stage="pt", student="s", out="r", data="d", tail="drop")
    with pytest.raises(KdcacheError, match="topk_visual must be >= 1, got 0"):
        DumpConfig(teacher="t", data="d", out="o", topk_visual=0)
    with pytest.raises(KdcacheError, match="shard_size_mb must be > 0, got 0"):
        DumpConfig(teacher="t", data="d", out="o", shard_size_mb=0)


def test_eval_refuses_a_template_outside_the_template_names():
    line = one_error_line(run("eval", "--model", "m", "--data", "d.json", "--template", "chatml"))
    assert "template" in line and "'chatml'" in line and "qwen2_base" in line


# --- shorthands, aliases and switches

def test_topk_sets_both_roles_and_topk_visual_overrides_it(jobs):
    cfg = parsed(jobs, "dump", *DUMP_REQUIRED, "--topk", "8", "--topk-visual", "3")
    assert (cfg.topk_response, cfg.topk_visual) == (8, 3)


def test_topk_overrides_both_roles_from_the_yaml_file(jobs, tmp_path):
    config = tmp_path / "dump.yaml"
    config.write_text("topk_response: 5\ntopk_visual: 5\n")
    cfg = parsed(jobs, "dump", *DUMP_REQUIRED, "--config", str(config), "--topk", "9")
    assert (cfg.topk_response, cfg.topk_visual) == (9, 9)


def test_temperature_sets_both_temperatures(jobs):
    cfg = parsed(jobs, "dump", *DUMP_REQUIRED, "--temperature", "2")
    assert (cfg.temperature_response, cfg.temperature_visual) == (2.0, 2.0)


def test_shard_size_is_the_shard_size_mb_field_in_megabytes(jobs):
    assert parsed(jobs, "dump", *DUMP_REQUIRED, "--shard-size", "64").shard_size_mb == 64.0
    jobs.clear()
    assert parsed(jobs, "dump", *DUMP_REQUIRED, "--shard-size-mb", "32").shard_size_mb == 32.0


def test_dump_switches_keep_their_flags(jobs):
    cfg = parsed(jobs, "dump", *DUMP_REQUIRED, "--no-relation", "--no-embed-images", "--skip-bad",
                 "--allow-untrained", "--no-resume", "--trust-remote-code", "--revision", "main")
    assert (cfg.relation, cfg.embed_images, cfg.skip_bad, cfg.allow_untrained) == (False, False, True, True)
    assert (cfg.resume, cfg.trust_remote_code, cfg.revision) == (False, True, "main")


def test_dump_resumes_by_default(jobs):
    assert parsed(jobs, "dump", *DUMP_REQUIRED).resume is True


def test_every_train_flag_of_before_still_sets_its_field(jobs):
    cfg = parsed(jobs, "train", "--stage", "sft", "--student", "s", "--out", "r", "--data", "d.json", "--images", "i",
                 "--template", "plain", "--batch-size", "2", "--global-batch", "16", "--grad-accum", "3",
                 "--lr", "0.5", "--max-steps", "9", "--epochs", "2", "--alpha", "0.1", "--beta", "0.2",
                 "--gamma", "0.3", "--tail", "renorm", "--loss-norm", "sample", "--clip-grad", "1",
                 "--grad-checkpointing", "--fsdp", "--seed", "5", "--device", "cpu", "--num-workers", "0",
                 "--save-every", "4", "--resume", "--trust-remote-code")
    assert cfg == TrainConfig(stage="sft", student="s", out="r", data="d.json", images="i", template="plain",
                              batch_size=2, global_batch=16, grad_accum=3, lr=0.5, max_steps=9, epochs=2, alpha=0.1,
                              beta=0.2, gamma=0.3, tail="renorm", loss_norm="sample", clip_grad=1.0,
                              grad_checkpointing=True, fsdp=True, seed=5, device="cpu", num_workers=0,
                              save_every=4, resume=True, trust_remote_code=True)


# --- stages and their defaults, resolved in the config

@pytest.mark.parametrize("stage, lr, global_batch, template, distills", [
    ("pt", 1e-3, 256, "plain", False), ("sft", 2e-5, 128, "qwen2_base", False),
    ("dpt", 1e-3, 256, "plain", True), ("dft", 2e-5, 128, "qwen2_base", True),
])
def test_resolve_fills_the_stage_defaults(stage, lr, global_batch, template, distills):
    cfg = TrainConfig(stage=stage, student="s", out="r", cache="c", batch_size=4).resolve(world_size=2)
    assert (cfg.lr, cfg.global_batch, cfg.template) == (lr, global_batch, template)
    assert cfg.grad_accum == global_batch // (4 * 2)
    assert cfg.distills is distills and STAGES[stage] == Stage(cfg.trainable, lr, global_batch, template, distills)


def test_resolve_keeps_explicit_values():
    cfg = TrainConfig(stage="pt", student="s", out="r", data="d", lr=0.1, global_batch=8, template="qwen2_base",
                      grad_accum=5)
    assert cfg.resolve(world_size=4) == cfg


def test_resolve_accumulates_at_least_one_batch():
    cfg = TrainConfig(stage="sft", student="s", out="r", data="d", batch_size=64).resolve(world_size=8)
    assert cfg.grad_accum == 1


def test_a_distillation_stage_without_a_cache_is_refused():
    with pytest.raises(KdcacheError, match="stage dpt distills from a cache: pass --cache"):
        TrainConfig(stage="dpt", student="s", out="r", data="d")
    with pytest.raises(KdcacheError, match="exactly one of --cache or --data"):
        TrainConfig(stage="sft", student="s", out="r", data="d", cache="c")


@pytest.mark.parametrize("command", [["dump", "--teacher", "t", "--data", "d.json"],
                                     ["train", "--stage", "pt", "--student", "s", "--data", "d.json"]])
def test_an_out_url_is_refused_instead_of_writing_a_local_folder_named_after_it(command, jobs, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, [*command, "--out", "s3://bucket/cache"])
    assert result.exit_code == 1 and not jobs
    assert "out 's3://bucket/cache' is a URL" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s3:").exists()
