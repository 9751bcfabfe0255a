"""kdcache dump: run the teacher once, teacher-forced, and write its distillation targets to a cache.

    dump(cfg) = setup (load the teacher, check or record the run) -> this rank's pending records
              -> dump_records(teacher, records, cfg, writer) -> finalize (rank report, manifest)

Under torchrun every rank takes the samples `i % world_size == rank`, writes its own shards, and
rank 0 merges the manifest once all ranks are done. A killed dump is resumed by running the same
command again: finished shards are kept, the samples in them are not dumped twice, partial shards
are discarded (docs/design.md §4, §8).

`dump_records` overlaps three stages (`kdcache.pipeline`, docs/design.md §9): a thread prepares
batches ahead of the teacher (`teacher_dump/prepare.py`: images read and decoded by a small pool,
sequences tokenised, padded, pinned on CUDA), this thread runs the teacher forward and its targets
(`teacher_dump/forward.py`), and a writer thread encodes, compresses, hashes and writes the records
behind it, in order: the shards are byte for byte those of a serial dump, and an error in any stage
names its sample and leaves a resumable cache.

Hostile conditions (§8): `--out` is locked for the dump's lifetime (`kdcache.lock`: a second dump on
it fails at once naming the holder; a killed dump's lock is taken over); an `--out` that is a file,
an empty dataset, or a dataset whose every sample was skipped is a one-line error (the last leaves
the partial cache, with its skip reasons in `_parts/`, and writes no manifest); an unreadable run
record is rewritten while no shard exists and refused once one does; OS errors of the dump's own
writes (disk full, read-only or unwritable --out) are one-line errors naming the path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import kdcache
from kdcache import distributed, lock, models, pipeline, samples, schema, templates
from kdcache.errors import KdcacheError, one_line
from kdcache.fidelity import Fidelity
from kdcache.files import write_json_atomic
from kdcache.writer import ShardWriter, completed_sample_ids, finalize_cache, write_rank_report
from teacher_dump.config import DumpConfig
from teacher_dump.forward import Teacher, teacher_targets, write_targets
from teacher_dump.prepare import prepared_batches

# What a resumed dump must match: the manifest fields that decide the cache's content.
RUN_KEYS = ("teacher", "tokenizer", "visual_len", "template", "template_version", "max_length", "topk",
            "temperature", "relation", "images_embedded", "dataset", "targets")

# How far the background stages reach (docs/design.md §9): batches prepared ahead of the teacher and batches of
# targets waiting for the writer (the decoding threads: `teacher_dump.prepare.DECODE_THREADS`).
PREFETCH_BATCHES = 2
WRITE_BEHIND_BATCHES = 2


def dump(cfg: DumpConfig) -> dict | None:
    """Run the dump described by `cfg`; returns the manifest on rank 0 (None on other ranks)."""
    topo = distributed.topology()
    distributed.init_process_group(topo, backend="gloo")   # coordination only: no tensors move
    out = Path(cfg.out)
    # rank 0 locks --out (creating it) and, holding the lock, checks that it may be written
    with lock.storage_errors(out), \
            lock.job_lock(out, job="dump", is_main=topo.is_main, check=lambda: refuse_used_out(out, cfg)):
        return run_dump(cfg, topo, out)


def run_dump(cfg: DumpConfig, topo, out: Path) -> dict | None:
    """setup -> dump -> finalize, in a checked and locked --out."""
    # --- setup
    dataset = load_dataset(cfg)
    device = distributed.resolve_device(cfg.device, topo)
    bundle, teacher = load_teacher(cfg, device, models.resolve_dtype(cfg.dtype, device))
    run = run_description(cfg, bundle, teacher, topo.world_size)     # --out exists: the lock made it
    lock.on_main_rank(lambda: check_or_record_run(out, run), is_main=topo.is_main)
    distributed.barrier()

    # --- data: this rank's share of the samples that are not in a finished shard yet
    done = completed_sample_ids(out)
    records = [r for i, r in enumerate(dataset) if i % topo.world_size == topo.rank and r.sample_id not in done]

    # --- dump
    desc = f"dump {out.name}" + (f" rank 0/{topo.world_size}" if topo.world_size > 1 else "")
    kinds = {role: cfg.target_kind(role) for role in schema.ROLES}
    fidelity = Fidelity(cfg.fidelity_sample, cfg.codec, kinds=kinds) if cfg.fidelity_sample else None
    with open_writer(cfg, topo.rank) as writer:
        skipped = dump_records(teacher, records, cfg, writer, progress=cfg.progress and topo.is_main, desc=desc,
                               fidelity=fidelity)

    # --- finalize: every rank reports, then rank 0 writes the manifest, last
    write_rank_report(out, topo.rank, skipped=skipped, fidelity=None if fidelity is None else fidelity.sums())
    distributed.barrier()
    manifest = lock.on_main_rank(lambda: finalize(out, run, cfg, len(dataset), skipped), is_main=topo.is_main)
    distributed.barrier()
    distributed.destroy_process_group()
    return manifest


def dump_records(teacher: Teacher, records: list[samples.Record], cfg: DumpConfig, writer: ShardWriter, *,
                 progress: bool | None = None, desc: str = "dump", timings: dict | None = None,
                 fidelity: Fidelity | None = None) -> list[dict]:
    """Teacher targets of `records`, `cfg.batch_size` samples per forward, written to `writer`.

    Preparation runs ahead in a background thread (`prepared_batches`), the writing behind in another
    (`write_targets`), this thread runs the teacher (`teacher_targets`). An error in any stage stops all
    three: the samples before the failing one are written (as a serial dump writes them), the earliest
    error in sample order is raised, naming its sample, and the caller's ShardWriter then discards the
    open shard, so the cache stays resumable.

    Returns the skipped samples `[{"sample_id", "reason"}]`: a bad sample raises SampleError naming
    it, or with `cfg.skip_bad` is recorded and skipped. `progress` defaults to `cfg.progress`.
    `timings`, when given, receives each stage's `pipeline.StageTimes` (busy and waiting seconds).
    `fidelity`, when given, measures the first samples in it (`kdcache dump --fidelity-sample`).
    """
    skipped: list[dict] = []
    bar = tqdm(total=len(records), unit="sample", desc=desc,
               disable=not (cfg.progress if progress is None else progress))
    batches = pipeline.Ahead(prepared_batches(records, cfg, teacher, skipped), depth=PREFETCH_BATCHES,
                             name="kdcache-prepare")
    shards = pipeline.Behind(lambda batch_targets: write_targets(batch_targets, cfg, writer),
                             depth=WRITE_BEHIND_BATCHES, name="kdcache-write")
    teacher_times = pipeline.StageTimes()
    try:
        run_teacher(batches, shards, teacher, cfg, bar, skipped, teacher_times, fidelity)
        shards.finish()
    except Exception as error:
        batches.close()
        earlier = shards.drain()            # the batches before the failure are still written
        raise error if earlier is None else earlier
    except BaseException:                   # KeyboardInterrupt and the like: stop at once
        batches.close()
        shards.cancel()
        raise
    finally:
        batches.close()
        bar.close()
    if timings is not None:
        timings.update(prepare=batches.times, teacher=teacher_times, write=shards.times,
                       teacher_waiting_for_prepare=batches.waited, teacher_waiting_for_write=shards.waited)
    return skipped


def run_teacher(batches, shards: pipeline.Behind, teacher: Teacher, cfg: DumpConfig, bar, skipped: list[dict],
                times: pipeline.StageTimes, fidelity: Fidelity | None = None) -> None:
    """The teacher stage: each prepared batch through `teacher_targets`, handed to the writer; the progress bar."""
    counted, tokens, started = 0, 0, time.perf_counter()
    for batch in batches:
        with times.busy():
            try:
                batch_targets = teacher_targets(batch, teacher, cfg, fidelity)
            except (KdcacheError, OSError):
                raise
            except Exception as e:              # a torch/CUDA failure: name the batch's samples
                ids = [p.sample_id for p in batch.samples]
                raise KdcacheError(f"samples {ids}: the teacher forward or its targets failed: {one_line(e)}") from e
        shards.put(batch_targets)
        tokens += sum(len(p.sequence.input_ids) for p in batch.samples)
        done = len(skipped)                     # appended by the preparing thread
        bar.update(len(batch.samples) + done - counted)
        counted = done
        bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", skipped=counted)
    bar.update(len(skipped) - counted)


# --- setup


def refuse_used_out(out: Path, cfg: DumpConfig) -> None:
    """A finished cache is never overwritten; with --no-resume neither is a partial one.

    The lock file (`kdcache.lock.LOCK_NAME`, this dump's or a killed dump's) is not content.
    """
    if (out / schema.MANIFEST_NAME).exists():
        raise KdcacheError(f"{out} already holds a finished cache ({schema.MANIFEST_NAME}); choose another --out")
    if not cfg.resume and out.is_dir() and lock.entries(out):
        raise KdcacheError(f"{out} is not empty and --no-resume was given")


def load_dataset(cfg: DumpConfig) -> list[samples.Record]:
    """The dataset's records (the first --max-samples); an empty dataset is refused: it would make an empty cache."""
    records = samples.load_records(cfg.data)[: cfg.max_samples]
    if not records:
        raise KdcacheError(f"dataset {cfg.data} holds no samples: there is nothing to dump")
    return records


