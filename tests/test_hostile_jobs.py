"""The two jobs under hostile conditions (docs/design.md §8): non-finite training, two jobs on one
directory and the locks of killed ones, resumes with changed settings or half-written files, empty
output, and --out paths the file system refuses. Real processes where the exit code and the one-line
error matter; in-process runs (same code path, no interpreter start) elsewhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_toy_dataset
from safetensors.torch import load_file

from kdcache import losses
from kdcache.errors import KdcacheError
from kdcache.lock import LOCK_NAME, DirLock
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from student_train import checkpoint
from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# A second job started ahead, all imports done, that runs the command line once the first job's lock exists.
WAIT_THEN_RUN = """
import sys, time
from pathlib import Path
import kdcache.cli, student_train.train, teacher_dump.dump
lock, deadline = Path(sys.argv[1]), time.time() + 120
while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
    time.sleep(0.01)
sys.argv = ["kdcache", *sys.argv[2:]]
kdcache.cli.main()
"""


def write_dataset(root: Path, count: int, *, text_only: int = 0, name: str = "data.json") -> tuple[Path, Path]:
    """A qwen2_base toy dataset (conftest.write_toy_dataset), for module-scoped fixtures too."""
    return write_toy_dataset(root, count=count, text_only=text_only, name=name)


def run_dump(teacher, data, images, out, **overrides) -> dict:
    settings = dict(device="cpu", dtype="float32", progress=False, topk_response=4, topk_visual=4)
    return dump(DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out),
                           **{**settings, **overrides}))


def run_train(student, out, *, stage: str = "dpt", **overrides) -> Path:
    settings = dict(batch_size=2, global_batch=2, lr=1e-3, seed=3, device="cpu", num_workers=0, progress=False)
    return train(TrainConfig(stage=stage, student=str(student), out=str(out), **{**settings, **overrides}))


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kdcache.cli", *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_when_locked(lock: Path, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WAIT_THEN_RUN, str(lock), *map(str, args)], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_error(stderr: str) -> str:
    """The CLI's one error line: the last line of stderr, with no traceback before it."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    assert sum(line.startswith("error:") for line in lines) == 1, stderr
    return lines[-1]


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def assert_checkpoints_finite(run: Path) -> list[str]:
    names = []
    for ckpt in sorted((run / "checkpoints").glob("step-*")):
        for file in ckpt.glob("*.safetensors"):
            for key, value in load_file(file).items():
                assert value.dtype.is_floating_point is False or bool(torch.isfinite(value).all()), (file, key)
        names.append(ckpt.name)
    return names


