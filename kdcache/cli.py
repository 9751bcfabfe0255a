"""The `kdcache` command line: parse, lazy-import, call. `kdcache --help` imports no torch.

Known errors (KdcacheError) print one line and exit 1; set KDCACHE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Offline LLaVA-KD: dump a teacher's targets once into a cache, train students from it.")


def clean_errors(fn):
    """Turn known errors into one clean line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kdcache.errors import KdcacheError

        try:
            return fn(*args, **kwargs)
        except KdcacheError as e:
            if os.environ.get("KDCACHE_DEBUG"):
                raise
            # Errors re-raised from DataLoader workers carry the worker's traceback: keep its last line.
            typer.echo(f"error: {str(e).strip().splitlines()[-1]}", err=True)
            raise typer.Exit(1)

    return wrapper


@app.command(epilog="Examples:\n\n  kdcache dump --teacher runs/teacher/final --data qa.json --images imgs/ --out cache/\n\n"
             "  torchrun --nproc-per-node 8 -m kdcache.cli dump --teacher T --data D.json --images I --out C\n\n"
             "  kdcache dump --config dump.yaml --max-samples 100")
@clean_errors
def dump(
    teacher: Optional[str] = typer.Option(None, help="Teacher: checkpoint dir, hub id or preset (qwen1.5-4b, ...)."),
    data: Optional[str] = typer.Option(None, help="LLaVA JSON or JSONL dataset."),
    images: Optional[str] = typer.Option(None, help="Folder the dataset's image paths are relative to."),
    out: Optional[str] = typer.Option(None, help="Cache directory to write (resumed if partial)."),
    template: Optional[str] = typer.Option(None, help="plain | qwen2_base [default: qwen2_base]."),
    topk: Optional[int] = typer.Option(None, help="k for both roles [default: 64]."),
    topk_visual: Optional[int] = typer.Option(None, help="k at visual rows (overrides --topk)."),
    topk_response: Optional[int] = typer.Option(None, help="k at response rows (overrides --topk)."),
    temperature: Optional[float] = typer.Option(None, help="Softmax temperature for both roles [default: 1]."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per teacher forward [default: 8]."),
    max_samples: Optional[int] = typer.Option(None, help="Dump only the first N samples."),
    max_length: Optional[int] = typer.Option(None, help="Longest sequence allowed [default: 2048]."),
    shard_size: Optional[float] = typer.Option(None, help="Target shard size in MB [default: 512]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N [default: auto]."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 [default: auto = bf16 on GPU]."),
    relation: Optional[bool] = typer.Option(None, "--relation/--no-relation", help="Store relation matrices [default: on]."),
    embed_images: Optional[bool] = typer.Option(None, "--embed-images/--no-embed-images", help="Embed image bytes [default: on]."),
    skip_bad: Optional[bool] = typer.Option(None, "--skip-bad", help="Skip bad samples, listing them in the manifest."),
    allow_untrained: Optional[bool] = typer.Option(None, "--allow-untrained", help="Dump a teacher whose projector was never trained."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Resume a partial cache at --out (always on; --no-resume refuses one)."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow custom model code from the checkpoint."),
    revision: Optional[str] = typer.Option(None, help="Hub revision of the teacher."),
    config: Optional[str] = typer.Option(None, help="YAML file of DumpConfig fields; flags override it."),
):
    """Run the teacher once over a dataset and write top-k targets and relations to a cache."""
    from kdcache import config as configs
    from teacher_dump.config import DumpConfig

    overrides = dict(teacher=teacher, data=data, images=images, out=out, template=template,
                     topk_visual=topk_visual if topk_visual is not None else topk,
                     topk_response=topk_response if topk_response is not None else topk,
                     temperature_response=temperature, temperature_visual=temperature,
                     batch_size=batch_size, max_samples=max_samples, max_length=max_length,
                     shard_size_mb=shard_size, device=device, dtype=dtype, relation=relation,
                     embed_images=embed_images, skip_bad=skip_bad, allow_untrained=allow_untrained,
                     trust_remote_code=trust_remote_code, revision=revision)
    values = configs.load_yaml(config)
    missing = [k for k in ("teacher", "data", "out") if overrides[k] is None and k not in values]
    if missing:
        raise typer.BadParameter(f"missing {', '.join('--' + m for m in missing)}")
    cfg = configs.build(DumpConfig, values, overrides)
    if not resume:
        from pathlib import Path

        from kdcache.errors import KdcacheError

        if Path(cfg.out).exists() and any(Path(cfg.out).iterdir()):
            raise KdcacheError(f"{cfg.out} is not empty and --no-resume was given")
    from teacher_dump.dump import dump as run_dump

    manifest = run_dump(cfg)
    if manifest is not None:
        typer.echo(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {cfg.out}"
                   + (f" ({len(manifest['skipped'])} skipped)" if manifest.get("skipped") else ""))


@app.command(epilog="Examples:\n\n  kdcache train --stage dft --student runs/sft/final --cache cache/ --out runs/dft\n\n"
             "  kdcache train --stage pt --student qwen1.5-0.5b --data blip.json --images imgs/ --out runs/pt\n\n"
             "  torchrun --nproc-per-node 4 -m kdcache.cli train --stage dpt --student qwen1.5-0.5b --cache C --out R")
@clean_errors
def train(
    stage: Optional[str] = typer.Option(None, help="pt | sft | dpt | dft."),
    student: Optional[str] = typer.Option(None, help="Student: checkpoint dir, hub id or preset."),
    out: Optional[str] = typer.Option(None, help="Run directory (config, metrics, checkpoints, final/)."),
    cache: Optional[str] = typer.Option(None, help="Cache written by `kdcache dump` (required for dpt/dft)."),
    data: Optional[str] = typer.Option(None, help="LLaVA JSON/JSONL for pt/sft without a cache."),
    images: Optional[str] = typer.Option(None, help="Image folder for --data (or for caches without embedded images)."),
    template: Optional[str] = typer.Option(None, help="plain | qwen2_base [default: the stage's]."),
    batch_size: Optional[int] = typer.Option(None, help="Per-device batch [default: 4]."),
    global_batch: Optional[int] = typer.Option(None, help="Global batch [default: 256 pt/dpt, 128 sft/dft]."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation [default: global / (batch x world)]."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [default: 1e-3 pt/dpt, 2e-5 sft/dft]."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after N optimizer steps."),
    epochs: Optional[int] = typer.Option(None, help="Epochs [default: 1]."),
    alpha: Optional[float] = typer.Option(None, help="Weight of the response KL [default: 1]."),
    beta: Optional[float] = typer.Option(None, help="Weight of the visual KL [default: 1]."),
    gamma: Optional[float] = typer.Option(None, help="Weight of the relation loss [default: 0.5]."),
    tail: Optional[str] = typer.Option(None, help="bucket | renorm [default: bucket]."),
    loss_norm: Optional[str] = typer.Option(None, help="token | sample [default: token]."),
    clip_grad: Optional[float] = typer.Option(None, help="Clip the gradient norm [default: off]."),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing", help="Recompute LLM activations in backward."),
    fsdp: Optional[bool] = typer.Option(None, "--fsdp", help="Shard the student with FSDP instead of DDP."),
    seed: Optional[int] = typer.Option(None, help="Seed for init and data order [default: 0]."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda [default: auto]."),
    num_workers: Optional[int] = typer.Option(None, help="DataLoader workers [default: 2]."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps [default: 500]."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue from the last checkpoint in --out."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow custom model code."),
    config: Optional[str] = typer.Option(None, help="YAML file of TrainConfig fields; flags override it."),
):
    """Train a student through one stage (PT / SFT / DPT / DFT) from a cache or a dataset."""
    from kdcache import config as configs
    from student_train.config import TrainConfig

    overrides = dict(stage=stage, student=student, out=out, cache=cache, data=data, images=images,
                     template=template, batch_size=batch_size, global_batch=global_batch, grad_accum=grad_accum,
                     lr=lr, max_steps=max_steps, epochs=epochs, alpha=alpha, beta=beta, gamma=gamma, tail=tail,
                     loss_norm=loss_norm, clip_grad=clip_grad, grad_checkpointing=grad_checkpointing, fsdp=fsdp,
                     seed=seed, device=device, num_workers=num_workers, save_every=save_every, resume=resume,
                     trust_remote_code=trust_remote_code)
    values = configs.load_yaml(config)
    missing = [k for k in ("stage", "student", "out") if overrides[k] is None and k not in values]
    if missing:
        raise typer.BadParameter(f"missing {', '.join('--' + m for m in missing)}")
    cfg = configs.build(TrainConfig, values, overrides)
    from student_train.train import train as run_train

    final = run_train(cfg)
    if final is not None:
        typer.echo(f"final student saved to {final}")


@app.command(epilog="Examples:\n\n  kdcache inspect cache/\n\n  kdcache inspect s3://bucket/caches/llava-kd-4b")
@clean_errors
def inspect(cache: str = typer.Argument(..., help="Cache directory or fsspec URL.")):
    """Summarise a cache: teacher, tokenizer, samples, bytes, tail mass per role, skipped samples."""
    from kdcache.reader import describe_cache

    typer.echo(describe_cache(cache))


@app.command(epilog="Examples:\n\n  kdcache verify cache/ && echo ok")
@clean_errors
def verify(cache: str = typer.Argument(..., help="Cache directory or fsspec URL.")):
    """Check checksums, schema, counts and path safety; exit non-zero naming each fault."""
    from kdcache.reader import verify_cache

    faults = verify_cache(cache)
    for fault in faults:
        typer.echo(f"FAULT: {fault}", err=True)
    if faults:
        raise typer.Exit(1)
    typer.echo(f"{cache}: ok")


@app.command(name="eval", epilog="Examples:\n\n  kdcache eval --model runs/dft/final --data eval.json --images imgs/")
@clean_errors
def evaluate(
    model: str = typer.Option(..., help="Checkpoint directory (or preset/hub id)."),
    data: str = typer.Option(..., help="LLaVA JSON/JSONL with reference answers."),
    images: Optional[str] = typer.Option(None, help="Image folder."),
    template: str = typer.Option("qwen2_base", help="plain | qwen2_base."),
    max_samples: Optional[int] = typer.Option(None, help="Evaluate only the first N samples."),
    max_new_tokens: int = typer.Option(8, help="Greedy tokens per answer."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
):
    """Greedy generation and exact-match accuracy per question type."""
    import json

    from kdcache.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(model, data, images, template=template, max_samples=max_samples,
                                 max_new_tokens=max_new_tokens, device=device)
    typer.echo(json.dumps(report, indent=2))


@app.command(epilog="Examples:\n\n  kdcache quickstart --out quickstart/")
@clean_errors
def quickstart(
    out: str = typer.Option("quickstart", help="Where the toy data, caches, runs and report go."),
    seed: int = typer.Option(0, help="Seed for data and models."),
):
    """Run the whole recipe on the embedded toy world, on a CPU, in minutes."""
    from kdcache.quickstart import run_quickstart

    run_quickstart(out, seed=seed)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
