"""From samples to the batch dict the student trains on: datasets, collate, DataLoader.

Two map-style datasets yield the same per-sample dict (global index in, tensors out):

* `CacheDataset` reads a kdcache cache (the final `input_ids`, verbatim, and the teacher targets);
* `JsonDataset` builds sequences from LLaVA JSON + an image folder (PT / SFT without a cache).

Image decoding and the student's image processor run in `__getitem__`, i.e. inside DataLoader
workers. Neither dataset keeps open file state across a fork or a pickle: the cache reader is
(re)opened lazily in each process. `collate` turns a list of samples into "The batch dict" of
docs/interfaces.md.

Per-sample dict (what `__getitem__` returns):

    sample_id               str
    input_ids               (T,) int                  the full sequence, image tokens expanded
    response_rows           (N_r,) int                rows t whose next token is supervised
    visual_start, visual_len  int                     0, 0 without an image
    pixel_values            (3, S, S) float32 | None
    -- cache samples with targets only --
    response_topk_ids       (N_r, K_r) int32          response_topk_logprobs (N_r, K_r) float16
    visual_topk_ids         (visual_len, K_v) int32   visual_topk_logprobs   (visual_len, K_v) float16
    relation                (L(L+1)/2,) float16 | None
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache import samples, schema, templates
from kdcache.errors import CacheError, KdcacheError, SampleError
from kdcache.shards import CacheReader

# --- datasets


class CacheDataset(Dataset):
    """A kdcache cache as a map-style dataset over global sample indices (shard order of the manifest).

    `reader` is a `CacheReader` (or a cache path). With `with_targets=False` (PT / SFT from a cache)
    samples carry no teacher targets. `images` is the image folder for a cache dumped with
    --no-embed-images (default: the folder recorded in its manifest); the files are found through
    the dump's dataset file and checked against the cached sha256.
    """

    def __init__(self, reader, image_processor, *, images: str | Path | None = None, with_targets: bool = True):
        if not isinstance(reader, CacheReader):
            reader = CacheReader(reader)
        self.cache = reader.cache
        self.manifest = reader.manifest
        self.shard_sizes = [int(shard["num_samples"]) for shard in reader.shards]
        self.image_processor = image_processor
        self.with_targets = with_targets
        self.topk = {role: int(self.manifest["topk"][role]) for role in schema.ROLES}
        self._len = len(reader)
        assert self._len == sum(self.shard_sizes), (self._len, self.shard_sizes)
        self._image_files, self._images_dir = None, None
        if not self.manifest.get("images_embedded", True):
            self._images_dir, self._image_files = _external_images(self.manifest, images, self.cache)
        self._max_open_shards = reader.max_open_shards
        self._reader, self._pid = reader, os.getpid()

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_reader"] = None          # a worker opens its own (spawn pickles the dataset)
        return state

    def _open_reader(self) -> CacheReader:
        """This process's reader: a forked worker re-opens rather than share its parent's memory
        maps, a spawned one opens its own (the pickled dataset carries none)."""
        if self._reader is None or self._pid != os.getpid():
            self._reader = CacheReader(self.cache, max_open_shards=self._max_open_shards)
            self._pid = os.getpid()
        return self._reader

    def __getitem__(self, index: int) -> dict:
        row = self._open_reader().read_sample(int(index))
        sample_id = str(row[schema.SAMPLE_ID])
        visual_start, visual_len = int(row[schema.VISUAL_START]), int(row[schema.VISUAL_LEN])
        sample = {
            "sample_id": sample_id,
            "input_ids": _tensor(row[schema.INPUT_IDS], np.int32),
            "response_rows": _tensor(row[schema.RESPONSE_ROWS], np.int32),
            "visual_start": visual_start,
            "visual_len": visual_len,
            "pixel_values": self._pixel_values(row, sample_id) if visual_len > 0 else None,
        }
        if self.with_targets:
            for role in schema.ROLES:
                ids_col, logprobs_col = schema.TOPK_COLUMNS[role]
                sample[ids_col] = _tensor(row[ids_col], np.int32).reshape(-1, self.topk[role])
                sample[logprobs_col] = _tensor(row[logprobs_col], np.float16).reshape(-1, self.topk[role])
            relation = row.get(schema.RELATION)
            sample["relation"] = None if relation is None else _tensor(relation, np.float16)
        _check_rows(sample, self.cache)
        return sample

    def _pixel_values(self, row: dict, sample_id: str) -> torch.Tensor:
        data = row.get(schema.IMAGE)
        if data is None:
            data = self._external_image_bytes(row, sample_id)
        image = samples.decode_image(bytes(data), sample_id)
        return samples.pixel_values([image], self.image_processor)[0]                 # (3, S, S)

    def _external_image_bytes(self, row: dict, sample_id: str) -> bytes:
        if self._image_files is None:
            raise CacheError(f"cache {self.cache}: sample {sample_id!r} has visual positions but no image bytes")
        if sample_id not in self._image_files:
            raise SampleError(sample_id, f"not in the dataset file the cache {self.cache} was dumped from")
        record = samples.Record(sample_id, self._image_files[sample_id], [])
        data = samples.read_image_bytes(self._images_dir, record)
        expected = row.get(schema.IMAGE_SHA256)
        if expected is not None and hashlib.sha256(data).digest() != bytes(expected):
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
                 template: str, image_token_id: int, visual_len: int, max_length: int | None = None):
        self.records = samples.load_records(data)
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
            if self.images_dir is None:
                raise SampleError(record.sample_id, f"has image {record.image!r} but no --images folder was given")
            image = samples.decode_image(samples.read_image_bytes(self.images_dir, record), record.sample_id)
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


# --- collate


def collate(batch: list[dict], *, pad_id: int) -> dict:
    """Samples -> the batch dict of docs/interfaces.md (right padding; indices as [b, t] pairs).

    Cache-only keys appear when the samples carry teacher targets. Empty sets (no response rows,
    no image, no relation) are tensors with a zero first dimension; `pixel_values` is None when no
    sample has an image.
    """
    B = len(batch)
    lengths = [len(s["input_ids"]) for s in batch]
    input_ids = torch.full((B, max(lengths, default=0)), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, s in enumerate(batch):
        input_ids[b, : lengths[b]] = s["input_ids"]
        attention_mask[b, : lengths[b]] = 1

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
    """A DataLoader in the sampler's order; workers persist across epochs when num_workers > 0.

    `batch_size` is the per-device micro-batch; it should divide the sampler's per-rank step so
    that no micro-batch straddles two optimizer steps.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=partial(collate, pad_id=int(pad_id)), persistent_workers=num_workers > 0,
                      pin_memory=torch.cuda.is_available(), drop_last=False)