@pytest.fixture(scope="module")
def world(tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """8 samples (2 text-only), and two caches of them that differ in top-k (so in their manifests)."""
    root = tmp_path_factory.mktemp("hostile")
    data, images = write_dataset(root, 8, text_only=2)
    run_dump(tiny_teacher_dir, data, images, root / "cache")
    run_dump(tiny_teacher_dir, data, images, root / "cache-k3", topk_response=3, topk_visual=3)
    return dict(root=root, data=data, images=images, cache=root / "cache", cache_k3=root / "cache-k3",
                teacher=tiny_teacher_dir, student=tiny_student_dir)


# --- 1. non-finite training


def test_a_huge_lr_stops_at_the_first_non_finite_loss_naming_step_and_samples_and_saves_nothing_non_finite(
        world, tmp_path):
    # lr 1e30: step 1's update makes the projector ~1e30 (finite, and checkpointed as such); step 2's forward overflows
    run = tmp_path / "run"
    result = cli("train", "--stage", "dpt", "--student", world["student"], "--cache", world["cache"], "--out", run,
                 "--batch-size", "2", "--global-batch", "2", "--lr", "1e30", "--max-steps", "4", "--save-every", "1",
                 "--num-workers", "0", "--device", "cpu", "--no-progress")
    assert result.returncode == 1, result.stdout + result.stderr
    line = the_error(result.stderr)
    assert line.startswith("error: non-finite loss (nan) in micro-batch 1/1 of samples ['"), line
    assert " at step 2: training stopped before that update" in line, line
    assert not (run / "final").exists()
    assert assert_checkpoints_finite(run) == ["step-000000001"]
    assert not (run / LOCK_NAME).exists()


def test_an_lr_whose_step_size_overflows_is_one_line(world, tmp_path):
    with pytest.raises(KdcacheError, match=r"the update of step 1 overflowed .* --lr 1e\+38 is too large") as error:
        run_train(world["student"], tmp_path / "run", cache=str(world["cache"]), lr=1e38, max_steps=2)
    assert "\n" not in str(error.value) and not (tmp_path / "run" / "checkpoints").exists()


def test_infinite_gradient_stops_before_the_update(world, tmp_path, monkeypatch):
    real, seen = losses.distill_loss, []

    def infinite_gradient_from_step_2(hidden, weight, batch, **kwargs):
        out = real(hidden, weight, batch, **kwargs)
        seen.append(list(batch["sample_id"]))
        if len(seen) >= 2:       # value + 0, gradient d sqrt(x)/dx at 0 = inf
            out["loss"] = out["loss"] + torch.sqrt(hidden - hidden.detach()).sum()
        return out

    monkeypatch.setattr(losses, "distill_loss", infinite_gradient_from_step_2)
    run = tmp_path / "run"
    with pytest.raises(KdcacheError) as error:
        run_train(world["student"], run, stage="dft", cache=str(world["cache"]), max_steps=4, save_every=1)
    message = str(error.value)
    assert "\n" not in message and "non-finite gradient norm" in message and "at step 2" in message, message
    assert all(repr(i) in message for i in seen[1]), (seen, message)
    assert assert_checkpoints_finite(run) == ["step-000000001"]          # step 1 saved, nothing from step 2
    assert not (run / "final").exists()


# --- 2. locks


def test_a_second_dump_on_the_same_out_fails_at_once_and_the_first_completes(world, tmp_path):
    # The second job needs ~2 s from seeing the lock to failing on it; 24 samples left the first a margin of
    # ~0.1 s on a loaded 2-core machine, and the test failed now and then: 64 leave it ~1 s more.
    data, images = write_dataset(tmp_path, 64, text_only=2)
    out = tmp_path / "cache"
    args = ["dump", "--teacher", world["teacher"], "--data", data, "--images", images, "--out", out,
            "--batch-size", "1", "--topk", "4", "--device", "cpu", "--no-progress"]
    first = start_cli(*args)
    second = start_when_locked(out / LOCK_NAME, *args)
    try:
        _, err = second.communicate(timeout=180)
        assert first.poll() is None, "the first dump ended before the second tried: make it longer"
        assert second.returncode == 1, err
        line = the_error(err)
        assert str(out) in line and LOCK_NAME in line and f"pid {first.pid}" in line and "dump" in line, line
        _, first_err = first.communicate(timeout=300)
        assert first.returncode == 0, first_err
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    assert verify_cache(out) == []
    assert sorted(s["sample_id"] for s in CacheReader(out)) == sorted([f"sample-{i}" for i in range(62)]
                                                                       + ["text-62", "text-63"])
    assert not (out / LOCK_NAME).exists()


def test_the_lock_of_a_sigkilled_dump_is_taken_over_by_a_rerun(world, tmp_path, capfd):
    out = tmp_path / "cache"
    proc = start_cli("dump", "--teacher", world["teacher"], "--data", world["data"], "--images", world["images"],
                     "--out", out, "--topk", "4", "--device", "cpu", "--no-progress")
    lock = out / LOCK_NAME
    wait_for(lambda: lock.exists() and lock.read_text().strip(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads(lock.read_text())["pid"] == proc.pid                  # the file stays, the lock does not
    manifest = run_dump(world["teacher"], world["data"], world["images"], out)
    assert manifest["num_samples"] == 8 and verify_cache(out) == []
    assert f"taking over the lock of a dump that stopped without releasing it (pid {proc.pid}" in capfd.readouterr().err
    assert not lock.exists()


def test_a_second_train_on_the_same_run_fails_at_once_and_a_killed_ones_lock_is_taken_over(world, tmp_path, capfd):
    run = tmp_path / "run"
    args = ["train", "--stage", "dpt", "--student", world["student"], "--cache", world["cache"], "--out", run,
            "--batch-size", "2", "--global-batch", "2", "--lr", "1e-3", "--seed", "3", "--epochs", "100",
            "--save-every", "2", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    first = start_cli(*args)
    second = start_when_locked(run / LOCK_NAME, *args)
    try:
        _, err = second.communicate(timeout=180)
        assert second.returncode == 1, err
        line = the_error(err)
        assert str(run) in line and f"pid {first.pid}" in line and "train" in line, line
        wait_for(lambda: checkpoint.latest_checkpoint(run) is not None, first)
    finally:
        first.kill()
        first.wait()
        second.kill() if second.poll() is None else None
    assert (run / LOCK_NAME).exists()
    step = int(checkpoint.latest_checkpoint(run).name.removeprefix("step-"))
    capfd.readouterr()
    final = run_train(world["student"], run, cache=str(world["cache"]), epochs=100, max_steps=step + 1, resume=True)
    assert "taking over the lock of a train" in capfd.readouterr().err
    assert final.is_dir() and not (run / LOCK_NAME).exists()


# --- 3. and 4. resume: changed settings refused, half-written files tolerated


def test_resume_refuses_changed_settings_allows_max_steps_and_a_moved_cache_and_drops_a_cut_metrics_line(
        world, tmp_path):
    run = tmp_path / "run"
    run_train(world["student"], run, cache=str(world["cache"]), max_steps=1)
    record, config = (run / "run.json").read_text(), (run / "config.yaml").read_text()
    for change, named in ((dict(lr=2e-3), "lr was 0.001, now 0.002"), (dict(seed=4), "seed was 3, now 4"),
                          (dict(cache=str(world["cache_k3"])), "cache (manifest.json sha256)"),
                          (dict(batch_size=1), "batch_size was 2, now 1")):
        settings = {"cache": str(world["cache"]), "max_steps": 2, **change}
        with pytest.raises(KdcacheError, match="was started with other settings") as error:
            run_train(world["student"], run, resume=True, **settings)
        assert named in str(error.value) and "\n" not in str(error.value), str(error.value)
    assert (run / "run.json").read_text() == record and (run / "config.yaml").read_text() == config

    moved = tmp_path / "moved-cache"                    # the same cache elsewhere: compared by its manifest
    shutil.copytree(world["cache"], moved)
    with open(run / "metrics.jsonl", "a") as f:         # a line a killed run cut short
        f.write('{"step": 2, "loss": 1.23')
    run_train(world["student"], run, cache=str(moved), max_steps=2, save_every=7, resume=True)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert (run / "run.json").read_text() == record and (run / "config.yaml").read_text() == config
    assert yaml.safe_load(config)["max_steps"] == 1


def test_an_empty_or_cut_dump_record_is_rewritten_without_shards_and_refused_with_them(world, tmp_path):
    data, images = write_dataset(tmp_path, 2)
    out = tmp_path / "cache"
    (out / "_parts").mkdir(parents=True)
    (out / "_parts" / "dump-config.json").write_text("")
    assert run_dump(world["teacher"], data, images, out)["num_samples"] == 2

    other = tmp_path / "other"
    (other / "_parts").mkdir(parents=True)
    (other / "_parts" / "dump-config.json").write_text('{"teacher": {"sou')
    (other / "shard-r000-00000.arrow").write_bytes(b"finished shard")
    with pytest.raises(KdcacheError, match="unreadable .* holds finished shards") as error:
        run_dump(world["teacher"], data, images, other)
    assert "\n" not in str(error.value) and "dump-config.json" in str(error.value)


# --- 5. empty output


def test_an_empty_dataset_and_an_all_skipped_one_are_errors_and_the_partial_cache_resumes(world, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(KdcacheError, match="holds no samples"):
        run_dump(world["teacher"], empty, world["images"], tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()

    data, images = write_dataset(tmp_path / "bad", 2)
    hidden = tmp_path / "hidden"
    shutil.move(images, hidden)
    out = tmp_path / "cache"
    with pytest.raises(KdcacheError, match="all 2 were skipped") as error:
        run_dump(world["teacher"], data, images, out, skip_bad=True)
    assert "\n" not in str(error.value) and "sample-0" in str(error.value)
    assert not (out / "manifest.json").exists() and (out / "_parts" / "dump-config.json").exists()
    shutil.move(hidden, images)                         # the images come back: the same command resumes
    assert run_dump(world["teacher"], data, images, out, skip_bad=True)["num_samples"] == 2


def test_training_from_no_samples_says_so(world, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(KdcacheError, match=r"empty.json holds no samples: there is nothing to train on"):
        run_train(world["student"], tmp_path / "run", stage="pt", data=str(empty), images=str(world["images"]))
    cache = tmp_path / "cache"                          # a 0-sample cache (an old kdcache could write one)
    cache.mkdir()
    manifest = json.loads((world["cache"] / "manifest.json").read_text())
    (cache / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "num_samples": 0}))
    with pytest.raises(KdcacheError, match="holds no samples"):
        run_train(world["student"], tmp_path / "run2", cache=str(cache))


# --- 6. OS errors


def test_an_out_that_is_a_file_is_one_line_before_anything_runs(world, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    result = cli("dump", "--teacher", world["teacher"], "--data", world["data"], "--out", file, "--device", "cpu")
    assert result.returncode == 1
    assert the_error(result.stderr) == f"error: --out {file} is an existing file, not a directory; choose another --out"
    for out in (file, file / "run"):
        with pytest.raises(KdcacheError, match="an existing file, not a directory"):
            run_train(world["student"], out, cache=str(world["cache"]))
    assert file.read_text() == "not a directory"


def test_a_read_only_out_is_one_line_naming_the_path(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path).name == LOCK_NAME:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)       # running as root, chmod would not stop a write
    with pytest.raises(KdcacheError) as error:
        DirLock(tmp_path / "out", job="dump").acquire()
    assert str(error.value) == (f"cannot write in --out {tmp_path / 'out'} ({tmp_path / 'out' / LOCK_NAME}: "
                                "Read-only file system); it must be a writable directory")


def test_a_full_disk_is_one_line_naming_the_path(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    target = run / "checkpoints" / "step-000000001.tmp" / "trainable.safetensors"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(checkpoint, "save_checkpoint", disk_full)
    with pytest.raises(KdcacheError) as error:
        run_train(world["student"], run, cache=str(world["cache"]), max_steps=1)
    assert str(error.value) == (f"{target}: No space left on device (--out {run} must be a writable directory "
                                "with free space)")
    assert not (run / LOCK_NAME).exists()
