"""`kdcache eval --export lmms-eval`: a ready-to-run lmms-eval run of a saved student; nothing is run.

Writes two files into `out`: ``lmms_eval.yaml`` (lmms-eval's ``--config`` format: a list of runs whose
keys are its command-line options) and ``run_lmms_eval.sh`` (``accelerate launch -m lmms_eval --config
lmms_eval.yaml``). The run uses lmms-eval 0.7.3's ``llava_hf`` model, which renders every prompt with
the checkpoint's processor chat template: the export refuses a checkpoint whose chat template is not
kdcache's ``qwen2_base`` one, since only then is that prompt the one the student was trained on.

The tasks default to the benchmarks of the LLaVA-KD paper, named as lmms-eval 0.7.3 names them
(``lmms_eval/tasks/*/*.yaml``). Torch-free: the export reads files only.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

import yaml

import kdcache
from kdcache.errors import KdcacheError
from kdcache.templates import TEMPLATE_VERSION, chat_template

EXPORTS = ("lmms-eval",)
LMMS_EVAL_VERSION = "0.7.3"
# The LLaVA-KD paper's benchmarks -> lmms-eval 0.7.3 tasks (the splits the paper reports).
PAPER_TASKS = {
    "VQAv2": "vqav2_test", "GQA": "gqa", "VizWiz": "vizwiz_vqa_test", "SQA": "scienceqa_img",
    "TextVQA": "textvqa_val", "MME": "mme", "MMB": "mmbench_en_dev", "MMB-CN": "mmbench_cn_dev",
    "POPE": "pope", "MMMU": "mmmu_val",
}
SUBMISSION_TASKS = ("vqav2_test", "vizwiz_vqa_test")       # scored by uploading lmms-eval's submission file
JUDGED_TASKS = ("mmbench_en_dev", "mmbench_cn_dev")         # lmms-eval extracts the option with a GPT judge
CONFIG_FILE, SCRIPT_FILE = "lmms_eval.yaml", "run_lmms_eval.sh"
_TASK = re.compile(r"[A-Za-z0-9_\-]+")


def export(kind: str, model: str, out: str | None = None, tasks: str | None = None,
           dtype: str = "bfloat16") -> list[Path]:
    """Write the files for evaluator `kind` (one of EXPORTS) for checkpoint directory `model`; returns them.

    `out` defaults to ``lmms-eval/`` beside the checkpoint; `tasks` is a comma-separated list of lmms-eval
    task names (default: PAPER_TASKS).
    """
    if kind not in EXPORTS:
        raise KdcacheError(f"unknown export {kind!r}; choose one of {', '.join(EXPORTS)}")
    checkpoint = Path(model).expanduser().resolve()
    history = check_exportable(checkpoint, model)
    task_list = parse_tasks(tasks)
    out_dir = Path(out).expanduser() if out is not None else checkpoint.parent / "lmms-eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    config = lmms_eval_runs(checkpoint, task_list, (out_dir / "results").resolve(), dtype)
    header = _header(checkpoint, history, task_list)
    config_path, script_path = out_dir / CONFIG_FILE, out_dir / SCRIPT_FILE
    config_path.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    script_path.write_text(_script(header))
    script_path.chmod(0o755)
    return [config_path, script_path]


def check_exportable(checkpoint: Path, shown: str) -> dict:
    """The checkpoint's kdcache.json (or {}), once it is known to carry kdcache's qwen2_base chat template."""
    if not (checkpoint / "config.json").is_file():
        raise KdcacheError(f"{shown} is not a checkpoint directory (no config.json); --export needs the directory "
                           "`kdcache train` saved (RUN/final)")
    if re.search(r"[,=\s]", str(checkpoint)):
        raise KdcacheError(f"{checkpoint}: lmms-eval reads model_args as comma-separated key=value pairs, so the "
                           "checkpoint path may not hold ',', '=' or spaces; move or link it")
    history = _json(checkpoint / "kdcache.json") if (checkpoint / "kdcache.json").is_file() else {}
    found = saved_chat_template(checkpoint)
    if found == chat_template("qwen2_base"):
        return history
    if found == chat_template("plain"):
        why = "carries the plain template of a pt/dpt stage; the benchmarks need a student trained by sft or dft"
    elif history.get("template_version") not in (None, TEMPLATE_VERSION):
        why = (f"was trained on template version {history['template_version']} sequences, which no chat template "
               "reproduces: dump its caches again and retrain it with this kdcache")
    elif found is None:
        why = "has no chat template (lmms-eval would prompt it with its Vicuna default): save it with this kdcache"
    else:
        why = "has a chat template that is not kdcache's qwen2_base one, so lmms-eval would not prompt it as trained"
    raise KdcacheError(f"{shown} {why}")


def saved_chat_template(checkpoint: Path) -> str | None:
    """The tokenizer's chat template as saved: chat_template.jinja, else tokenizer_config.json's entry."""
    jinja = checkpoint / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = checkpoint / "tokenizer_config.json"
    template = _json(config).get("chat_template") if config.is_file() else None
    return template if isinstance(template, str) else None


def parse_tasks(tasks: str | None) -> list[str]:
    if tasks is None:
        return list(PAPER_TASKS.values())
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    bad = [t for t in names if not _TASK.fullmatch(t)]
    if not names or bad:
        raise KdcacheError(f"--tasks must be comma-separated lmms-eval task names, got {tasks!r}")
    return names


def lmms_eval_runs(checkpoint: Path, tasks: list[str], results: Path, dtype: str) -> list[dict]:
    """lmms-eval's --config content: one run, keys named as its command-line options."""
    return [{"model": "llava_hf", "model_args": f"pretrained={checkpoint},dtype={dtype}",
             "tasks": ",".join(tasks), "batch_size": 1, "log_samples": True, "output_path": str(results)}]


