"""kdcache dump: run the teacher once, teacher-forced, and write its distillation targets to a cache.

    dump(cfg) = setup (load the teacher, check or record the run) -> this rank's pending records
              -> dump_records(teacher, records, cfg, writer) -> finalize (rank report, manifest)

Under torchrun every rank takes the samples `i % world_size == rank`, writes its own shards, and
rank 0 merges the manifest once all ranks are done. A killed dump is resumed by running the same
command again: finished shards are kept, the samples in them are not dumped twice, partial shards
are discarded (docs/design.md §4, §8).

`dump_records` overlaps three stages (`kdcache.pipeline`, docs/design.md §9): a thread prepares
batches ahead of the teacher (images read and decoded by a small pool, sequences tokenised, padded,
pinned on CUDA), this thread runs the teacher forward and its targets, and a writer thread encodes,
compresses, hashes and writes the records behind it, in order: the shards are byte for byte those
of a serial dump, and an error in any stage names its sample and leaves a resumable cache.

Hostile conditions (§8): `--out` is locked for the dump's lifetime (`kdcache.lock`: a second dump on
it fails at once naming the holder; a killed dump's lock is taken over); an `--out` that is a file,
an empty dataset, or a dataset whose every sample was skipped is a one-line error (the last leaves
the partial cache, with its skip reasons in `_parts/`, and writes no manifest); an unreadable run
record is rewritten while no shard exists and refused once one does; OS errors of the dump's own
writes (disk full, read-only or unwritable --out) are one-line errors naming the path.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import kdcache
from kdcache import distributed, lock, models, pipeline, samples, schema, targets, templates
from kdcache.batches import pad_sequences
from kdcache.errors import KdcacheError, SampleError, one_line
from kdcache.fidelity import Fidelity
from kdcache.files import write_json_atomic
from kdcache.writer import ShardWriter, completed_sample_ids, finalize_cache, write_rank_report
from teacher_dump.config import DumpConfig

# What a resumed dump must match: the manifest fields that decide the cache's content.
RUN_KEYS = ("teacher", "tokenizer", "visual_len", "template", "template_version", "max_length", "topk",
            "temperature", "relation", "images_embedded", "dataset", "targets")

# How far the background stages reach (docs/design.md §9): batches prepared ahead of the teacher, batches of
# targets waiting for the writer, and threads reading and decoding images (each up to 2 samples ahead).
PREFETCH_BATCHES = 2
WRITE_BEHIND_BATCHES = 2
DECODE_THREADS = 4


@dataclass
class Teacher:
    """The loaded teacher, as the dump loop uses it."""

    model: torch.nn.Module              # LlavaForConditionalGeneration, eval mode, on `device`
    tokenizer: object
    image_processor: object
    lm_head: torch.Tensor               # (V, D) the output embedding, in the model's dtype
    gram: torch.Tensor | None           # (D, D) float32 WᵀW, once per dump; None without relations
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def from_bundle(cls, bundle: models.Bundle, *, device: torch.device, dtype: torch.dtype,
                    relation: bool) -> Teacher:
        model = bundle.model.to(device).eval()
        lm_head = models.lm_head_weight(model)
        with torch.no_grad():
            gram = targets.gram_matrix(lm_head) if relation else None
        return cls(model, bundle.tokenizer, bundle.image_processor, lm_head, gram, device, dtype)

    @property
    def visual_len(self) -> int:
        return models.visual_len_of(self.model.config)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)


@dataclass
class Prepared:
    """One sample ready for the teacher: the final sequence and its (decoded) image."""

    sample_id: str
    sequence: templates.Sequence
    image_bytes: bytes | None
    image: Image.Image | None


@dataclass
class PreparedBatch:
    """`batch_size` consecutive good samples and their teacher inputs (`batch_inputs`), made ahead of the teacher."""

    samples: list[Prepared]
    inputs: dict


@dataclass
class BatchTargets:
    """A batch's targets on their way to the host: what the writer thread turns into shard records."""

    samples: list[Prepared]
    topk: dict                  # role -> (ids (N, K) int32, logprobs (N, K) float16) over the batch's rows
                                # (a sampled role: K = --draws draws per row)
    counts: dict                # role -> rows per sample
    relations: list             # per sample: (packed (P,) float16, norm () float64), or None
    ready: object               # a torch.cuda.Event after the copies to the host (None on the CPU)


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


