"""kdcache dump: run the teacher once, teacher-forced, and write its distillation targets to a cache.

    dump(cfg) = setup (load the teacher, check or record the run) -> this rank's pending records
              -> dump_records(teacher, records, cfg, writer) -> finalize (rank report, manifest)

Under torchrun every rank takes the samples `i % world_size == rank`, writes its own shards, and
rank 0 merges the manifest once all ranks are done. A killed dump is resumed by running the same
command again: finished shards are kept, the samples in them are not dumped twice, partial shards
are discarded (docs/design.md §4, §8).

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import kdcache
from kdcache import distributed, lock, models, samples, schema, targets, templates
from kdcache.batches import pad_sequences
from kdcache.errors import KdcacheError, SampleError
from kdcache.files import write_json_atomic
from kdcache.writer import ShardWriter, completed_sample_ids, finalize_cache, write_rank_report
from teacher_dump.config import DumpConfig

# What a resumed dump must match: the manifest fields that decide the cache's content.
RUN_KEYS = ("teacher", "tokenizer", "visual_len", "template", "max_length", "topk", "temperature",
            "relation", "images_embedded", "dataset")


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
    with open_writer(cfg, topo.rank) as writer:
        skipped = dump_records(teacher, records, cfg, writer, progress=cfg.progress and topo.is_main, desc=desc)

    # --- finalize: every rank reports, then rank 0 writes the manifest, last
    write_rank_report(out, topo.rank, skipped=skipped)
    distributed.barrier()
    manifest = lock.on_main_rank(lambda: finalize(out, run, cfg, len(dataset), skipped), is_main=topo.is_main)
    distributed.barrier()
    distributed.destroy_process_group()
    return manifest


def dump_records(teacher: Teacher, records: list[samples.Record], cfg: DumpConfig, writer: ShardWriter, *,
                 progress: bool | None = None, desc: str = "dump") -> list[dict]:
    """Teacher targets of `records`, `cfg.batch_size` samples per forward, written to `writer`.

    Returns the skipped samples `[{"sample_id", "reason"}]`: a bad sample raises SampleError naming
    it, or with `cfg.skip_bad` is recorded and skipped. `progress` defaults to `cfg.progress`.
    """
    skipped: list[dict] = []
    counted, tokens, started = 0, 0, time.perf_counter()
    with tqdm(total=len(records), unit="sample", desc=desc,
              disable=not (cfg.progress if progress is None else progress)) as bar:
        for batch in batched(prepare_all(records, cfg, teacher, skipped), cfg.batch_size):
            for sample in teacher_targets(batch, teacher, cfg):
                writer.write(sample)
            tokens += sum(len(p.sequence.input_ids) for p in batch)
            bar.update(len(batch) + len(skipped) - counted)
            counted = len(skipped)
            bar.set_postfix(tok_s=f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f}", skipped=counted)
    return skipped


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
    if max(cfg.topk_response, cfg.topk_visual) > vocab_size:
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
        "max_length": cfg.max_length,
        "topk": {"response": cfg.topk_response, "visual": cfg.topk_visual},
        "temperature": {"response": cfg.temperature_response, "visual": cfg.temperature_visual},
        "relation": cfg.relation,
        "images_embedded": cfg.embed_images,
        "dataset": {"source": str(cfg.data), "fingerprint": samples.dataset_fingerprint(cfg.data),
                    "images": cfg.images, "max_samples": cfg.max_samples},
        "world_size": world_size,
    }


def check_or_record_run(out: Path, run: dict) -> None:
    """A resumed dump must be the same dump: same teacher, data, template, k and temperatures."""
    wanted = {k: run[k] for k in RUN_KEYS}
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
    return ShardWriter(cfg.out, rank=rank, k_response=cfg.topk_response, k_visual=cfg.topk_visual,
                       shard_size_bytes=int(cfg.shard_size_mb * (1 << 20)))


# --- samples -> teacher inputs


def prepare_all(records, cfg: DumpConfig, teacher: Teacher, skipped: list[dict]):
    """Yield a Prepared per good record; bad ones raise, or with skip_bad are recorded and skipped."""
    for record in records:
        try:
            yield prepare(record, cfg, teacher)
        except SampleError as e:
            if not cfg.skip_bad:
                raise
            skipped.append({"sample_id": e.sample_id, "reason": e.reason})


def prepare(record: samples.Record, cfg: DumpConfig, teacher: Teacher) -> Prepared:
    image_bytes = image = None
    if record.image is not None:
        image_bytes, image = samples.load_image(cfg.images, record, **samples.image_limits(cfg))
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


# --- teacher forward -> shard records


@torch.inference_mode()
def teacher_targets(batch: list[Prepared], teacher: Teacher, cfg: DumpConfig):
    """One teacher forward over a padded batch; yields one shard record per sample."""
    inputs = model_inputs(batch, teacher)
    pixels = inputs["pixel_values"]
    hidden = models.final_hidden_states(teacher.model, inputs["input_ids"].to(teacher.device),
                                        inputs["attention_mask"].to(teacher.device),
                                        None if pixels is None else pixels.to(teacher.device, teacher.dtype))  # (B, T, D)
    response = [hidden[b, torch.tensor(p.sequence.response_rows, dtype=torch.long, device=teacher.device)]
                for b, p in enumerate(batch)]
    visual = [hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len]
              for b, p in enumerate(batch)]
    topk = {"response": split_topk(response, teacher.lm_head, cfg.topk_response, cfg.temperature_response,
                                   cfg.chunk_rows),
            "visual": split_topk(visual, teacher.lm_head, cfg.topk_visual, cfg.temperature_visual, cfg.chunk_rows)}
    for b, p in enumerate(batch):
        relation, norm = None, None
        if teacher.gram is not None and p.sequence.visual_len > 0:
            packed, norm = targets.normalized_relation(targets.relation_from_hidden(visual[b], teacher.gram))
            relation = packed.cpu().numpy()
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


def split_topk(rows: list[torch.Tensor], weight: torch.Tensor, k: int, temperature: float, chunk_rows: int):
    """Top-k over all samples' rows in one call, split back per sample as numpy (ids int32, logprobs float16)."""
    counts = [r.shape[0] for r in rows]
    ids, logprobs = targets.topk_logprobs(torch.cat(rows), weight, k=k, temperature=temperature,
                                          chunk_rows=chunk_rows)            # (N, K) int64, (N, K) float32
    ids = ids.to(torch.int32).cpu().numpy()
    logprobs = logprobs.to(torch.float16).cpu().numpy()
    bounds = np.cumsum([0] + counts)
    return [(ids[a:b], logprobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
