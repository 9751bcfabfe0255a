"""From samples to the batch dict the student trains on: datasets, padding, collate, the loader.

Two map-style datasets yield the same per-sample dict (global index in, tensors out):

* `CacheDataset` reads a kdcache cache (the final `input_ids`, verbatim, and the teacher targets);
* `JsonDataset` builds sequences from LLaVA JSON + an image folder (PT / SFT without a cache).

Image decoding and the student's image processor run in `__getitem__`, i.e. inside DataLoader
workers. `collate` turns a list of samples into the batch dict (docs/design.md §7), and
`StatefulLoader` yields micro-batches forever, epoch after epoch, counting what it yielded so that
its `state_dict()` is exactly where a resumed run continues.

Per-sample dict (what `__getitem__` returns):

    sample_id               str
    input_ids               (T,) int32 | int64        the full sequence, image tokens expanded
    response_rows           (N_r,) int32 | int64      rows t whose next token is supervised
    visual_start, visual_len  int                     0, 0 without an image
    pixel_values            (3, S, S) float32 | None
    -- cache samples with targets only --
    response_topk_ids       (N_r, K_r) int32          response_topk_logprobs (N_r, K_r) float16
    visual_topk_ids         (visual_len, K_v) int32   visual_topk_logprobs   (visual_len, K_v) float16
    relation                (L(L+1)/2,) float16 | None
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import samples, schema, templates
from kdcache.errors import CacheError, KdcacheError, SampleError
from kdcache.reader import CacheReader

SEQUENCE_COLUMNS = (schema.SAMPLE_ID, schema.INPUT_IDS, schema.RESPONSE_ROWS, schema.VISUAL_START, schema.VISUAL_LEN)
TARGET_COLUMNS = (*schema.TOPK_COLUMNS["response"], *schema.TOPK_COLUMNS["visual"], schema.RELATION)

# --- datasets


class CacheDataset(Dataset):
    """A kdcache cache as a map-style dataset over global sample indices (shard order of the manifest).

    `reader` is a `CacheReader` (or a cache path); it has already checked every row it returns
    (`kdcache.encoding`), so its arrays are used as they are and this class only adds pixel values.
    With `with_targets=False` (PT / SFT from a cache) samples carry no teacher targets. `images` is
    the image folder for a cache dumped with --no-embed-images (default: the folder recorded in its
    manifest); the files are found through the dump's dataset file and checked against the cached
    sha256. The reader pickles without its open shards, so the dataset goes to workers as it is.
    """

    def __init__(self, reader, image_processor, *, images: str | Path | None = None, with_targets: bool = True,
                 image_limits: dict | None = None, dataset: str | Path | None = None):
        self.reader = reader if isinstance(reader, CacheReader) else CacheReader(reader)
        self.image_limits = image_limits or {}         # samples.load_image's max_bytes / max_pixels
        self.cache = self.reader.cache
        self.identity = self.reader.identity           # "sha256:<hex>" of its manifest (checkpoints record it)
        self._prefetcher = None
        self.shard_sizes = [int(shard["num_samples"]) for shard in self.reader.shards]
        self.image_processor = image_processor
        self.columns = SEQUENCE_COLUMNS + (TARGET_COLUMNS if with_targets else ())
        self._image_files, self._images_dir = None, None
        if not self.reader.manifest.get("images_embedded", True):
            self._images_dir, self._image_files = _external_images(self.reader.manifest, images, self.cache, dataset)

    def __len__(self) -> int:
        return len(self.reader)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_prefetcher": None}     # the prefetch thread stays in the main process

    def prefetch(self, sampler) -> None:
        """For a cache URL: fetch the next shards of `sampler`'s order into the shard cache in the background
        (`remote.prefetch_shards` of them, kdcache/shardcache.py); a local cache needs nothing."""
        depth = self.reader.remote_config.prefetch_shards
        if self.reader.shard_cache is not None and depth > 0 and self._prefetcher is None:
            from kdcache.shardcache import Prefetcher

            self._prefetcher = Prefetcher(self.reader, sampler, depth).start()

    def __getitem__(self, index: int) -> dict:
        row = self.reader.read_sample(int(index))
        sample = {name: _as_tensor(row[name]) for name in self.columns}
        sample["pixel_values"] = self._pixel_values(row) if row[schema.VISUAL_LEN] > 0 else None
        return sample

    def _pixel_values(self, row: dict) -> torch.Tensor:
        sample_id = row[schema.SAMPLE_ID]
        data = row[schema.IMAGE]
        if data is None:
            data = self._external_image_bytes(row, sample_id)
        image = samples.decode_image(data, sample_id, **self.image_limits)
        return samples.pixel_values([image], self.image_processor)[0]                 # (3, S, S)

    def _external_image_bytes(self, row: dict, sample_id: str) -> bytes:
        if self._image_files is None:
            raise CacheError(f"cache {self.cache}: sample {sample_id!r} has visual positions but no image bytes")
        if sample_id not in self._image_files:
            raise SampleError(sample_id, f"not in the dataset file the cache {self.cache} was dumped from")
        record = samples.Record(sample_id, self._image_files[sample_id], [])
        data = samples.read_image_bytes(self._images_dir, record,
                                        max_bytes=self.image_limits.get("max_bytes", samples.MAX_IMAGE_BYTES))
        expected = row[schema.IMAGE_SHA256]
        if expected is not None and hashlib.sha256(data).digest() != expected:
            raise SampleError(sample_id, f"image {record.image!r} in {self._images_dir} differs from the one "
                                         f"the teacher saw (sha256 mismatch with cache {self.cache})")
        return data


class JsonDataset(Dataset):
    """LLaVA JSON / JSONL + image folder as a map-style dataset (PT / SFT without a cache).

    Sequences are built lazily in `__getitem__` with `templates.build_sequence`, so a bad sample
    raises SampleError (naming it) when it is first read. `shard_sizes` is one shard holding
    every record: the whole file is in memory, so the sampler's shuffle is a full shuffle.
    """

    def __init__(self, data: str | Path, images: str | Path | None, tokenizer, image_processor, *,
                 template: str, image_token_id: int, visual_len: int, max_length: int | None = None,
                 image_limits: dict | None = None):
        self.records = samples.load_records(data)
        self.image_limits = image_limits or {}         # samples.load_image's max_bytes / max_pixels
        self.images_dir = Path(images) if images is not None else None
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.image_token_id = template, int(image_token_id)
        self.visual_len, self.max_length = int(visual_len), max_length
        self.shard_sizes = [len(self.records)] if self.records else []

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[int(index)]
        pixel_values = None
        if record.image is not None:
            _, image = samples.load_image(self.images_dir, record, **self.image_limits)
            pixel_values = samples.pixel_values([image], self.image_processor)[0]       # (3, S, S)
        sequence = templates.build_sequence(
            record.conversations, self.tokenizer, template=self.template, image_token_id=self.image_token_id,
            visual_len=self.visual_len, has_image=pixel_values is not None, sample_id=record.sample_id,
            max_length=self.max_length)
        return {
            "sample_id": record.sample_id,
            "input_ids": torch.tensor(sequence.input_ids, dtype=torch.long),
            "response_rows": torch.tensor(sequence.response_rows, dtype=torch.long),
            "visual_start": sequence.visual_start,
            "visual_len": sequence.visual_len,
            "pixel_values": pixel_values,
        }


# --- padding and collate


def pad_sequences(sequences: list, pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences -> (input_ids (B, T_max) int64, attention_mask (B, T_max) int64).

    `sequences` are lists or 1-D tensors of ids. Training and the dump pad on the right (positions
    are unchanged, padding only follows the real tokens); generation pads on the left so that every
    prompt ends at the last column. An empty list gives (0, 0) tensors.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lengths = [len(s) for s in sequences]
    width = max(lengths, default=0)
    input_ids = torch.full((len(sequences), width), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, (ids, n) in enumerate(zip(sequences, lengths)):
        span = slice(0, n) if side == "right" else slice(width - n, width)
        input_ids[b, span] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[b, span] = 1
    return input_ids, attention_mask


def collate(batch: list[dict], *, pad_id: int) -> dict:
    """Samples -> the batch dict (right padding; indices as [b, t] pairs; docs/design.md §7).

    Cache-only keys appear when the samples carry teacher targets. Empty sets (no response rows,
    no image, no relation) are tensors with a zero first dimension; `pixel_values` is None when no
    sample has an image.
    """
    input_ids, attention_mask = pad_sequences([s["input_ids"] for s in batch], pad_id)
    response_index = _row_index([s["response_rows"] for s in batch])                    # (N_r, 2)
    with_image = [b for b, s in enumerate(batch) if s["pixel_values"] is not None]
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "sample_id": [s["sample_id"] for s in batch],
        "pixel_values": torch.stack([batch[b]["pixel_values"] for b in with_image]).float() if with_image else None,
        "image_index": torch.tensor(with_image, dtype=torch.long),
        "response_index": response_index,
        "response_labels": input_ids[response_index[:, 0], response_index[:, 1] + 1],    # (N_r,)
    }
    if batch and "response_topk_ids" in batch[0]:
        out.update(_target_tensors(batch))
    return out


def _target_tensors(batch: list[dict]) -> dict:
    visual_rows = [torch.arange(s["visual_start"], s["visual_start"] + s["visual_len"]) for s in batch]
    with_relation = [b for b, s in enumerate(batch) if s.get("relation") is not None]
    max_visual = max((s["visual_len"] for s in batch), default=0)
    relation_upper = (torch.stack([batch[b]["relation"] for b in with_relation]).float() if with_relation
                      else torch.zeros((0, schema.relation_size(max_visual)), dtype=torch.float32))
    return {
        "response_topk_ids": torch.cat([s["response_topk_ids"] for s in batch]).long(),           # (N_r, K_r)
        "response_topk_logprobs": torch.cat([s["response_topk_logprobs"] for s in batch]).float(),
        "visual_index": _row_index(visual_rows),                                                  # (N_v, 2)
        "visual_topk_ids": torch.cat([s["visual_topk_ids"] for s in batch]).long(),               # (N_v, K_v)
        "visual_topk_logprobs": torch.cat([s["visual_topk_logprobs"] for s in batch]).float(),
        "relation_index": torch.tensor(with_relation, dtype=torch.long),                          # (S,)
        "relation_visual_start": torch.tensor([batch[b]["visual_start"] for b in with_relation], dtype=torch.long),
        "relation_upper": relation_upper,                                                         # (S, P)
    }


def _row_index(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-sample row lists -> (N, 2) long [b, t] pairs, samples in batch order."""
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    b = torch.repeat_interleave(torch.arange(len(rows)), counts)
    t = torch.cat([r.long() for r in rows]) if rows else torch.zeros(0, dtype=torch.long)
    return torch.stack([b, t], dim=1)