# --- samples -> teacher inputs (the preparing thread)


def prepared_batches(records, cfg: DumpConfig, teacher: Teacher, skipped: list[dict]):
    """Yield PreparedBatch: `cfg.batch_size` consecutive good samples with their teacher inputs."""
    for batch in batched(prepare_all(records, cfg, teacher, skipped), cfg.batch_size):
        yield PreparedBatch(batch, batch_inputs(batch, teacher))


def prepare_all(records, cfg: DumpConfig, teacher: Teacher, skipped: list[dict]):
    """Yield a Prepared per good record, in order; bad ones raise, or with skip_bad are recorded and skipped.

    Images are read and decoded by DECODE_THREADS threads, up to 2 x DECODE_THREADS records ahead (PIL
    releases the GIL); sequences are tokenised here, in order.
    """
    pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="kdcache-decode")
    try:
        for record, image in read_ahead(pool, lambda r: read_image(r, cfg), records, 2 * DECODE_THREADS):
            try:
                yield prepare(record, cfg, teacher, image=image.result())
            except SampleError as e:
                if not cfg.skip_bad:
                    raise
                skipped.append({"sample_id": e.sample_id, "reason": e.reason})
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_ahead(pool: ThreadPoolExecutor, fn, items, ahead: int):
    """Yield (item, future of fn(item)) in order, keeping up to `ahead` calls submitted beyond the one yielded."""
    pending: deque = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) > ahead:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


def read_image(record: samples.Record, cfg: DumpConfig) -> tuple[bytes | None, Image.Image | None]:
    """(raw bytes, decoded image) of the record's image, (None, None) without one; SampleError naming a bad one."""
    if record.image is None:
        return None, None
    return samples.load_image(cfg.images, record, **samples.image_limits(cfg))


def prepare(record: samples.Record, cfg: DumpConfig, teacher: Teacher,
            image: tuple[bytes | None, Image.Image | None] | None = None) -> Prepared:
    """The sample's sequence and image (`image`: `read_image`'s result when already read)."""
    image_bytes, image = read_image(record, cfg) if image is None else image
    sequence = templates.build_sequence(
        record.conversations, teacher.tokenizer, template=cfg.template, image_token_id=teacher.image_token_id,
        visual_len=teacher.visual_len, has_image=image is not None, sample_id=record.sample_id,
        max_length=cfg.max_length)
    return Prepared(record.sample_id, sequence, image_bytes, image)


def batched(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def model_inputs(batch: list[Prepared], teacher: Teacher) -> dict:
    """The teacher's forward inputs: right-padded ids and mask (B, T), and the batch's pixel values (or None)."""
    input_ids, attention_mask = pad_sequences([p.sequence.input_ids for p in batch], teacher.tokenizer.pad_token_id)
    images = [p.image for p in batch if p.image is not None]
    pixels = samples.pixel_values(images, teacher.image_processor) if images else None
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixels}


def batch_inputs(batch: list[Prepared], teacher: Teacher) -> dict:
    """`model_inputs` with the pixel values in the teacher's dtype and each sample's response rows as an index;
    in pinned memory when the teacher is on CUDA, so that copying them there does not block."""
    inputs = model_inputs(batch, teacher)
    if inputs["pixel_values"] is not None:
        inputs["pixel_values"] = inputs["pixel_values"].to(teacher.dtype)
    inputs["response_rows"] = [torch.tensor(p.sequence.response_rows, dtype=torch.long) for p in batch]
    if teacher.device.type == "cuda":
        inputs = {key: [t.pin_memory() for t in value] if isinstance(value, list)
                  else None if value is None else value.pin_memory() for key, value in inputs.items()}
    return inputs


