"""The dump's preparing stage: samples -> teacher inputs, in a background thread ahead of the teacher.

Images are read and decoded by a small thread pool, sequences tokenised in order, batches padded and (on
CUDA) pinned; a bad sample raises `SampleError` naming it, or with `--skip-bad` is recorded and skipped
(docs/design.md §9; `teacher_dump.dump.dump_records` runs the stages).
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from kdcache import samples, templates
from kdcache.batches import pad_sequences
from kdcache.errors import SampleError
from teacher_dump.config import DumpConfig

if TYPE_CHECKING:
    from teacher_dump.forward import Teacher

DECODE_THREADS = 4      # threads reading and decoding images, each up to 2 samples ahead


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
