"""The dump's teacher stage and writing stage: teacher forward -> targets (top-k or sampled draws per role,
relations) -> host -> shard records, written in order by a background thread (docs/design.md §3, §9).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from kdcache import models, schema, targets
from kdcache.errors import KdcacheError, one_line
from kdcache.fidelity import Fidelity
from kdcache.writer import ShardWriter
from teacher_dump.config import DumpConfig
from teacher_dump.prepare import Prepared, PreparedBatch


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
class BatchTargets:
    """A batch's targets on their way to the host: what the writer thread turns into shard records."""

    samples: list[Prepared]
    topk: dict                  # role -> (ids (N, K) int32, logprobs (N, K) float16) over the batch's rows
                                # (a sampled role: K = --draws draws per row)
    counts: dict                # role -> rows per sample
    relations: list             # per sample: (packed (P,) float16, norm () float64), or None
    ready: object               # a torch.cuda.Event after the copies to the host (None on the CPU)


@torch.inference_mode()
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