def load_teacher(cfg: DumpConfig, device: torch.device, dtype: torch.dtype) -> tuple[models.Bundle, Teacher]:
    """The teacher bundle (for provenance) and the loaded Teacher; refuses an untrained projector, a k above
    V and a head with fewer rows than the tokenizer has tokens."""
    bundle = models.load_bundle(cfg.teacher, dtype=dtype, revision=cfg.revision,
                                trust_remote_code=cfg.trust_remote_code)
    if not bundle.projector_trained and not cfg.allow_untrained:
        raise KdcacheError(
            f"teacher {cfg.teacher!r} has an untrained projector (a freshly composed preset or a checkpoint "
            "never trained): train it with `kdcache train --stage pt` then `--stage sft`, "
            "or pass --allow-untrained to dump it anyway")
    vocab_size = models.lm_head_weight(bundle.model).shape[0]
    topk = [cfg.row_width(role) for role in schema.ROLES if cfg.target_kind(role) == "topk"]   # draws may exceed V
    if topk and max(topk) > vocab_size:
        raise KdcacheError(f"top-k ({cfg.topk_response}, {cfg.topk_visual}) exceeds the teacher's vocabulary ({vocab_size})")
    if len(bundle.tokenizer) > vocab_size:     # a head may be padded past its tokenizer, never short of it
        raise KdcacheError(f"teacher {cfg.teacher!r} has {vocab_size} LM-head rows but its tokenizer has "
                           f"{len(bundle.tokenizer)} tokens; resize its embeddings to the tokenizer first")
    return bundle, Teacher.from_bundle(bundle, device=device, dtype=dtype, relation=cfg.relation)


