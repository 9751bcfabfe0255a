"""Dataset files and images: LLaVA JSON / JSONL records, image bytes, decoded images, pixel values.

A dataset is untrusted input: bad JSON names the file and line, a bad sample raises SampleError
naming it (so that `--skip-bad` can record and skip it), and image paths may not leave the images
folder.
"""

from __future__ import annotations

import io
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from kdcache.config import MAX_IMAGE_MB, MAX_IMAGE_PIXELS
from kdcache.errors import KdcacheError, SampleError, one_line
from kdcache.files import sha256_file

MIB = 1 << 20
MAX_IMAGE_BYTES = int(MAX_IMAGE_MB * MIB)    # default limits: the configs' max_image_mb / max_image_pixels


@dataclass(frozen=True)
class Record:
    sample_id: str
    image: str | None            # path relative to the images folder; None for a text-only sample. A malformed
                                 # value (a list, "", a number) is kept as it is: `image_path` refuses it
    conversations: list[dict]    # LLaVA turns, [{"from": "human" | "gpt", "value": str}, ...]; kept as it is,
                                 # checked by `templates.build_sequence`


def load_records(path: str | Path) -> list[Record]:
    """Records of a ``.json`` file (a list of samples) or a ``.jsonl`` file (one sample per line).

    Ids may be strings or numbers (kept as strings); a sample without ``"id"`` is named by its
    position (0-based). Ids must be unique. Bad JSON raises KdcacheError naming the file and line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")        # a leading byte-order mark is not JSON
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
    except (ValueError, RecursionError) as e:                # an integer of > 4300 digits, nesting too deep
        raise KdcacheError(f"{path}: bad JSON: {_json_failure(e)}") from None
    if not isinstance(data, list):
        raise KdcacheError(f"{path}: expected a JSON list of samples, got {type(data).__name__} "
                           "(use a .jsonl file for one sample per line)")
    return data


def _parse_jsonl(text: str, path: Path) -> list[tuple[int, object]]:
    items = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085, ... which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise KdcacheError(f"{path} line {number} column {e.colno}: bad JSON: {e.msg}") from None
        except (ValueError, RecursionError) as e:
            raise KdcacheError(f"{path} line {number}: bad JSON: {_json_failure(e)}") from None
    return items


def _json_failure(e: Exception) -> str:
    return "nested too deeply" if isinstance(e, RecursionError) else one_line(str(e))


def _record(item, index: int, where: str) -> Record:
    """One record. What makes the dataset unreadable (not an object, a bad id) is fatal here; what makes
    only this sample bad (its image or conversation) is kept as it is and refused, with a SampleError
    that `--skip-bad` can skip, when the sample is prepared (`image_path`, `templates.build_sequence`)."""
    if not isinstance(item, dict):
        raise KdcacheError(f"{where}: a sample must be a JSON object, got {type(item).__name__}")
    raw_id = item.get("id")
    raw_id = index if raw_id is None else raw_id
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int, float)):
        raise KdcacheError(f"{where}: sample id must be a string or a number, got {raw_id!r}")
    sample_id = str(raw_id)
    if not _is_utf8(sample_id):
        raise KdcacheError(f"{where}: sample id {sample_id!r} is not valid text (an unpaired surrogate)")
    return Record(sample_id, item.get("image"), item.get("conversations", []))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def dataset_fingerprint(path: str | Path) -> str:
    """"sha256:<hex>" of the dataset file's bytes."""
    return "sha256:" + sha256_file(path)[1]


def image_path(images_dir: str | Path, record: Record) -> Path:
    """images_dir / record.image, refusing a malformed path, an absolute one and ``..`` that leave `images_dir`.

    The check is on the normalised path, not the resolved one: symlinks the user placed inside the
    images folder are followed, paths written in the dataset may not climb out of it.
    """
    image = checked_image_name(record)
    root = os.path.normpath(os.path.abspath(images_dir))
    full = os.path.normpath(os.path.join(root, image))
    if os.path.isabs(image) or os.path.commonpath([root, full]) != root:
        raise SampleError(record.sample_id, f"image path {image!r} escapes the images folder {images_dir}")
    return Path(full)


def checked_image_name(record: Record) -> str:
    """The record's image path as written in the dataset; SampleError unless it is one non-empty path of text."""
    image = record.image
    if image is None:
        raise SampleError(record.sample_id, "has no image")
    if not isinstance(image, str) or not image.strip():
        raise SampleError(record.sample_id, f"'image' must be one relative path, got {image!r} "
                                            "(one image per sample is supported)")
    if "\x00" in image or not _is_utf8(image):
        raise SampleError(record.sample_id, f"image path {image!r} holds a NUL character or an unpaired surrogate")
    return image


