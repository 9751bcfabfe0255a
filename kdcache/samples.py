"""Dataset files and images: LLaVA JSON / JSONL records, image bytes, decoded images, pixel values.

A dataset is untrusted input: bad JSON names the file and line, a bad sample raises SampleError
naming it (so that `--skip-bad` can record and skip it), and image paths may not leave the images
folder.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from kdcache.errors import KdcacheError, SampleError
from kdcache.files import sha256_file


@dataclass(frozen=True)
class Record:
    sample_id: str
    image: str | None            # path relative to the images folder; None for a text-only sample
    conversations: list[dict]    # LLaVA turns, [{"from": "human" | "gpt", "value": str}, ...]


def load_records(path: str | Path) -> list[Record]:
    """Records of a ``.json`` file (a list of samples) or a ``.jsonl`` file (one sample per line).

    Ids may be strings or numbers (kept as strings); a sample without ``"id"`` is named by its
    position (0-based). Ids must be unique. Bad JSON raises KdcacheError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KdcacheError(f"cannot read dataset {path}: {e}") from None
    if path.suffix.lower() == ".jsonl":
        items = _parse_jsonl(text, path)
    else:
        items = [(None, item) for item in _parse_json_list(text, path)]
    records: list[Record] = []
    first_seen: dict[str, str] = {}
    for index, (line, item) in enumerate(items):
        where = f"{path} line {line}" if line is not None else f"{path} item {index}"
        record = _record(item, index, where)
        if record.sample_id in first_seen:
            raise KdcacheError(f"{where}: sample id {record.sample_id!r} is already used at {first_seen[record.sample_id]} "
                               "(samples without an 'id' are named by their position); ids must be unique")
        first_seen[record.sample_id] = where
        records.append(record)
    return records


def _parse_json_list(text: str, path: Path) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise KdcacheError(f"{path} line {e.lineno} column {e.colno}: bad JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise KdcacheError(f"{path}: expected a JSON list of samples, got {type(data).__name__} "
                           "(use a .jsonl file for one sample per line)")
    return data


def _parse_jsonl(text: str, path: Path) -> list[tuple[int, object]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise KdcacheError(f"{path} line {number} column {e.colno}: bad JSON: {e.msg}") from None
    return items


def _record(item, index: int, where: str) -> Record:
    if not isinstance(item, dict):
        raise KdcacheError(f"{where}: a sample must be a JSON object, got {type(item).__name__}")
    raw_id = item.get("id")
    raw_id = index if raw_id is None else raw_id
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)):
        raise KdcacheError(f"{where}: sample id must be a string or a number, got {raw_id!r}")
    sample_id = str(raw_id)
    image = item.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SampleError(sample_id, f"'image' must be one relative path, got {image!r} "
                                     "(one image per sample is supported)")
    conversations = item.get("conversations", [])
    if not isinstance(conversations, list):
        raise SampleError(sample_id, f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    return Record(sample_id, image, conversations)


def dataset_fingerprint(path: str | Path) -> str:
    """"sha256:<hex>" of the dataset file's bytes."""
    return "sha256:" + sha256_file(path)[1]


def image_path(images_dir: str | Path, record: Record) -> Path:
    """images_dir / record.image, refusing absolute paths and ``..`` that leave `images_dir`.

    The check is on the normalised path, not the resolved one: symlinks the user placed inside the
    images folder are followed, paths written in the dataset may not climb out of it.
    """
    if record.image is None:
        raise SampleError(record.sample_id, "has no image")
    root = os.path.normpath(os.path.abspath(images_dir))
    full = os.path.normpath(os.path.join(root, record.image))
    if os.path.isabs(record.image) or os.path.commonpath([root, full]) != root:
        raise SampleError(record.sample_id, f"image path {record.image!r} escapes the images folder {images_dir}")
    return Path(full)


def read_image_bytes(images_dir: str | Path, record: Record) -> bytes:
    """The raw bytes of the record's image file (SampleError if missing or unreadable)."""
    path = image_path(images_dir, record)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SampleError(record.sample_id, f"image not found: {path}") from None
    except OSError as e:
        raise SampleError(record.sample_id, f"cannot read image {path}: {e.strerror or e}") from None


def load_image(images_dir: str | Path | None, record: Record) -> tuple[bytes, Image.Image]:
    """(raw bytes, decoded RGB image) of the record's image: what every job reads a dataset image with.

    SampleError naming the sample when no images folder was given, the file is missing or
    unreadable, its path escapes the folder, or its bytes are not a complete image.
    """
    if images_dir is None:
        raise SampleError(record.sample_id, f"has image {record.image!r} but no --images folder was given")
    data = read_image_bytes(images_dir, record)
    return data, decode_image(data, record.sample_id)


def decode_image(data: bytes, sample_id: str) -> Image.Image:
    """Decoded RGB image; SampleError if the bytes are not a complete, readable image."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()                           # structure and checksums, without decoding pixels
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")              # decodes every pixel: truncated data fails here
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(sample_id, f"corrupt or unsupported image: {e}") from None


def pixel_values(images: list[Image.Image], image_processor) -> torch.Tensor:
    """(N, 3, S, S) float32: each image stretched to the tower's S x S and normalised by the processor."""
    if not images:
        raise ValueError("pixel_values needs at least one image")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels.to(torch.float32)
