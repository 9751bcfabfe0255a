"""The `kdcache` command line: parse, lazy-import, call. `kdcache --help` imports no torch.

`dump` and `train` take their flags from the fields of `DumpConfig` / `TrainConfig`: a field's
type, help, choices and default are declared once, in its dataclass, and turned into a typer option
here (`config_command`). A YAML file (`--config`) gives values below the flags.

Known errors (KdcacheError) and OS errors print one line and exit 1; set KDCACHE_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
from typing import Any, Callable, NamedTuple, Optional

import typer

from kdcache import config as configs
from kdcache.remote import RemoteConfig
from kdcache.templates import TEMPLATES
from student_train.config import TrainConfig
from teacher_dump.config import DumpConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Offline LLaVA-KD: dump a teacher's targets once into a cache, train students from it.")


def clean_errors(fn):
    """Turn known errors and OS errors into one clean line and exit 1 (KDCACHE_DEBUG=1: the traceback).

    A KdcacheError prints its message (for one re-raised from a DataLoader worker, the worker's
    original message), collapsed to one line; an OSError (disk full, read-only or missing folder, a
    file where a folder is expected) prints ``<path>: <reason>``.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from kdcache.errors import KdcacheError

        try:
            return fn(*args, **kwargs)
        except (KdcacheError, OSError) as e:
            if os.environ.get("KDCACHE_DEBUG"):
                raise
            typer.echo(f"error: {error_line(e)}", err=True)
            raise typer.Exit(1)

    return wrapper


def error_line(e: BaseException) -> str:
    """The one line `clean_errors` prints for `e` (without the ``error:`` prefix)."""
    from kdcache.errors import one_line

    if isinstance(e, OSError) and e.strerror:
        paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
        return one_line(f"{' -> '.join(paths)}: {e.strerror}" if paths else e.strerror)
    return one_line(str(e)) or type(e).__name__


class Shorthand(NamedTuple):
    """A flag that is not a field: its value fills each of `fields` not given on the command line."""
    name: str
    fields: tuple[str, ...]
    help: str


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def _option(name: str, annotation: Any, *decls: str, help: str, metavar: str | None = None) -> inspect.Parameter:
    # Every option defaults to None, so that only the flags actually given override the YAML file.
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[annotation],
                             default=typer.Option(None, *decls, help=help, show_default=False, metavar=metavar))


def field_options(cls: type, aliases: dict[str, tuple[str, ...]]) -> list[inspect.Parameter]:
    """One option per dataclass field: ``--x/--no-x`` for a bool, text for a Literal (checked by the config)."""
    params = []
    own = set(cls.__dict__.get("__annotations__", {}))        # a class's own fields first, inherited ones after
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name not in own):
        tp = configs.value_type(configs.field_types(cls)[f.name])
        flag = flag_of(f.name)
        if tp is bool:
            decls = (f"{flag}/--no-{flag[2:]}",)
        else:
            decls = (flag, *aliases.get(f.name, ()))
        # Literal choices are checked in one place, the config, for flags, YAML and Python alike.
        literal = configs.choices_of(tp) is not None
        annotation = list[str] if configs.is_text_list(tp) else str if literal else tp
        params.append(_option(f.name, annotation, *decls, help=configs.field_help(cls, f),
                              metavar="<choice>" if literal else f.metadata.get("metavar")))
    return params