def read_image_bytes(images_dir: str | Path, record: Record, *, max_bytes: int | None = MAX_IMAGE_BYTES) -> bytes:
    """The raw bytes of the record's image file, at most `max_bytes` of them (None: no limit).

    Only a regular file is read (symlinks followed): a FIFO, a device, a socket or a folder is a
    SampleError, found by `os.stat` before the file is opened, and checked again on the open file
    (opened non-blocking, so that a FIFO swapped in meanwhile cannot hang the job). SampleError too
    when the file is missing, unreadable or larger than `max_bytes`.
    """
    path = image_path(images_dir, record)
    sid = record.sample_id
    try:
        _refuse_irregular(os.stat(path), path, sid)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb", buffering=0) as f:
            info = os.fstat(f.fileno())
            _refuse_irregular(info, path, sid)
            if max_bytes is not None and info.st_size > max_bytes:
                raise SampleError(sid, f"image {path} is {info.st_size:,} bytes, over the limit of "
                                       f"{max_bytes:,} (--max-image-mb {show_mb(max_bytes)})")
            data = _read_at_most(f, None if max_bytes is None else max_bytes + 1)
    except FileNotFoundError:
        raise SampleError(sid, f"image not found: {path}") from None
    except OSError as e:
        raise SampleError(sid, f"cannot read image {path}: {e.strerror or e}") from None
    if max_bytes is not None and len(data) > max_bytes:      # the file grew after fstat
        raise SampleError(sid, f"image {path} is over the limit of {max_bytes:,} bytes "
                               f"(--max-image-mb {show_mb(max_bytes)})")
    return data


def _refuse_irregular(info: os.stat_result, path: Path, sample_id: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise SampleError(sample_id, f"image {path} is not a regular file (it is a {_file_kind(info.st_mode)})")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def _read_at_most(f, limit: int | None) -> bytes:
    chunks, size = [], 0
    while limit is None or size < limit:
        chunk = f.read(1 << 20 if limit is None else min(1 << 20, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def show_mb(num_bytes: int) -> str:
    """A byte limit as --max-image-mb writes it: 64 for 64 MiB."""
    return f"{num_bytes / MIB:g}"


def image_limits(cfg) -> dict:
    """`load_image` / `decode_image` keyword arguments from a config's `max_image_mb` and `max_image_pixels`."""
    return {"max_bytes": int(cfg.max_image_mb * MIB), "max_pixels": int(cfg.max_image_pixels)}


def load_image(images_dir: str | Path | None, record: Record, *, max_bytes: int | None = MAX_IMAGE_BYTES,
               max_pixels: int | None = MAX_IMAGE_PIXELS) -> tuple[bytes, Image.Image]:
    """(raw bytes, decoded RGB image) of the record's image: what every job reads a dataset image with.

    SampleError naming the sample when the record's image is not one relative path, no images folder
    was given, the file is missing, unreadable or not a regular file, its path escapes the folder,
    it has more than `max_bytes` bytes or `max_pixels` pixels, or its bytes are not a complete image.
    """
    checked_image_name(record)
    if images_dir is None:
        raise SampleError(record.sample_id, f"has image {record.image!r} but no --images folder was given")
    data = read_image_bytes(images_dir, record, max_bytes=max_bytes)
    return data, decode_image(data, record.sample_id, max_bytes=max_bytes, max_pixels=max_pixels)


def decode_image(data: bytes, sample_id: str, *, max_bytes: int | None = MAX_IMAGE_BYTES,
                 max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decoded RGB image; SampleError if the bytes are not a complete, readable image or exceed a limit.

    The pixel count is read from the header, before anything is decoded. PIL's own decompression-bomb
    guard (`Image.MAX_IMAGE_PIXELS`) applies as well: its warning is an error here.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise SampleError(sample_id, f"image is {len(data):,} bytes, over the limit of {max_bytes:,} "
                                     f"(--max-image-mb {show_mb(max_bytes)})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                width, height = probe.size
                if max_pixels is not None and width * height > max_pixels:
                    raise SampleError(sample_id, f"image is {width} x {height} = {width * height:,} pixels, over "
                                                 f"the limit of {max_pixels:,} (--max-image-pixels)")
                probe.verify()                       # structure and checksums, without decoding pixels
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")          # decodes every pixel: truncated data fails here
    except SampleError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise SampleError(sample_id, f"image too large to decode safely: {one_line(str(e))}") from None
    except Exception as e:                           # untrusted bytes: any decoder failure is this sample's fault
        raise SampleError(sample_id, f"corrupt or unsupported image: {one_line(str(e)) or type(e).__name__}") from None


def pixel_values(images: list[Image.Image], image_processor) -> torch.Tensor:
    """(N, 3, S, S) float32: each image stretched to the tower's S x S and normalised by the processor."""
    if not images:
        raise ValueError("pixel_values needs at least one image")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
    return pixels.to(torch.float32)
