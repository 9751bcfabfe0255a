"""A dump and a training stage on the CPU with the tests' settings (test_train.py, test_train_precision.py,
test_dump.py, test_fidelity.py, test_sampled.py)."""

from __future__ import annotations

from pathlib import Path

from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump


def run_dump(teacher, data, images, out, **overrides) -> dict:
    cfg = DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), device="cpu",
                     dtype="float32", progress=False, **overrides)
    return dump(cfg)


def run_train(student, out, *, stage: str, **overrides) -> Path:
    cfg = TrainConfig(stage=stage, student=str(student), out=str(out), device="cpu", num_workers=0, progress=False,
                      **overrides)
    return train(cfg)
