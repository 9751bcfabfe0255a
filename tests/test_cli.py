"""The `kdcache` command line: light to start, examples in every help, clean one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kdcache.cli import app

COMMANDS = ("dump", "train", "inspect", "verify", "eval", "quickstart", "convert")


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from kdcache.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "[CliRunner().invoke(app, [c, '--help']) for c in %r]; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'pyarrow')))"
            % (COMMANDS,))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_ends_with_examples(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "kdcache " + command in result.output.split("Examples:")[1]


def test_a_known_error_prints_one_line_and_exits_nonzero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kdcache.cli", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0]


def test_train_refuses_a_distillation_stage_without_a_cache(tmp_path):
    result = CliRunner().invoke(app, ["train", "--stage", "dft", "--student", "toy-student", "--data", "x.json",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "--cache" in result.output


def test_dump_reads_a_yaml_config_and_flags_override_it(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    config = tmp_path / "dump.yaml"
    config.write_text(f"teacher: {tiny_teacher_dir}\ndata: {data}\nimages: {images}\nout: {tmp_path / 'unused'}\n"
                      "topk_response: 5\ntopk_visual: 5\ndevice: cpu\nprogress: false\n")
    result = CliRunner().invoke(app, ["dump", "--config", str(config), "--out", str(tmp_path / "cache"),
                                      "--topk-visual", "3"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["topk"] == {"response": 5, "visual": 3}
    assert not (tmp_path / "unused").exists()

    inspect = CliRunner().invoke(app, ["inspect", str(tmp_path / "cache")])
    assert inspect.exit_code == 0 and "tail mass" in inspect.output
    assert f"template        {manifest['template']} (version {manifest['template_version']})" in inspect.output
    verify = CliRunner().invoke(app, ["verify", str(tmp_path / "cache")])
    assert verify.exit_code == 0 and "ok" in verify.output


def test_verify_exits_nonzero_naming_a_corrupted_shard(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = toy_dataset(count=2)
    assert CliRunner().invoke(app, ["dump", "--teacher", str(tiny_teacher_dir), "--data", str(data), "--images",
                                    str(images), "--out", str(tmp_path / "cache"), "--device", "cpu"]).exit_code == 0
    shard = next((tmp_path / "cache").glob("shard-*.arrow"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = CliRunner().invoke(app, ["verify", str(tmp_path / "cache")])
    assert result.exit_code == 1
    assert shard.name in result.output


@pytest.mark.parametrize("flag", ["--max-samples", "--max-new-tokens"])
def test_eval_refuses_counts_below_one_before_loading_anything(flag):
    result = CliRunner().invoke(app, ["eval", "--model", "no-such-model", "--data", "no-such.json", flag, "0"])
    assert result.exit_code == 2 and "greater than or equal to 1" in result.output