def run_description(cfg: DumpConfig, bundle: models.Bundle, teacher: Teacher, world_size: int) -> dict:
    """The manifest fields that describe how this cache was made (`finalize_cache` adds the rest)."""
    return {
        "kdcache_version": kdcache.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"source": bundle.source, "revision": bundle.revision,
                    "config_hash": models.config_hash(teacher.model.config),
                    "dtype": str(teacher.dtype).removeprefix("torch.")},
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(teacher.tokenizer),
                      "class": type(teacher.tokenizer).__name__},
        "vocab_size": int(teacher.lm_head.shape[0]),          # head rows: bounds the top-k ids
        "tokenizer_size": len(teacher.tokenizer),              # may be less (a padded head): bounds input ids
        "image_token_id": teacher.image_token_id,
        "pad_token_id": int(teacher.tokenizer.pad_token_id),
        "eos_token_id": int(teacher.tokenizer.eos_token_id),
        "visual_len": teacher.visual_len,
        "image_processor": json.loads(teacher.image_processor.to_json_string()),
        "template": cfg.template,
        "template_version": templates.dump_template_version(bundle.template_version, cfg.template,
                                                            teacher=bundle.source),
        "max_length": cfg.max_length,
        "topk": {role: cfg.row_width(role) for role in schema.ROLES},      # entries per row: k, or N draws
        **dump_targets(cfg),
        "temperature": {"response": cfg.temperature_response, "visual": cfg.temperature_visual},
        "relation": cfg.relation,
        "images_embedded": cfg.embed_images,
        "dataset": {"source": str(cfg.data), "fingerprint": samples.dataset_fingerprint(cfg.data),
                    "images": cfg.images, "max_samples": cfg.max_samples},
        "world_size": world_size,
    }