# --- loader


def make_loader(dataset: Dataset, sampler, *, batch_size: int, num_workers: int, pad_id: int) -> DataLoader:
    """A DataLoader over one epoch in the sampler's order; workers persist across epochs when num_workers > 0.

    `batch_size` is the per-device micro-batch; it should divide the sampler's per-rank step so
    that no micro-batch straddles two optimizer steps.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=partial(collate, pad_id=int(pad_id)), persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), drop_last=False)


class StatefulLoader:
    """Micro-batches in a `ResumableSampler`'s order, epoch after epoch, counting what was consumed.

    The count is taken as batches are handed to the caller, not as the DataLoader's workers
    prefetch them (as mosaicml's StreamingDataLoader and torchdata's StatefulDataLoader do), so
    `state_dict()` after the last micro-batch of an optimizer step is exactly where a resumed run
    starts, and the training loop keeps no data bookkeeping. Every rank yields in lockstep, so one
    micro-batch here is `len(batch) * world_size` samples of the global order.
    """

    def __init__(self, dataset: Dataset, sampler, *, batch_size: int, num_workers: int, pad_id: int):
        self.sampler = sampler
        self.loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=num_workers, pad_id=pad_id)
        self._batches = None

    def __iter__(self) -> StatefulLoader:
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            batch = next(self._batches)
        except StopIteration:                 # end of the epoch: the next one, reshuffled
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self._batches = iter(self.loader)
            batch = next(self._batches)
        self.sampler.advance(len(batch["sample_id"]) * self.sampler.world_size)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (before the first batch is drawn)."""
        self.sampler.load_state_dict(state)
        self._batches = None