def _header(checkpoint: Path, history: dict, tasks: list[str]) -> str:
    paper = {task: name for name, task in PAPER_TASKS.items()}
    lines = [f"Written by `kdcache eval --export lmms-eval` (kdcache {kdcache.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}); nothing has been run.",
             f"checkpoint: {checkpoint} (stages {', '.join(history.get('stages', [])) or 'unknown'})",
             "Its chat template is kdcache's qwen2_base (template version 2): lmms-eval's llava_hf renders",
             "every prompt with it, and the prompt tokenises to exactly what the student was trained on.",
             f"Needs: pip install 'lmms-eval=={LMMS_EVAL_VERSION}' (or kdcache[eval]) and a GPU; the benchmark data",
             "download from the Hugging Face hub (lmms-lab-encoder/*) on first use.",
             "Tasks: " + ", ".join(f"{t} ({paper[t]})" if t in paper else t for t in tasks)]
    if any(t in SUBMISSION_TASKS for t in tasks):
        lines.append("vqav2_test and vizwiz_vqa_test write submission files for the EvalAI test-dev servers "
                     "(no local score).")
    if any(t in JUDGED_TASKS for t in tasks):
        lines.append("mmbench_en_dev and mmbench_cn_dev extract answers with a GPT judge: set OPENAI_API_KEY.")
    return "".join(f"# {line}\n" for line in lines)


def _script(header: str) -> str:
    return ("#!/usr/bin/env bash\n" + header +
            "# NUM_PROCESSES: one process per GPU (llava_hf runs batch size 1); extra arguments go to lmms-eval.\n"
            "set -euo pipefail\n"
            'cd "$(dirname "$0")"\n'
            'accelerate launch --num_processes "${NUM_PROCESSES:-1}" -m lmms_eval '
            f'--config {shlex.quote(CONFIG_FILE)} "$@"\n')


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KdcacheError(f"cannot read {path}: {e}") from None
    if not isinstance(value, dict):
        raise KdcacheError(f"{path} must be a JSON object")
    return value