def dump_targets(cfg: DumpConfig) -> dict:
    """The manifest's `targets` when a role is sampled (`schema.targets_entry`); nothing for a top-k-only dump,
    whose manifest is as before sampled targets existed (absent `targets` = top-k)."""
    kinds = {role: cfg.target_kind(role) for role in schema.ROLES}
    if all(kind == "topk" for kind in kinds.values()):
        return {}
    return {"targets": schema.targets_entry(kinds, {role: cfg.row_width(role) for role in schema.ROLES}, cfg.seed)}


def check_or_record_run(out: Path, run: dict) -> None:
    """A resumed dump must be the same dump: same teacher, data, template, k, temperatures and targets (a
    run record without `targets` is a top-k dump's)."""
    wanted = {k: run.get(k) for k in RUN_KEYS}
    path = out / schema.PARTS_DIR / schema.RUN_FILE
    has_shards = any(schema.parse_shard_name(p.name) for p in out.iterdir())
    if path.exists():
        try:
            before = json.loads(path.read_text())
            if not isinstance(before, dict):
                raise ValueError(f"a JSON {type(before).__name__}, not an object")
        except (OSError, ValueError) as e:            # empty or cut short: a copy or a file system that lost it
            if has_shards:
                raise KdcacheError(f"{path} is unreadable ({' '.join(str(e).split())}) and {out} holds finished "
                                   "shards, so the settings that made them are unknown: restore that file, or "
                                   f"delete {out} and dump again") from None
            before = None                             # nothing depends on it yet: recorded again below
        if before is not None:
            diff = sorted(k for k in RUN_KEYS if before.get(k) != wanted[k])
            if diff:
                raise KdcacheError(f"{out} holds a partial dump made with different settings ({', '.join(diff)}); "
                                   "rerun with the same settings to resume it, or choose another --out")
            return
    elif has_shards:
        raise KdcacheError(f"{out} holds shards but no record of the dump that made them; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, wanted)


def finalize(out: Path, run: dict, cfg: DumpConfig, num_records: int, skipped: list[dict]) -> dict:
    """The manifest (rank 0, once every rank has reported); refuses a cache without a single sample.

    A dump whose every sample was skipped keeps its partial cache (the skip reasons are in `_parts/`)
    and writes no manifest: fixing the samples and running the same command again resumes it.
    """
    if not completed_sample_ids(out):
        example = f" (first: sample {skipped[0]['sample_id']!r}: {skipped[0]['reason']})" if skipped else ""
        raise KdcacheError(f"no sample of {cfg.data} was dumped: all {num_records} were skipped as bad{example}; "
                           f"no manifest was written (the reasons are in {out / schema.PARTS_DIR}): fix the samples "
                           "and run the same command again")
    return finalize_cache(out, run)


def open_writer(cfg: DumpConfig, rank: int) -> ShardWriter:
    """This rank's shard writer for `cfg.out` (a context manager: a failure discards the open shard)."""
    return ShardWriter(cfg.out, rank=rank, k_response=cfg.row_width("response"), k_visual=cfg.row_width("visual"),
                       shard_size_bytes=int(cfg.shard_size_mb * (1 << 20)), codec=cfg.codec)