def shorthand_options(cls: type, shorthands: tuple[Shorthand, ...]) -> list[inspect.Parameter]:
    """Shorthands take the type and the default of the first field they fill."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    params = []
    for short in shorthands:
        target = fields[short.fields[0]]
        annotation = configs.value_type(configs.field_types(cls)[target.name])
        params.append(_option(short.name, annotation, flag_of(short.name),
                              help=f"{short.help}  [default: {configs.show(target.default)}]"))
    return params


def parse_config(cls: type[configs.C], given: dict[str, Any], shorthands: tuple[Shorthand, ...]) -> configs.C:
    """The config from YAML (`given["config"]`) <- the flags given, shorthands filling the fields left unset."""
    given = dict(given)
    values = configs.load_yaml(given.pop("config"))
    for short in shorthands:
        value = given.pop(short.name)
        for name in short.fields:
            if given[name] is None:
                given[name] = value
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if given[name] is None and name not in values]
    if missing:
        raise typer.BadParameter(f"missing {', '.join(flag_of(name) for name in missing)} (as flags or in --config)")
    return configs.build(cls, values, given)


def config_command(cls: type, run: Callable[[Any], None], *, shorthands: tuple[Shorthand, ...] = (),
                   aliases: dict[str, tuple[str, ...]] | None = None) -> Callable[..., None]:
    """A typer callback whose options are `cls`'s fields (plus shorthands and --config); it calls run(config)."""

    def command(**given) -> None:
        run(parse_config(cls, given, shorthands))

    config = _option("config", str, "--config", help=f"YAML file of {cls.__name__} fields; flags override it.")
    # typer reads the options from the signature: generate it instead of writing every field again.
    command.__signature__ = inspect.Signature(
        [*field_options(cls, aliases or {}), *shorthand_options(cls, shorthands), config])
    return clean_errors(command)