# --- helpers


def _as_tensor(value):
    """A reader array (a writable numpy copy) as a tensor without another copy; scalars, strings and None as they are."""
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _external_images(manifest: dict, images, cache: str, dataset=None) -> tuple[Path, dict[str, str]]:
    """(image folder, sample_id -> image file) for a cache dumped with --no-embed-images.

    The dataset file is the one the manifest records, or `dataset` (the same file elsewhere: its
    sha256 must be the manifest's fingerprint, so another dataset cannot pair images with samples).
    """
    recorded = manifest.get("dataset") or {}
    folder = images if images is not None else recorded.get("images")
    if folder is None:
        raise KdcacheError(f"cache {cache} was dumped without embedded images: pass --images DIR")
    source = dataset if dataset is not None else recorded.get("source")
    if source is None or not Path(source).is_file():
        raise KdcacheError(f"cache {cache} was dumped without embedded images and its dataset file "
                           f"{str(source)!r} is not readable here; it is needed to find each sample's image "
                           "(pass --cache-dataset FILE)")
    if dataset is not None and samples.dataset_fingerprint(dataset) != recorded.get("fingerprint"):
        raise KdcacheError(f"--cache-dataset {str(dataset)!r} is not the dataset cache {cache} was dumped from "
                           f"(sha256 differs from the manifest's {recorded.get('fingerprint')!r})")
    files = {r.sample_id: r.image for r in samples.load_records(source) if r.image is not None}
    return Path(folder), files