# --- helpers


def _tensor(array, dtype) -> torch.Tensor:
    """A reader array (a writable numpy copy, already of `dtype`) as a tensor, without another copy."""
    return torch.from_numpy(np.asarray(array, dtype=dtype))


def _check_rows(sample: dict, cache: str) -> None:
    """The reader checks the top-k / relation shapes and the visual span against each row; the
    response rows must also fit (row t predicts token t + 1), or the labels would read padding."""
    rows, T = sample["response_rows"], len(sample["input_ids"])
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= T - 1):
        raise CacheError(f"cache {cache}: sample {sample['sample_id']!r}: response_rows outside [0, {T - 1}) "
                         f"for a sequence of {T} tokens")


def _external_images(manifest: dict, images, cache: str) -> tuple[Path, dict[str, str]]:
    """(image folder, sample_id -> image file) for a cache dumped with --no-embed-images."""
    dataset = manifest.get("dataset") or {}
    folder = images if images is not None else dataset.get("images")
    if folder is None:
        raise KdcacheError(f"cache {cache} was dumped without embedded images: pass --images DIR")
    source = dataset.get("source")
    if source is None or not Path(source).exists():
        raise KdcacheError(f"cache {cache} was dumped without embedded images and its dataset file "
                           f"{source!r} is not readable here; it is needed to find each sample's image")
    files = {r.sample_id: r.image for r in samples.load_records(source) if r.image is not None}
    return Path(folder), files