# --- teacher forward -> targets (this thread) -> shard records (the writing thread)


@torch.inference_mode()
def teacher_targets(batch: PreparedBatch, teacher: Teacher, cfg: DumpConfig,
                    fidelity: Fidelity | None = None) -> BatchTargets:
    """One teacher forward over a padded batch, its top-k per role and relations, copied to the host (non-blocking
    on CUDA: `BatchTargets.ready` marks their arrival); with `fidelity`, its leading samples measured into it."""
    inputs = batch.inputs

    def to_device(t):
        return None if t is None else t.to(teacher.device, non_blocking=True)

    hidden = models.final_hidden_states(teacher.model, to_device(inputs["input_ids"]),
                                        to_device(inputs["attention_mask"]), to_device(inputs["pixel_values"]))
    response = [hidden[b, to_device(rows)] for b, rows in enumerate(inputs["response_rows"])]      # (R_b, D)
    visual = [hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len]
              for b, p in enumerate(batch.samples)]                                               # (L_b, D)
    sample_ids = [p.sample_id for p in batch.samples]
    topk = {role: role_targets(role, rows, sample_ids, teacher, cfg)
            for role, rows in (("response", response), ("visual", visual))}
    exact = [targets.relation_from_hidden(visual[b], teacher.gram)
             if teacher.gram is not None and p.sequence.visual_len > 0 else None
             for b, p in enumerate(batch.samples)]                                               # (L_b, L_b)
    relations = [None if r is None else targets.normalized_relation_on_device(r) for r in exact]
    if fidelity is not None:
        measure_fidelity(fidelity, teacher, cfg, {"response": response, "visual": visual}, topk, relations, exact)
    host = [to_host(topk), to_host(relations)]
    ready = None
    if teacher.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    counts = {"response": [r.shape[0] for r in response], "visual": [v.shape[0] for v in visual]}
    return BatchTargets(batch.samples, host[0], counts, host[1], ready)


def measure_fidelity(fidelity: Fidelity, teacher: Teacher, cfg: DumpConfig, rows: dict, topk: dict,
                     relations: list, exact: list) -> None:
    """The batch's leading samples, up to the report's N, into `fidelity` (`kdcache.fidelity`): per role their
    rows' hidden states and stored top-k, and their relations against the exact ones."""
    count = fidelity.wanted(len(relations))
    if count == 0:
        return
    temperatures = {"response": cfg.temperature_response, "visual": cfg.temperature_visual}
    for role, per_sample in rows.items():
        n = sum(r.shape[0] for r in per_sample[:count])
        ids, logprobs = topk[role]
        fidelity.add_rows(role, torch.cat(per_sample[:count]), teacher.lm_head, ids[:n], logprobs[:n],
                          temperature=temperatures[role], chunk_rows=cfg.chunk_rows)
    for b in range(count):
        if relations[b] is not None:
            fidelity.add_relation(relations[b][0], exact[b])
    fidelity.seen += count


def role_targets(role: str, rows: list[torch.Tensor], sample_ids: list[str], teacher: Teacher, cfg: DumpConfig):
    """One role's targets over the batch's rows (`rows`: (R_b, D) per sample): top-k or sampled draws, as
    (ids int32, logprobs float16), (N, K) each, on the rows' device."""
    temperature = cfg.temperature_response if role == "response" else cfg.temperature_visual
    if cfg.target_kind(role) == "topk":
        return batch_topk(rows, teacher.lm_head, cfg.row_width(role), temperature, cfg.chunk_rows)
    return batch_sampled(rows, sample_ids, teacher.lm_head, draws=cfg.draws, temperature=temperature,
                         seed=cfg.seed, role=role, chunk_rows=cfg.chunk_rows)