def remote_command(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` with `RemoteConfig`'s fields as flags (storage options, network, shard cache, manifest pin),
    given to it as one `remote=RemoteConfig(...)` argument."""
    names = [f.name for f in dataclasses.fields(RemoteConfig)]
    own = [p for p in inspect.signature(fn).parameters.values() if p.name != "remote"]

    @functools.wraps(fn)
    def command(**given):
        remote = configs.build(RemoteConfig, {}, {name: given.pop(name) for name in names})
        return fn(**given, remote=remote)

    command.__signature__ = inspect.Signature([*own, *field_options(RemoteConfig, {})])
    return clean_errors(command)


def run_dump(cfg: DumpConfig) -> None:
    from teacher_dump.dump import dump

    manifest = dump(cfg)
    if manifest is not None:
        typer.echo(f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {cfg.out}"
                   + (f" ({len(manifest['skipped'])} skipped)" if manifest.get("skipped") else ""))


def run_train(cfg: TrainConfig) -> None:
    from student_train.train import train

    final = train(cfg)
    if final is not None:
        typer.echo(f"final student saved to {final}")


DUMP_SHORTHANDS = (
    Shorthand("topk", ("topk_response", "topk_visual"),
              "k for both roles; --topk-response / --topk-visual override it."),
    Shorthand("temperature", ("temperature_response", "temperature_visual"),
              "Softmax temperature for both roles; --temperature-response / --temperature-visual override it."),
)

app.command(
    name="dump", help="Run the teacher once over a dataset and write top-k targets and relations to a cache.",
    epilog="Examples:\n\n  kdcache dump --teacher runs/teacher/final --data qa.json --images imgs/ --out cache/\n\n"
           "  torchrun --nproc-per-node 8 -m kdcache.cli dump --teacher T --data D.json --images I --out C\n\n"
           "  kdcache dump --config dump.yaml --max-samples 100",
)(config_command(DumpConfig, run_dump, shorthands=DUMP_SHORTHANDS, aliases={"shard_size_mb": ("--shard-size",)}))

app.command(
    name="train", help="Train a student through one stage (PT / SFT / DPT / DFT) from a cache or a dataset.",
    epilog="Examples:\n\n  kdcache train --stage dft --student runs/sft/final --cache cache/ --out runs/dft\n\n"
           "  kdcache train --stage pt --student qwen1.5-0.5b --data blip.json --images imgs/ --out runs/pt\n\n"
           "  torchrun --nproc-per-node 4 -m kdcache.cli train --stage dpt --student qwen1.5-0.5b --cache C --out R",
)(config_command(TrainConfig, run_train))


# `inspect_cache`, not `inspect`: the module `inspect` builds the generated signatures above.
@app.command(name="inspect",
             epilog="Examples:\n\n  kdcache inspect cache/\n\n  kdcache inspect s3://bucket/caches/llava-kd-4b\n\n"
                    "  kdcache inspect s3://labs/kd-4b --storage-option endpoint_url=http://127.0.0.1:9000")
@remote_command
def inspect_cache(cache: str = typer.Argument(..., help="Cache directory or fsspec URL."), *, remote: RemoteConfig):
    """Summarise a cache from its manifest: identity, teacher, tokenizer, samples, bytes, tail mass per role,
    skipped samples."""
    from kdcache.audit import describe_cache

    typer.echo(describe_cache(cache, remote=remote))


@app.command(epilog="Examples:\n\n  kdcache verify cache/ && echo ok\n\n  kdcache verify --quick s3://bucket/caches/llava-kd-4b"
                    "\n\n  kdcache verify cache/ --expect-manifest sha256:4f0c...")
@remote_command
def verify(cache: str = typer.Argument(..., help="Cache directory or fsspec URL."),
           quick: bool = typer.Option(False, "--quick", help="Checksums, schema, sample ids and counts only; "
                                                              "do not decode and check every row."),
           *, remote: RemoteConfig):
    """Check the manifest (against its seal manifest.sha256 and --expect-manifest), checksums, schema, sample
    ids, counts, path safety and (unless --quick) every row, as training would read it; print one line per
    fault and exit non-zero on any. A cache URL's shards are checked in the local shard cache."""
    from kdcache.reader import manifest_identity
    from kdcache.audit import verify_cache

    faults = verify_cache(cache, quick=quick, remote=remote)
    for fault in faults:
        typer.echo(f"FAULT: {fault}", err=True)
    if faults:
        raise typer.Exit(1)
    typer.echo(f"{cache}: ok (manifest {manifest_identity(cache, remote)})")


@app.command(epilog="Examples:\n\n  kdcache check --student runs/sft/final --cache s3://labs/kd-4b\n\n"
                    "  kdcache check --student qwen1.5-0.5b --cache https://example.org/caches/kd-4b")
@remote_command
def check(student: str = typer.Option(..., help="Student: checkpoint dir, hub id or preset."),
          cache: str = typer.Option(..., help="Cache directory or URL (only its manifest is read)."),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
          *, remote: RemoteConfig):
    """Say whether a student can train from a cache (tokenizer, vocabulary, image token, visual_len, image
    processor) from the cache's manifest alone, before any shard is downloaded; exit 1 if not."""
    from kdcache.compat import check_cache_for_student

    identity = check_cache_for_student(cache, student, remote=remote, trust_remote_code=trust_remote_code)
    typer.echo(f"{cache}: student {student} fits this cache (manifest {identity})")


@app.command(epilog="Examples:\n\n  kdcache push cache/ s3://labs/caches/kd-4b\n\n"
                    "  kdcache push cache/ s3://labs/kd-4b --storage-option endpoint_url=http://127.0.0.1:9000")
@remote_command
def push(cache: str = typer.Argument(..., help="The local cache to publish."),
         url: str = typer.Argument(..., help="Where it goes: an fsspec URL (s3://bucket/prefix, ...)."),
         verify_copy: bool = typer.Option(True, "--verify/--no-verify", help="Download the remote copy once and "
                                                                                 "check every shard's sha256."),
         *, remote: RemoteConfig):
    """Publish a cache: its shards first, then its seal and manifest (so a reader never sees a half-uploaded
    cache), then check the remote copy. Rerun to resume; a URL holding another cache is refused."""
    from kdcache.transfer import push_cache

    identity = push_cache(cache, url, remote=remote, verify=verify_copy)
    typer.echo(f"pushed {cache} to {url} (manifest {identity})")


@app.command(epilog="Examples:\n\n  kdcache pull s3://labs/caches/kd-4b cache/\n\n"
                    "  kdcache pull s3://labs/caches/kd-4b small/ --samples 1000")
@remote_command
def pull(url: str = typer.Argument(..., help="The cache URL (or directory) to copy."),
         directory: str = typer.Argument(..., help="Local directory for the copy."),
         shards: Optional[int] = typer.Option(None, min=1, help="Only the first N shards (a smaller valid cache)."),
         samples: Optional[int] = typer.Option(None, min=1, help="Only the first N samples (a smaller valid cache)."),
         *, remote: RemoteConfig):
    """Copy a cache to a local directory: a complete mirror (the same manifest, so the same cache), or with
    --shards / --samples a smaller valid cache whose manifest records where it came from. Every shard is
    checked against its sha256; rerun to resume."""
    from kdcache.transfer import pull_cache

    manifest = pull_cache(url, directory, remote=remote, shards=shards, samples=samples)
    typer.echo(f"pulled {manifest['num_samples']} samples in {len(manifest['shards'])} shards into {directory}")


@app.command(name="eval", epilog="Examples:\n\n  kdcache eval --model runs/dft/final --data eval.json --images imgs/\n\n"
                                   "  kdcache eval --model runs/dft/final --export lmms-eval\n\n"
                                   "  kdcache eval --model runs/dft/final --export lmms-eval --tasks gqa,pope --out ev/")
@clean_errors
def evaluate(
    model: str = typer.Option(..., help="Checkpoint directory (or preset/hub id; --export: a directory)."),
    data: Optional[str] = typer.Option(None, help="LLaVA JSON/JSONL with reference answers (required "
                                                  "unless --export)."),
    images: Optional[str] = typer.Option(None, help="Image folder."),
    template: str = typer.Option("qwen2_base", metavar="<choice>",
                                 help=f"Conversation template.  [choices: {' | '.join(TEMPLATES)}]"),
    max_samples: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N samples."),
    max_new_tokens: int = typer.Option(8, min=1, help="Greedy tokens per answer."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    export: Optional[str] = typer.Option(None, metavar="<choice>", help="Evaluate nothing; write a ready-to-run "
                                         "command and config for this external evaluator.  [choices: lmms-eval]"),
    out: Optional[str] = typer.Option(None, help="With --export: the folder for its files.  "
                                                 "[default: lmms-eval/ beside the checkpoint]"),
    tasks: Optional[str] = typer.Option(None, help="With --export: comma-separated lmms-eval tasks.  "
                                                   "[default: the LLaVA-KD paper's ten benchmarks]"),
):
    """Greedy generation and exact-match accuracy per question type; or, with --export, an lmms-eval run."""
    import json

    if export is not None:
        given = [flag for flag, value in (("--data", data), ("--images", images), ("--max-samples", max_samples))
                 if value is not None]
        if given:
            raise typer.BadParameter(f"{', '.join(given)}: --export writes an evaluator's run and evaluates nothing")
        from kdcache.export import export as write_export

        for path in write_export(export, model, out, tasks):
            typer.echo(f"wrote {path}")
        return
    if out is not None or tasks is not None:
        raise typer.BadParameter("--out and --tasks go with --export")
    if data is None:
        raise typer.BadParameter("missing --data (or --export)")
    configs.check_choice("template", template, TEMPLATES)
    from kdcache.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(model, data, images, template=template, max_samples=max_samples,
                                 max_new_tokens=max_new_tokens, device=device)
    typer.echo(json.dumps(report, indent=2))


@app.command(epilog="Examples:\n\n  kdcache quickstart --out quickstart/")
@clean_errors
def quickstart(
    out: str = typer.Option("quickstart", help="Where the toy data, caches, runs and report go."),
    seed: int = typer.Option(0, help="Seed for data and models."),
    train_teacher: bool = typer.Option(False, help="Train the teacher now (PT, SFT on 2-3-object scenes, SFT: 4,700 "
                                       "steps from the stored text-pretrained teacher LM, ~20 min) instead of using "
                                       "the stored toy-teacher."),
):
    """Run the whole recipe on the embedded toy world, on a CPU, in minutes."""
    from kdcache.toy.recipe import run_quickstart

    run_quickstart(out, seed=seed, train_teacher=train_teacher)


@app.command(epilog="Examples:\n\n  kdcache convert --from tinyllava LLaVA-KD-student/ student-llava/")
@clean_errors
def convert(
    src: str = typer.Argument(..., help="The checkpoint directory to convert (safetensors weights)."),
    dst: str = typer.Argument(..., help="Where the LLaVA checkpoint directory goes."),
    from_format: str = typer.Option(..., "--from", help="The format of SRC: tinyllava (TinyLLaVA Factory)."),
):
    """Convert another format's checkpoint into a LLaVA checkpoint that kdcache loads."""
    from kdcache.convert import convert as run_convert

    out = run_convert(from_format, src, dst)
    typer.echo(f"wrote {out}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
