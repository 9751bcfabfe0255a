"""RUN/run.json: the settings of a training run's first start, which a resumed run must match.

A resume that changes what the run computes (another student, cache, learning rate, global batch,
seed, ...) would silently continue a different run in the same directory; `check_resumed_settings`
refuses it, naming each changed setting. The cache is identified by its manifest's sha256 and a
dataset by its file's sha256, so a cache or dataset moved to another path is still the same.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import kdcache
from kdcache import config as configs, samples
from kdcache.errors import KdcacheError
from kdcache.files import write_json_atomic
from kdcache.reader import manifest_identity
from kdcache.remote import RemoteConfig, redacted
from student_train.config import TrainConfig

RUN_RECORD = "run.json"        # RUN/run.json: the settings of the run's first start, which a resume must match
# Settings a resumed run may change: how long it runs (the schedule stretches over the new total),
# how often it saves and logs, how it executes (device, workers, memory and sharding knobs that leave
# the arithmetic as it was, up to float rounding) and the input size limits (a sample they pass is
# read the same). Everything else in the resolved TrainConfig must match: the student (its local
# path resolved), the cache (by its manifest's sha256, not its path), the data (by its sha256),
# stage, template, lr, batch sizes, seed, loss weights and options. A setting that one of the two
# records lacks (a field added or removed by a kdcache upgrade between them) is not compared.
SAFE_TO_CHANGE = ("max_steps", "epochs", "save_every", "log_every", "num_workers", "progress", "device",
                  "grad_checkpointing", "chunk_rows", "fsdp", "trust_remote_code", "max_image_mb",
                  "max_image_pixels", "cache_dataset",
                  # how a cache URL is reached (the cache itself is compared by its manifest's sha256)
                  *(f.name for f in dataclasses.fields(RemoteConfig)))
# Not compared as given: the run itself (out, resume); cache and data are compared by content; grad_accum
# through the samples per optimizer step (batch_size x grad_accum x world size), so a resume on another
# world size with the same global batch is accepted.
_NOT_COMPARED_AS_GIVEN = ("out", "resume", "cache", "data", "grad_accum")


def run_settings(cfg: TrainConfig, world_size: int) -> dict:
    """What a resumed run must match (see SAFE_TO_CHANGE): the resolved fields, the data by content."""
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in SAFE_TO_CHANGE and f.name not in _NOT_COMPARED_AS_GIVEN}
    settings["student"] = local_or_spec(cfg.student)
    settings["images"] = None if cfg.images is None else local_or_spec(cfg.images)
    settings["cache"] = None if cfg.cache is None else manifest_identity(cfg.cache, cfg)
    settings["data"] = None if cfg.data is None else dataset_sha256(cfg.data)
    settings["samples_per_step"] = cfg.batch_size * cfg.grad_accum * world_size
    return settings


def local_or_spec(spec: str) -> str:
    """An existing local path, resolved (a run may resume from another working directory); else as given."""
    path = Path(spec)
    return str(path.resolve()) if path.exists() else spec


def dataset_sha256(data: str) -> str | None:
    try:
        return samples.dataset_fingerprint(data)
    except OSError:
        return None                                   # unreadable: the dataset's loader names the problem


def check_resumed_settings(run_dir: Path, cfg: TrainConfig, settings: dict) -> None:
    """A resumed run must be the same run: refuse settings that differ from RUN/run.json, naming them."""
    path = run_dir / RUN_RECORD
    if not (cfg.resume and path.is_file()):
        return                                        # a first start (or a run from before run.json): recorded later
    try:
        before = json.loads(path.read_text())["settings"]
        if not isinstance(before, dict):
            raise ValueError("'settings' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KdcacheError(f"{path} is unreadable ({' '.join(str(e).split())}); restore it, or start a new run "
                           "with another --out") from None
    changed = [name for name in sorted(set(before) & set(settings)) if before[name] != settings[name]]
    if changed:
        raise KdcacheError(f"{run_dir} was started with other settings: "
                           + "; ".join(describe_change(name, before.get(name), settings.get(name)) for name in changed)
                           + f". Resume with the settings recorded in {path} (only {', '.join(SAFE_TO_CHANGE)} "
                           "may change), or start a new run with another --out")


def describe_change(name: str, before, now) -> str:
    def show(value):
        text = str(value)
        return text[:19] + "..." if name in ("cache", "data") and value is not None else text

    label = {"cache": "cache (manifest.json sha256)", "data": "data (sha256)",
             "samples_per_step": "samples per step (batch_size x grad_accum x world size)"}.get(name, name)
    return f"{label} was {show(before)}, now {show(now)}"


def record_run(run_dir: Path, cfg: TrainConfig, settings: dict, world_size: int) -> None:
    """At a run's first start: RUN/run.json (what a resume must match) and RUN/config.yaml (the resolved config).

    A resumed run keeps both as they were (its settings were checked against run.json).
    """
    path = run_dir / RUN_RECORD
    if cfg.resume and path.is_file():
        return
    write_json_atomic(path, {"settings": settings, "safe_to_change": list(SAFE_TO_CHANGE),
                             "world_size": world_size, "kdcache_version": kdcache.__version__,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    configs.save_yaml(dataclasses.replace(cfg, storage_option=tuple(redacted(cfg.storage_option))),
                      run_dir / "config.yaml")          # no secrets on disk