def batch_sampled(rows: list[torch.Tensor], sample_ids: list[str], weight: torch.Tensor, *, draws: int,
                  temperature: float, seed: int, role: str, chunk_rows: int):
    """`draws` tokens per row from the teacher's full distribution (`targets.sampled_logprobs`), each sample's
    rows under its own generator seeded by (seed, role, sample id) (`targets.draw_seed`): the draws of a sample
    do not depend on its batch, rank or a resume. -> (ids int32, logprobs float16), (N, draws) each."""
    parts = []
    for sample_id, sample_rows in zip(sample_ids, rows):
        generator = torch.Generator(device=sample_rows.device)
        generator.manual_seed(targets.draw_seed(seed, sample_id, role))
        parts.append(targets.sampled_logprobs(sample_rows, weight, draws=draws, temperature=temperature,
                                              generator=generator, chunk_rows=chunk_rows))
    ids = torch.cat([p[0] for p in parts])                                   # (N, draws) int64
    logprobs = torch.cat([p[1] for p in parts])                              # (N, draws) float32
    return ids.to(torch.int32), logprobs.to(torch.float16)


def batch_topk(rows: list[torch.Tensor], weight: torch.Tensor, k: int, temperature: float, chunk_rows: int):
    """Top-k over all samples' rows in one call: (ids int32, logprobs float16), (N, K) each, on the rows' device."""
    ids, logprobs = targets.topk_logprobs(torch.cat(rows), weight, k=k, temperature=temperature,
                                          chunk_rows=chunk_rows)            # (N, K) int64, (N, K) float32
    return ids.to(torch.int32), logprobs.to(torch.float16)


def to_host(value):
    """Tensors (in dicts, lists, tuples) copied to the CPU, non-blocking from CUDA (into pinned memory)."""
    if isinstance(value, torch.Tensor):
        return value.to("cpu", non_blocking=True)
    if isinstance(value, dict):
        return {key: to_host(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_host(v) for v in value)
    return value


def write_targets(batch_targets: BatchTargets, cfg: DumpConfig, writer: ShardWriter) -> None:
    """The writing thread's work for one batch: its shard records, checked, encoded and written in order."""
    for record in shard_records(batch_targets, cfg):
        try:
            writer.write(record)
        except (KdcacheError, OSError):
            raise
        except Exception as e:                  # an Arrow failure: name the sample
            raise KdcacheError(f"sample {record[schema.SAMPLE_ID]!r}: writing its record failed: {one_line(e)}") from e


def shard_records(batch_targets: BatchTargets, cfg: DumpConfig):
    """Yield one shard record per sample of the batch, once its targets are on the host."""
    if batch_targets.ready is not None:
        batch_targets.ready.synchronize()
    topk = {role: split_rows(ids.numpy(), logprobs.numpy(), batch_targets.counts[role])
            for role, (ids, logprobs) in batch_targets.topk.items()}
    for b, p in enumerate(batch_targets.samples):
        relation = norm = None
        if batch_targets.relations[b] is not None:
            relation, norm = batch_targets.relations[b][0].numpy(), float(batch_targets.relations[b][1])
            if not math.isfinite(norm):
                raise KdcacheError(f"sample {p.sample_id!r}: {targets.NON_FINITE_RELATION}")
        record = {
            schema.SAMPLE_ID: p.sample_id,
            schema.INPUT_IDS: np.asarray(p.sequence.input_ids, dtype=np.int32),
            schema.RESPONSE_ROWS: np.asarray(p.sequence.response_rows, dtype=np.int32),
            schema.VISUAL_START: p.sequence.visual_start,
            schema.VISUAL_LEN: p.sequence.visual_len,
            schema.IMAGE: p.image_bytes if cfg.embed_images else None,
            schema.IMAGE_SHA256: hashlib.sha256(p.image_bytes).digest() if p.image_bytes is not None else None,
            schema.RELATION: relation,
            schema.RELATION_NORM: norm,
        }
        for role, (ids_column, logprobs_column) in schema.TOPK_COLUMNS.items():
            record[ids_column], record[logprobs_column] = topk[role][b]
        yield record


def split_rows(ids: np.ndarray, logprobs: np.ndarray, counts: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The batch's (N, K) top-k arrays split back per sample, `counts` rows each."""
    bounds = np.cumsum([0] + counts)
    return [(ids[a:b], logprobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
