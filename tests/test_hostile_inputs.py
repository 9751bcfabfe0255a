"""Hostile input: every bad sample is a one-line SampleError naming it (and --skip-bad skips it), image
reading has limits and never blocks, OS errors and worker errors print one line. Flags out of range and a
student whose image processor differs from the teacher's: test_hostile_settings.py."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from kdcache import samples
from kdcache.cli import app, clean_errors
from kdcache.cli import error_line as error_line_of
from kdcache.errors import CacheError, KdcacheError, SampleError
from kdcache.samples import Record

from cli_lines import dump_args, error_line


LIMITS = ["--max-image-pixels", "2000", "--max-image-mb", "0.002"]     # 2,000 pixels, 2,097 bytes
ASK = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a shape"}]


def turns(question: str = "<image>\nWhat is it?", answer="a shape") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


# Each bad sample kind, by sample id: (a maker writing what it needs into the images folder and returning the
# record, the reason it is refused for).
def _answer_image(images):
    return {"image": "img-000.png", "conversations": turns(answer="here: <image>")}


def _surrogate(images):
    return {"image": "img-000.png", "conversations": turns(question="<image>\nWhat is \ud800?")}


def _nul_path(images):
    return {"image": "img-000.png\x00.png", "conversations": ASK}


def _image_list(images):
    return {"image": ["img-000.png", "img-001.png"], "conversations": ASK}


def _image_empty(images):
    return {"image": "", "conversations": ASK}


def _conversations_dict(images):
    return {"image": "img-000.png", "conversations": {"from": "human", "value": "hi"}}


def _value_number(images):
    return {"image": "img-000.png", "conversations": [ASK[0], {"from": "gpt", "value": 5}]}


def _big_pixels(images):
    Image.new("RGB", (100, 100), (10, 200, 30)).save(images / "big.png")
    return {"image": "big.png", "conversations": ASK}


def _big_bytes(images):
    Image.frombytes("RGB", (40, 40), os.urandom(40 * 40 * 3)).save(images / "noise.png")   # 1,600 px, ~5 KB
    return {"image": "noise.png", "conversations": ASK}


def _bomb(images):
    (images / "bomb.png").write_bytes(png_header_only(20_000, 20_000))
    return {"image": "bomb.png", "conversations": ASK}


def _directory(images):
    (images / "folder.png").mkdir(exist_ok=True)
    return {"image": "folder.png", "conversations": ASK}


BAD = {
    "answer-image": (_answer_image, r"turn 1 \(gpt\) contains <image>"),
    "surrogate": (_surrogate, r"turn 0 \(human\) is not valid text: unpaired surrogate"),
    "nul-path": (_nul_path, "NUL character"),
    "image-list": (_image_list, "one image per sample"),
    "image-empty": (_image_empty, "must be one relative path"),
    "conversations-dict": (_conversations_dict, "'conversations' must be a list of turns, got dict"),
    "value-number": (_value_number, "turn 1 has no text 'value'"),
    "big-pixels": (_big_pixels, "100 x 100 = 10,000 pixels, over the limit of 2,000"),
    "big-bytes": (_big_bytes, r"bytes, over the limit of 2,097 \(--max-image-mb"),
    "bomb": (_bomb, "too large to decode safely"),
    "directory": (_directory, r"not a regular file \(it is a directory\)"),
}
LIMITED = ("big-pixels", "big-bytes")                        # refused only under the low LIMITS
UNLIMITED = tuple(kind for kind in BAD if kind not in LIMITED)


def dataset_with(toy_dataset, kinds, *, good: int = 2) -> tuple[Path, Path]:
    """`good` toy samples followed by one bad sample per kind, written to a JSON file."""
    data, images = toy_dataset(count=good)
    records = json.loads(data.read_text())
    for kind in kinds:
        records.append({"id": kind, **BAD[kind][0](images)})
    path = data.with_name("hostile.json")
    path.write_text(json.dumps(records))                 # ensure_ascii: a lone surrogate is written as \ud800
    return path, images


# --- 1, 2: every bad sample kind is skipped by --skip-bad, and fatal (one line naming it) without it


def test_skip_bad_skips_every_kind_of_bad_sample_and_names_each(tiny_teacher_dir, toy_dataset, tmp_path):
    data, images = dataset_with(toy_dataset, UNLIMITED)
    result = CliRunner().invoke(app, dump_args(tiny_teacher_dir, data, images, tmp_path / "cache", "--skip-bad"))
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2
    skipped = {entry["sample_id"]: entry["reason"] for entry in manifest["skipped"]}
    assert sorted(skipped) == sorted(UNLIMITED)
    for kind in UNLIMITED:
        assert re.search(BAD[kind][1], skipped[kind]), (kind, skipped[kind])
        assert "\n" not in skipped[kind]


@pytest.mark.parametrize("kind", UNLIMITED)
def test_without_skip_bad_a_bad_sample_stops_the_dump_in_one_line_naming_it(tiny_teacher_dir, toy_dataset,
                                                                             tmp_path, kind):
    data, images = dataset_with(toy_dataset, [kind], good=1)
    result = CliRunner().invoke(app, dump_args(tiny_teacher_dir, data, images, tmp_path / "cache"))
    line = error_line(result)
    assert line.startswith(f"error: sample {kind!r}: ")
    assert re.search(BAD[kind][1], line), line


def test_dump_applies_the_configured_image_limits(tiny_teacher_dir, toy_dataset, tmp_path):
    """--max-image-pixels / --max-image-mb reach `samples.load_image` (teacher_dump/dump.py::prepare)."""
    data, images = dataset_with(toy_dataset, LIMITED)
    result = CliRunner().invoke(app, dump_args(tiny_teacher_dir, data, images, tmp_path / "cache", "--skip-bad",
                                               *LIMITS))
    assert result.exit_code == 0, result.output
    skipped = json.loads((tmp_path / "cache" / "manifest.json").read_text())["skipped"]
    assert [s["sample_id"] for s in skipped] == list(LIMITED)
    for entry in skipped:
        assert re.search(BAD[entry["sample_id"]][1], entry["reason"]), entry
    for kind in LIMITED:
        data, images = dataset_with(toy_dataset, [kind], good=1)
        line = error_line(CliRunner().invoke(app, dump_args(tiny_teacher_dir, data, images, tmp_path / kind,
                                                            *LIMITS)))
        assert line.startswith(f"error: sample {kind!r}: ") and re.search(BAD[kind][1], line), line


def test_train_applies_the_configured_image_limits(tiny_student_dir, toy_dataset, tmp_path):
    """--max-image-pixels reaches `samples.load_image` in the training data path (kdcache/batches.py)."""
    data, images = dataset_with(toy_dataset, ["big-pixels"])
    result = CliRunner().invoke(app, ["train", "--stage", "sft", "--student", str(tiny_student_dir), "--data",
                                      str(data), "--images", str(images), "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "--num-workers", "0", "--batch-size", "4",
                                      "--global-batch", "4", "--max-steps", "1", "--no-progress", *LIMITS])
    assert error_line(result).startswith("error: sample 'big-pixels': image is 100 x 100 = 10,000 pixels, over "
                                         "the limit of 2,000")


def test_records_with_a_bad_image_value_load_and_fail_when_prepared(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([
        {"id": "two", "image": ["a.png", "b.png"], "conversations": ASK},
        {"id": "empty", "image": "", "conversations": ASK},
        {"id": "number", "image": 3, "conversations": ASK},
        {"id": "turns", "conversations": "hello"}]))
    records = samples.load_records(tmp_path / "d.json")
    assert [r.sample_id for r in records] == ["two", "empty", "number", "turns"]
    for record in records[:3]:
        with pytest.raises(SampleError, match=f"{record.sample_id!r}: 'image' must be one relative path") as caught:
            samples.load_image(tmp_path, record)
        assert caught.value.sample_id == record.sample_id
        with pytest.raises(SampleError, match="one relative path"):         # even without --images
            samples.load_image(None, record)


def test_duplicate_ids_and_bad_json_stay_fatal(tmp_path):
    (tmp_path / "dup.json").write_text(json.dumps([{"id": "a", "conversations": ASK}, {"id": "a", "image": []}]))
    with pytest.raises(KdcacheError, match="already used") as caught:
        samples.load_records(tmp_path / "dup.json")
    assert not isinstance(caught.value, SampleError)
    (tmp_path / "bad.json").write_text('[{"id": "a",]')
    with pytest.raises(KdcacheError, match="bad JSON"):
        samples.load_records(tmp_path / "bad.json")
    (tmp_path / "sid.json").write_text('[{"id": "x\\ud800", "conversations": []}]')
    with pytest.raises(KdcacheError, match="sample id .* is not valid text"):
        samples.load_records(tmp_path / "sid.json")


def test_dataset_files_that_break_the_json_parser_are_one_line_errors_and_odd_text_loads(tmp_path):
    for name, text, message in (("deep.json", "[" * 100_000 + "]" * 100_000, "deep.json: bad JSON: nested too deeply"),
                                ("digits.jsonl", '{"id": ' + "1" * 5000 + "}\n", "digits.jsonl line 1: bad JSON: "
                                                                                  "Exceeds the limit")):
        (tmp_path / name).write_text(text)
        with pytest.raises(KdcacheError, match=message) as caught:
            samples.load_records(tmp_path / name)
        assert "\n" not in str(caught.value)
    # U+2028 inside a JSONL string is not a line break; CRLF line ends and a byte-order mark are fine
    (tmp_path / "odd.jsonl").write_text('\ufeff{"id": "a", "conversations": [{"value": "x\u2028y"}]}\r\n{"id": "b"}\n',
                                        encoding="utf-8")
    records = samples.load_records(tmp_path / "odd.jsonl")
    assert [r.sample_id for r in records] == ["a", "b"] and records[0].conversations[0]["value"] == "x\u2028y"


def test_text_tokenising_to_the_image_token_elsewhere_is_refused(toy_tokenizer):
    from kdcache.templates import build_sequence

    image_id = toy_tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(SampleError, match=r"'s': turn 1 \(gpt\) contains <image>"):
        build_sequence(turns(answer="<image>"), toy_tokenizer, template="plain", image_token_id=image_id,
                       visual_len=4, has_image=True, sample_id="s")
    with pytest.raises(SampleError, match="'s': turn 2 .* unpaired surrogate '\\\\udfff' at character 3"):
        build_sequence(turns() + [{"from": "human", "value": "abc\udfff"}, {"from": "gpt", "value": "x"}],
                       toy_tokenizer, template="qwen2_base", image_token_id=image_id, visual_len=4, has_image=True,
                       sample_id="s")


# --- 2: image limits; FIFOs and devices are refused without being opened


def run_with_timeout(fn, seconds: float = 20):
    """fn() in a daemon thread: fails (instead of hanging the suite) if it blocks."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def special_files(images: Path) -> None:
    os.mkfifo(images / "pipe.png")
    os.symlink("/dev/zero", images / "zero.png")


