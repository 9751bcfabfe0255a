"""Shared fixtures: the toy tokenizer, tiny saved teacher / student checkpoints, toy images and datasets.

Everything is built from configs (nothing is downloaded) once per session. Session fixtures are
shared: tests must not mutate them (load a checkpoint dir again, or build a fresh tokenizer, to
change one).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from kdcache import models
from kdcache.toy import models as toy_models

# A 2-layer SigLIP tower on 32x32 images with 8x8 patches: 16 patches -> 15 visual tokens.
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2)
TINY_VISUAL_LEN = 15
TINY_TEACHER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False)
TINY_STUDENT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True)
# The teacher's head padded past the tokenizer, as Qwen2.5-7B's (152,064 rows) is past 3B's (151,936): same tokenizer.
TINY_PADDING = 64
TINY_PADDED_TEACHER = dict(TINY_TEACHER, vocab_size=toy_models.VOCAB_SIZE + TINY_PADDING)
TRAINED = ["pt", "sft"]   # the history that marks a checkpoint's projector as trained

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="session")
def toy_tokenizer():
    """The toy byte-level BPE tokenizer (600 tokens, `<|endoftext|>` eos/pad, `<image>`). Do not mutate."""
    return toy_models.build_toy_tokenizer()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """transformers' Qwen2Tokenizer with a vocabulary trained locally (tests/local_tokenizers.py). Do not mutate."""
    from local_tokenizers import qwen_style_tokenizer

    return qwen_style_tokenizer()


@pytest.fixture(params=["toy", "qwen"])
def tokenizer(request, toy_tokenizer, qwen_tokenizer):
    """Each of the toy and the Qwen-style tokenizer, in turn."""
    return toy_tokenizer if request.param == "toy" else qwen_tokenizer


def _saved_tiny(tmp_path_factory, name: str, text_config: dict, seed: int) -> Path:
    out = tmp_path_factory.mktemp(name)
    bundle = toy_models.build_toy_bundle(text_config, seed=seed, source=name, vision_config=TINY_VISION)
    models.save_bundle(bundle, out, stages=TRAINED)
    return out


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaVA teacher (Qwen2 hidden 64, untied head; 15 visual tokens), marked trained (pt, sft)."""
    return _saved_tiny(tmp_path_factory, "tiny-teacher", TINY_TEACHER, seed=11)


@pytest.fixture(scope="session")
def tiny_padded_teacher_dir(tmp_path_factory) -> Path:
    """The tiny teacher with TINY_PADDING more LM-head (and embedding) rows than the toy tokenizer has tokens.

    The padding rows are randomly initialised, so unlike a trained head's they do win top-k places.
    """
    return _saved_tiny(tmp_path_factory, "tiny-padded-teacher", TINY_PADDED_TEACHER, seed=11)


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory) -> Path:
    """A saved tiny LLaVA student (Qwen2 hidden 32, tied head), same tower weights and tokenizer as the teacher."""
    return _saved_tiny(tmp_path_factory, "tiny-student", TINY_STUDENT, seed=12)


def draw_toy_image(index: int, size: int = 32) -> tuple[Image.Image, str, str]:
    """A deterministic toy scene: one colored shape on a grey background; returns (image, color, shape)."""
    color = list(COLORS)[index % len(COLORS)]
    shape = SHAPES[(index // len(COLORS)) % len(SHAPES)]
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    if shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    elif shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    else:
        draw.polygon([(size // 2, size // 4), (size // 4, 3 * size // 4), (3 * size // 4, 3 * size // 4)],
                     fill=COLORS[color])
    return image, color, shape


@pytest.fixture
def toy_images():
    """Factory: toy_images(directory, count=4, size=32) writes img-000.png ... and returns their names."""
    def make(directory, count: int = 4, size: int = 32) -> list[str]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = []
        for i in range(count):
            name = f"img-{i:03d}.png"
            draw_toy_image(i, size)[0].save(directory / name)
            names.append(name)
        return names

    return make


def write_toy_dataset(root: Path, *, count: int = 6, template: str = "qwen2_base", text_only: int = 0,
                      size: int = 32, name: str | None = None) -> tuple[Path, Path]:
    """A toy LLaVA JSON dataset in `root` -> (json path, images dir).

    Image samples ask for the color and shape (qwen2_base: two turns) or give a caption (plain);
    the last `text_only` samples have no image.
    """
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        if i >= count - text_only:
            records.append({"id": f"text-{i}", "conversations": [
                {"from": "human", "value": "How many sides has a square?"}, {"from": "gpt", "value": "four"}]})
            continue
        image, color, shape = draw_toy_image(i, size)
        image_name = f"img-{i:03d}.png"
        image.save(images / image_name)
        if template == "plain":
            turns = [{"from": "human", "value": "<image>\nDescribe the image briefly."},
                     {"from": "gpt", "value": f"A {color} {shape}."}]
        else:
            turns = [{"from": "human", "value": "<image>\nWhat color is the shape?"},
                     {"from": "gpt", "value": color},
                     {"from": "human", "value": "What shape is it?"},
                     {"from": "gpt", "value": f"It is a {shape}."}]
        records.append({"id": f"sample-{i}", "image": image_name, "conversations": turns})
    path = root / (name or f"data-{template}.json")
    path.write_text(json.dumps(records, indent=1))
    return path, images


@pytest.fixture
def toy_dataset(tmp_path):
    """Factory: toy_dataset(count=6, template="qwen2_base", text_only=0) -> (json path, images dir)."""
    def make(count: int = 6, template: str = "qwen2_base", text_only: int = 0, size: int = 32):
        return write_toy_dataset(tmp_path, count=count, template=template, text_only=text_only, size=size)

    return make


@pytest.fixture
def jobs(monkeypatch):
    """Replace the dump and train jobs by ones that record their config.

    The CLI imports `teacher_dump.dump` / `student_train.train` lazily, so stand-in modules in
    sys.modules are what it finds: parsing is tested without torch or a model.
    """
    seen: dict[str, object] = {}
    for module, name in (("teacher_dump.dump", "dump"), ("student_train.train", "train")):
        stub = types.ModuleType(module)
        setattr(stub, name, lambda cfg, name=name: seen.setdefault(name, cfg) and None)
        monkeypatch.setitem(sys.modules, module, stub)
    return seen


# --- caches behind URLs (test_remote.py, test_remote_transfer.py; servers and helpers in tests/remote_world.py)


@pytest.fixture
def s3():
    """moto's S3 server on 127.0.0.1 with an empty bucket; stopped at the end."""
    from remote_world import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture
def http_dir(tmp_path):
    """A directory served by http.server (no Range support) on 127.0.0.1: (server, directory)."""
    from remote_world import http_server

    with http_server(tmp_path) as served:
        yield served


@pytest.fixture(scope="module")
def remote_cache(tiny_teacher_dir, tiny_student_dir, tmp_path_factory):
    """The 24-sample cache of the tiny teacher in 6 shards, with its dataset and the tiny student (a dict)."""
    from remote_world import build_world

    return build_world(tiny_teacher_dir, tiny_student_dir, tmp_path_factory)
