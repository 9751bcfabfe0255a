"""kdcache dump: run the teacher once, teacher-forced, and write its distillation targets to a cache.

Reads top to bottom: setup -> data -> loop -> finalize. Under torchrun every rank takes the
samples `i % world_size == rank`, writes its own shards, and rank 0 merges the manifest once all
ranks are done. A killed dump is resumed by running the same command again: finished shards are
kept, the samples in them are not dumped twice, partial shards are discarded.
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
from kdcache import distributed, models, samples, shards, targets, templates
from kdcache.errors import KdcacheError, SampleError
from teacher_dump.config import DumpConfig

RUN_FILE = "dump-config.json"   # in CACHE/_parts/: what a resumed dump must match


@dataclass
class Prepared:
    """One sample ready for the teacher: the final sequence and its (decoded) image."""

    sample_id: str
    sequence: templates.Sequence
    image_bytes: bytes | None
    image: Image.Image | None


def dump(cfg: DumpConfig) -> dict | None:
    """Run the dump described by `cfg`; returns the manifest on rank 0 (None on other ranks)."""
    # --- setup
    topo = distributed.topology()
    distributed.init_process_group(topo, backend="gloo")   # coordination only: no tensors move
    device = distributed.resolve_device(cfg.device, topo)
    dtype = distributed.resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if (out / "manifest.json").exists():
        raise KdcacheError(f"{out} already holds a finished cache (manifest.json); choose another --out")
    bundle = models.load_bundle(cfg.teacher, dtype=dtype, revision=cfg.revision,
                                trust_remote_code=cfg.trust_remote_code)
    if not bundle.projector_trained and not cfg.allow_untrained:
        raise KdcacheError(
            f"teacher {cfg.teacher!r} has an untrained projector (a freshly composed preset or a checkpoint "
            "never trained): train it with `kdcache train --stage pt` then `--stage sft`, "
            "or pass --allow-untrained to dump it anyway")
    model = bundle.model.to(device).eval()
    vocab_size = models.lm_head_weight(model).shape[0]
    if max(cfg.topk_response, cfg.topk_visual) > vocab_size:
        raise KdcacheError(f"top-k ({cfg.topk_response}, {cfg.topk_visual}) exceeds the teacher's vocabulary ({vocab_size})")
    visual_len = models.visual_len_of(model.config)
    run = run_description(cfg, bundle, visual_len, dtype, topo.world_size)
    out.mkdir(parents=True, exist_ok=True)
    if topo.is_main:
        check_or_record_run(out, run)
    distributed.barrier()

    # --- data
    records = samples.load_records(cfg.data)
    if cfg.max_samples is not None:
        records = records[: cfg.max_samples]
    refuse_duplicate_ids(records, cfg.data)
    done = shards.completed_sample_ids(out)
    mine = [r for i, r in enumerate(records) if i % topo.world_size == topo.rank and r.sample_id not in done]

    # --- loop
    weight = models.lm_head_weight(model)                             # (V, D)
    with torch.no_grad():
        gram = targets.gram_matrix(weight) if cfg.relation else None  # (D, D) float32, once per run
    skipped: list[dict] = []
    bar = tqdm(total=len(mine), unit="sample", disable=not (cfg.progress and topo.is_main),
               desc=f"dump {out.name}" + (f" rank 0/{topo.world_size}" if topo.world_size > 1 else ""))
    tokens, started = 0, time.perf_counter()
    writer = shards.ShardWriter(out, rank=topo.rank, k_response=cfg.topk_response, k_visual=cfg.topk_visual,
                                shard_size_bytes=int(cfg.shard_size_mb * (1 << 20)))
    with writer, bar:
        for batch in batched(prepare_all(mine, cfg, bundle, visual_len, skipped), cfg.batch_size):
            for sample in teacher_targets(batch, model, bundle, weight, gram, cfg, device, dtype):
                writer.write(sample)
            tokens += sum(len(p.sequence.input_ids) for p in batch)
            bar.update(len(batch))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(tok_s=f"{tokens / elapsed:,.0f}", skipped=len(skipped))

    # --- finalize
    shards.write_rank_report(out, topo.rank, skipped=skipped)
    distributed.barrier()
    manifest = shards.finalize_cache(out, run) if topo.is_main else None
    distributed.barrier()
    distributed.destroy_process_group()
    return manifest


def run_description(cfg: DumpConfig, bundle: models.Bundle, visual_len: int, dtype: torch.dtype,
                    world_size: int) -> dict:
    """The manifest fields that describe how this cache was made (the shards module adds the rest)."""
    config = bundle.model.config
    processor = json.loads(bundle.image_processor.to_json_string())
    return {
        "kdcache_version": kdcache.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "teacher": {"source": bundle.source, "revision": bundle.revision,
                    "config_hash": models.config_hash(config), "dtype": str(dtype).removeprefix("torch.")},
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(bundle.tokenizer),
                      "class": type(bundle.tokenizer).__name__},
        "vocab_size": int(models.lm_head_weight(bundle.model).shape[0]),
        "image_token_id": int(config.image_token_id),
        "pad_token_id": int(bundle.tokenizer.pad_token_id),
        "eos_token_id": int(bundle.tokenizer.eos_token_id),
        "visual_len": visual_len,
        "image_processor": processor,
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
    keys = ("teacher", "tokenizer", "visual_len", "template", "max_length", "topk", "temperature",
            "relation", "images_embedded", "dataset")
    wanted = {k: run[k] for k in keys}
    path = out / "_parts" / RUN_FILE
    if path.exists():
        before = json.loads(path.read_text())
        diff = sorted(k for k in keys if before.get(k) != wanted[k])
        if diff:
            raise KdcacheError(f"{out} holds a partial dump made with different settings ({', '.join(diff)}); "
                               "rerun with the same settings to resume it, or choose another --out")
        return
    if any(out.glob("shard-*.arrow")):
        raise KdcacheError(f"{out} holds shards but no record of the dump that made them; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(wanted, indent=2, sort_keys=True))
    tmp.replace(path)


def refuse_duplicate_ids(records: list[samples.Record], source: str) -> None:
    seen: set[str] = set()
    for r in records:
        if r.sample_id in seen:
            raise KdcacheError(f"{source}: sample id {r.sample_id!r} appears twice; ids must be unique")
        seen.add(r.sample_id)


def prepare_all(records, cfg: DumpConfig, bundle: models.Bundle, visual_len: int, skipped: list[dict]):
    """Yield a Prepared per good record; bad ones raise, or with skip_bad are recorded and skipped."""
    images_dir = Path(cfg.images) if cfg.images else None
    for record in records:
        try:
            yield prepare(record, cfg, bundle, visual_len, images_dir)
        except SampleError as e:
            if not cfg.skip_bad:
                raise
            skipped.append({"sample_id": e.sample_id, "reason": e.reason})


def prepare(record: samples.Record, cfg: DumpConfig, bundle: models.Bundle, visual_len: int,
            images_dir: Path | None) -> Prepared:
    image_bytes = image = None
    if record.image is not None:
        if images_dir is None:
            raise SampleError(record.sample_id, f"has image {record.image!r} but no --images folder was given")
        image_bytes = samples.read_image_bytes(images_dir, record)
        image = samples.decode_image(image_bytes, record.sample_id)
    sequence = templates.build_sequence(
        record.conversations, bundle.tokenizer, template=cfg.template,
        image_token_id=bundle.model.config.image_token_id, visual_len=visual_len,
        has_image=image is not None, sample_id=record.sample_id, max_length=cfg.max_length)
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


def padded_inputs(batch: list[Prepared], bundle: models.Bundle):
    """(input_ids, attention_mask) right-padded to the longest sequence, and the batch's pixel values (or None)."""
    lengths = [len(p.sequence.input_ids) for p in batch]
    input_ids = torch.full((len(batch), max(lengths)), bundle.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, p in enumerate(batch):
        input_ids[b, : lengths[b]] = torch.tensor(p.sequence.input_ids)
        attention_mask[b, : lengths[b]] = 1
    images = [p.image for p in batch if p.image is not None]
    return input_ids, attention_mask, samples.pixel_values(images, bundle.image_processor) if images else None


@torch.inference_mode()
def teacher_targets(batch: list[Prepared], model, bundle: models.Bundle, weight: torch.Tensor,
                    gram: torch.Tensor | None, cfg: DumpConfig, device: torch.device, dtype: torch.dtype):
    """One teacher forward over a padded batch; yields one shard record per sample."""
    input_ids, attention_mask, pixels = padded_inputs(batch, bundle)
    pixels = pixels.to(device, dtype) if pixels is not None else None
    hidden = models.final_hidden_states(model, input_ids.to(device), attention_mask.to(device), pixels)  # (B, T, D)

    response = [hidden[b, torch.tensor(p.sequence.response_rows, dtype=torch.long, device=device)]
                for b, p in enumerate(batch)]
    visual = [hidden[b, p.sequence.visual_start: p.sequence.visual_start + p.sequence.visual_len]
              for b, p in enumerate(batch)]
    response_topk = split_topk(response, weight, cfg.topk_response, cfg.temperature_response, cfg.chunk_rows)
    visual_topk = split_topk(visual, weight, cfg.topk_visual, cfg.temperature_visual, cfg.chunk_rows)
    for b, p in enumerate(batch):
        relation, norm = None, None
        if gram is not None and p.sequence.visual_len > 0:
            packed, norm = targets.normalized_relation(targets.relation_from_hidden(visual[b], gram))
            relation = packed.cpu().numpy()
        yield {
            "sample_id": p.sample_id,
            "input_ids": np.asarray(p.sequence.input_ids, dtype=np.int32),
            "response_rows": np.asarray(p.sequence.response_rows, dtype=np.int32),
            "visual_start": p.sequence.visual_start,
            "visual_len": p.sequence.visual_len,
            "image": p.image_bytes if cfg.embed_images else None,
            "image_sha256": hashlib.sha256(p.image_bytes).digest() if p.image_bytes is not None else None,
            "response_topk_ids": response_topk[b][0], "response_topk_logprobs": response_topk[b][1],
            "visual_topk_ids": visual_topk[b][0], "visual_topk_logprobs": visual_topk[b][1],
            "relation": relation, "relation_norm": norm,
        }


def split_topk(rows: list[torch.Tensor], weight: torch.Tensor, k: int, temperature: float, chunk_rows: int):
    """Top-k over all samples' rows in one call, split back per sample as numpy (ids int32, logprobs float16)."""
    counts = [r.shape[0] for r in rows]
    ids, logprobs = targets.topk_logprobs(torch.cat(rows), weight, k=k, temperature=temperature,
                                          chunk_rows=chunk_rows)            # (N, K) int64, (N, K) float32
    ids = ids.to(torch.int32).cpu().numpy()
    logprobs = logprobs.to(torch.float16).cpu().numpy()
    bounds = np.cumsum([0] + counts)
    return [(ids[a:b], logprobs[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