def test_fifo_and_device_images_are_refused_without_blocking(tmp_path):
    special_files(tmp_path)
    for name, kind in (("pipe.png", "FIFO"), ("zero.png", "character device")):
        with pytest.raises(SampleError, match=f"'{name}': image .*{name} is not a regular file \\(it is a {kind}\\)"):
            run_with_timeout(lambda: samples.load_image(tmp_path, Record(name, name, ASK)))


def test_dump_skips_fifo_and_dev_zero_images_and_stops_on_them_without_skip_bad(tiny_teacher_dir, toy_dataset,
                                                                                   tmp_path):
    data, images = toy_dataset(count=2)
    special_files(images)
    records = json.loads(data.read_text())
    records += [{"id": "pipe", "image": "pipe.png", "conversations": ASK},
                {"id": "zero", "image": "zero.png", "conversations": ASK}]
    data.write_text(json.dumps(records))

    def kdcache(*args):   # a subprocess with a timeout: the test cannot hang if reading a FIFO blocks again
        return subprocess.run([sys.executable, "-m", "kdcache.cli", *args], capture_output=True, text=True, timeout=60)

    done = kdcache(*dump_args(tiny_teacher_dir, data, images, tmp_path / "cache", "--skip-bad"))
    assert done.returncode == 0, done.stderr
    skipped = json.loads((tmp_path / "cache" / "manifest.json").read_text())["skipped"]
    assert [(s["sample_id"], s["reason"].split("(it is a ")[-1]) for s in skipped] == [
        ("pipe", "FIFO)"), ("zero", "character device)")]

    failed = kdcache(*dump_args(tiny_teacher_dir, data, images, tmp_path / "cache2"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    last = [line for line in failed.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: sample 'pipe': image ") and "not a regular file (it is a FIFO)" in last


def test_byte_limit_reads_at_most_limit_plus_one_bytes(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 5000)
    assert samples.read_image_bytes(tmp_path, Record("a", "a.png", ASK), max_bytes=5000) == b"x" * 5000
    with pytest.raises(SampleError, match="'a': image .* is 5,000 bytes, over the limit of 4,999"):
        samples.read_image_bytes(tmp_path, Record("a", "a.png", ASK), max_bytes=4999)


def test_pixel_limit_is_checked_before_decoding_and_pil_bombs_are_sample_errors():
    with pytest.raises(SampleError, match="'big': image is 8000 x 8000 = 64,000,000 pixels, over the limit of "
                                          "50,000,000"):
        samples.decode_image(png_header_only(8000, 8000), "big")                     # the default limit
    for width in (10_000, 20_000):             # PIL's warning (> 89 M pixels) and its error (> 179 M pixels)
        with pytest.raises(SampleError, match="'bomb': image too large to decode safely"):
            samples.decode_image(png_header_only(width, width), "bomb", max_pixels=None)
    with pytest.raises(SampleError, match="'e': image is 10 bytes, over the limit of 9"):
        samples.decode_image(b"0123456789", "e", max_bytes=9)


def test_config_limits_reach_load_image(tmp_path, toy_images):
    from teacher_dump.config import DumpConfig

    name = toy_images(tmp_path, count=1)[0]
    cfg = DumpConfig(teacher="t", data="d", out="o", max_image_pixels=1000)
    assert samples.image_limits(cfg) == {"max_bytes": 64 << 20, "max_pixels": 1000}
    with pytest.raises(SampleError, match="1,024 pixels, over the limit of 1,000"):
        samples.load_image(tmp_path, Record("s", name, ASK), **samples.image_limits(cfg))


# --- 4: OS errors and errors re-raised from DataLoader workers print one line


def test_an_os_error_is_one_line_naming_the_path_and_a_traceback_with_kdcache_debug(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    args = ["quickstart", "--out", str(tmp_path / "file" / "q")]      # its first mkdir meets a regular file
    assert error_line(CliRunner().invoke(app, args)) == f"error: {tmp_path / 'file' / 'q'}/data/images: Not a directory"
    monkeypatch.setenv("KDCACHE_DEBUG", "1")
    assert isinstance(CliRunner().invoke(app, args).exception, NotADirectoryError)


def test_os_errors_print_path_and_reason(capsys):
    @clean_errors
    def full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/cache/shard-r000-00003.arrow.tmp")

    @clean_errors
    def rename():
        raise PermissionError(errno.EACCES, "Permission denied", "/a/x.tmp", None, "/a/x")

    for fn, line in ((full_disk, "error: /data/cache/shard-r000-00003.arrow.tmp: No space left on device"),
                     (rename, "error: /a/x.tmp -> /a/x: Permission denied")):
        with pytest.raises(typer.Exit):
            fn()
        assert capsys.readouterr().err == line + "\n"


def worker_reraise(error: BaseException) -> BaseException:
    """What a DataLoader raises in the main process when a worker raised `error`."""
    from torch._utils import ExceptionWrapper

    try:
        raise error
    except BaseException:
        wrapper = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapper.reraise()
    except BaseException as e:     # noqa: BLE001 - what the worker handed back
        return e
    raise AssertionError("reraise did not raise")


def test_sample_errors_from_workers_re_raise_cleanly(capsys):
    error = worker_reraise(SampleError("id 'x'", "turn 1 (gpt) contains <image>:\nsecond line"))
    assert type(error) is SampleError
    assert (error.sample_id, error.reason) == ("id 'x'", "turn 1 (gpt) contains <image>:\nsecond line")
    assert str(error) == "sample \"id 'x'\": turn 1 (gpt) contains <image>:\nsecond line"
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is SampleError and (copy.sample_id, copy.reason, str(copy)) == (error.sample_id, error.reason,
                                                                                      str(error))
    cache_error = worker_reraise(CacheError("cache c: row 3 is malformed:\nrelation_norm: float expected"))
    assert type(cache_error) is CacheError
    assert str(cache_error) == "cache c: row 3 is malformed:\nrelation_norm: float expected"
    os_error = worker_reraise(OSError("cannot map shard\nValueError: in the message"))
    assert error_line_of(os_error) == "cannot map shard ValueError: in the message"

    @clean_errors
    def train():
        raise error

    with pytest.raises(typer.Exit):
        train()
    assert capsys.readouterr().err == "error: sample \"id 'x'\": turn 1 (gpt) contains <image>: second line\n"


def test_a_bad_training_sample_read_in_a_worker_is_one_line_naming_it(tiny_student_dir, toy_dataset, tmp_path):
    data, images = dataset_with(toy_dataset, ["answer-image"])
    result = CliRunner().invoke(app, ["train", "--stage", "sft", "--student", str(tiny_student_dir), "--data",
                                      str(data), "--images", str(images), "--out", str(tmp_path / "run"),
                                      "--device", "cpu", "--num-workers", "1", "--batch-size", "4",
                                      "--global-batch", "4", "--max-steps", "1", "--no-progress"])
    assert error_line(result).startswith("error: sample 'answer-image': turn 1 (gpt) contains <image>")
