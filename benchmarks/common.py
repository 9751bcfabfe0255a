"""What the three benchmarks share: the scaled-down teacher and student, the synthetic dataset, FLOP
counts, timing, the machine line and the printed table.

The models keep the proportions of the real pair (benchmarks/README.md, "Configurations"):

* student ~ Qwen1.5-0.5B: LM head : transformer body = 1 : 2 (parameters, i.e. matmul FLOPs per token);
* teacher ~ Qwen1.5-4B:   LM head : transformer body = 1 : 8, hidden 2.5x the student's, untied head,
  ~8x the student's parameters;
* one SigLIP-shaped tower (384 px, patch 14: 27 x 27 - 1 = 728 visual tokens) whose forward per image
  costs about what the student's body costs per sample, as so400m does next to Qwen1.5-0.5B;
* the vocabulary is scaled down with the widths (6,272 instead of 151,936) so that the head ratio holds.

Both models are built through `kdcache.models.compose` with the toy tokenizer (its 600 ids are all a
sample uses; the LM's vocabulary is larger), exactly as `kdcache.toy.models.build_toy_bundle` does.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import random
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from kdcache import models
from kdcache.toy import models as toy_models
from kdcache.toy.recipe import cpu_model

REPO = Path(__file__).resolve().parents[1]

# --- configurations (real ones for the ratios, scaled ones for the CPU)

REAL = {
    "student": dict(name="Qwen1.5-0.5B", vocab_size=151936, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "teacher": dict(name="Qwen1.5-4B", vocab_size=151936, hidden_size=2560, intermediate_size=6912,
                    num_hidden_layers=40, num_attention_heads=20, num_key_value_heads=20, tie_word_embeddings=False),
    "vision": dict(name="siglip-so400m-patch14-384", hidden_size=1152, intermediate_size=4304,
                   num_hidden_layers=27, image_size=384, patch_size=14),
}
VOCAB = 6272
STUDENT = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
TEACHER = dict(vocab_size=VOCAB, hidden_size=1280, intermediate_size=3868, num_hidden_layers=3,
               num_attention_heads=10, num_key_value_heads=10, tie_word_embeddings=False)
VISION = dict(image_size=384, patch_size=14, hidden_size=384, intermediate_size=1536,
              num_hidden_layers=5, num_attention_heads=6)
VISUAL_LEN = (VISION["image_size"] // VISION["patch_size"]) ** 2 - 1          # 728
# Toy-sized models for `bench_gpu.py --tiny` and its fidelity part: the tests' tiny pair (tests/conftest.py),
# a 2-layer tower on 32 px images with 8 px patches (15 visual tokens), the toy tokenizer's 600 ids.
TINY = {
    "vision": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2),
    "teacher": dict(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False),
    "student": dict(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=2, tie_word_embeddings=True),
}
RESPONSE_TOKENS = 200                     # answer words (one token each with the toy tokenizer) + eos
TEACHER_LOGIT_STD = 3.0                   # the random teacher's head is rescaled to give LLM-like logits


def body_params(cfg: dict) -> int:
    """Matmul parameters of the transformer body (attention projections + MLP), per the Qwen2 layout."""
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return layers * (2 * d * d + 2 * d * kv + 3 * d * i)


def head_params(cfg: dict) -> int:
    return cfg["vocab_size"] * cfg["hidden_size"]


def total_params(cfg: dict) -> int:
    """Body + head + input embedding (shared with the head when tied); norms and biases left out."""
    return body_params(cfg) + head_params(cfg) * (1 if cfg["tie_word_embeddings"] else 2)


def vision_params(cfg: dict) -> int:
    d, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    return layers * (4 * d * d + 2 * d * i)


def config_rows(seq_len: int) -> list[list]:
    """Table rows comparing the real and the scaled models (head : body, teacher : student)."""
    rows = []
    for role, scaled in (("student", STUDENT), ("teacher", TEACHER)):
        real = REAL[role]
        for label, cfg in ((real["name"], real), (f"scaled {role}", scaled)):
            head, body = head_params(cfg), body_params(cfg)
            attn = 4 * seq_len * cfg["hidden_size"] * cfg["num_hidden_layers"] / 2    # FLOPs / token, per MAC
            rows.append([label, cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"],
                         cfg["num_hidden_layers"], f"{total_params(cfg) / 1e6:,.1f}M",
                         f"1 : {body / head:.2f}", f"1 : {(body + attn) / head:.2f}"])
    ratio_real = total_params(REAL["teacher"]) / total_params(REAL["student"])
    ratio_scaled = total_params(TEACHER) / total_params(STUDENT)
    rows.append(["teacher / student params", "", "", "", "", f"{ratio_real:.2f}x real, {ratio_scaled:.2f}x scaled",
                 "", ""])
    tower_real = vision_params(REAL["vision"]) / body_params(REAL["student"])
    tower_scaled = vision_params(VISION) / body_params(STUDENT)
    rows.append(["tower fwd / student body fwd", "", "", "", "", "",
                 f"{tower_real * (VISUAL_LEN + 1) / seq_len:.2f} real", f"{tower_scaled * (VISUAL_LEN + 1) / seq_len:.2f} scaled"])
    return rows


CONFIG_HEADER = ["model", "V", "D", "I", "layers", "params", "head : body", "head : body+attn"]


# --- FLOPs (matmul FLOPs = 2 x multiply-adds; attention scores and mixing counted in full, 4 T^2 D per layer)


def tower_flops() -> float:
    tokens = VISUAL_LEN + 1
    d, layers = VISION["hidden_size"], VISION["num_hidden_layers"]
    return 2 * vision_params(VISION) * tokens + 4 * tokens * tokens * d * layers


def body_flops(cfg: dict, seq_len: int) -> float:
    return 2 * body_params(cfg) * seq_len + 4 * seq_len * seq_len * cfg["hidden_size"] * cfg["num_hidden_layers"]


def head_flops(cfg: dict, rows: int) -> float:
    return 2 * head_params(cfg) * rows


def student_step_flops(seq_len: int, head_rows: int, *, recompute_head: bool = True) -> float:
    """One sample's training FLOPs: frozen tower forward, body forward + backward (2x), LM head over
    `head_rows` rows forward + backward (2x), plus one recomputed forward when the head is checkpointed."""
    projector = 2 * (VISION["hidden_size"] * STUDENT["hidden_size"] + STUDENT["hidden_size"] ** 2) * VISUAL_LEN
    head = head_flops(STUDENT, head_rows) * (4 if recompute_head else 3)
    return tower_flops() + 3 * projector + 3 * body_flops(STUDENT, seq_len) + head


# --- models


def build_bundle(text_config: dict, *, seed: int, source: str, logit_std: float | None = None,
                 vision: dict = VISION, device: str = "cpu", dtype: torch.dtype = torch.float32) -> models.Bundle:
    """A LLaVA bundle: a SigLIP tower of `vision` + a Qwen2 LM from `text_config`, joined by `compose`.

    The weights are created where they will live (`torch.device(device)`, in `dtype`): a 4B-parameter
    teacher is built on the GPU directly, never on the CPU first. Random weights, seeded.
    """
    tokenizer = toy_models.build_toy_tokenizer(image_token=True)
    text = {k: v for k, v in text_config.items() if k != "name"}
    rng_devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), torch.device(device), default_dtype(dtype):
        torch.manual_seed(1234)
        tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vision.items() if k != "name"},
                                                     vision_use_head=False))
        torch.manual_seed(seed)
        language_model = Qwen2ForCausalLM(Qwen2Config(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
            max_position_embeddings=2048, **text))
        bundle = models.compose(tower, language_model, tokenizer,
                                models.siglip_image_processor(vision["image_size"]), source=source)
    if logit_std is not None:
        # A random head gives near-uniform logits (std ~0.5): rescale it so that the teacher's
        # distributions are as peaked as a trained LLM's, which is what the shards compress.
        with torch.no_grad():
            head = models.lm_head_weight(bundle.model)
            head.mul_(logit_std / (head.float().std() * math.sqrt(text["hidden_size"])))
    bundle.projector_trained = True
    return bundle


@contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default floating dtype set to `dtype` inside the block (new parameters are created in it)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def teacher_bundle() -> models.Bundle:
    return build_bundle(TEACHER, seed=1, source="bench-teacher", logit_std=TEACHER_LOGIT_STD)


def student_bundle() -> models.Bundle:
    return build_bundle(STUDENT, seed=2, source="bench-student")


# --- data


def make_image(seed: int, target_bytes: int = 60_000, size: tuple[int, int] = (512, 384)) -> bytes:
    """A photo-like JPEG of about `target_bytes`: smooth color fields plus texture, quality searched."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = rng.random((h // 32 + 1, w // 32 + 1, 3)) * 255
    smooth = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    texture = rng.normal(0, 1, (h, w, 3)).astype(np.float32)
    best = b""
    for amplitude in (2, 4, 6, 8, 12, 16, 24, 32):
        pixels = np.clip(smooth + amplitude * texture, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
        best = buf.getvalue()
        if len(best) >= target_bytes:
            break
    return best


def make_dataset(folder: Path, num_samples: int, *, seed: int = 0, answer_words: int = RESPONSE_TOKENS - 1) -> Path:
    """LLaVA JSON + images in `folder`: one question, one ~200-token answer per sample (qwen2_base)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    words = [*toy_models.COLORS, *toy_models.SHAPES, *toy_models.SIZES, *toy_models.POSITIONS, *toy_models.COUNTS,
             *toy_models.FUNCTION_WORDS]
    rng = random.Random(seed)
    records = []
    for i in range(num_samples):
        name = f"img{i:04d}.jpg"
        (folder / "images" / name).write_bytes(make_image(seed * 1000 + i))
        question = "<image>\nDescribe the image " + " ".join(rng.choice(words) for _ in range(12)) + "?"
        answer = " ".join(rng.choice(words) for _ in range(answer_words))
        records.append({"id": f"s{i:04d}", "image": name,
                        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]})
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    return data


def dump_cache(bundle: models.Bundle, data: Path, out: Path, *, batch_size: int = 2) -> dict:
    """A real cache of `data` from `bundle`, through `teacher_dump.dump.dump_records`. Returns the manifest."""
    from kdcache import samples
    from teacher_dump import dump, forward

    cfg = dump_config(data, out, batch_size=batch_size)
    teacher = forward.Teacher.from_bundle(bundle, device=torch.device("cpu"), dtype=torch.float32, relation=cfg.relation)
    return write_cache(teacher, samples.load_records(data), cfg,
                       dump.run_description(cfg, bundle, teacher, world_size=1))


def dump_config(data: Path, out: Path, *, batch_size: int):
    """The benchmarks' dump settings: the job's defaults, on the CPU in float32, quiet."""
    from teacher_dump.config import DumpConfig

    return DumpConfig(teacher="bench-teacher", data=str(data), out=str(out), images=str(data.parent / "images"),
                      batch_size=batch_size, device="cpu", dtype="float32", progress=False, allow_untrained=True)


def write_cache(teacher, records: list, cfg, run: dict, timings: dict | None = None) -> dict:
    """`dump_records` into one rank's shards at `cfg.out`, then the rank report and the manifest, as `dump` does.
    `timings` receives the dump's per-stage times (`dump_records`)."""
    from kdcache import writer
    from teacher_dump import dump

    with dump.open_writer(cfg, rank=0) as shard_writer:
        skipped = dump.dump_records(teacher, records, cfg, shard_writer, timings=timings)
    writer.write_rank_report(cfg.out, 0, skipped=skipped)
    return writer.finalize_cache(cfg.out, run)


# --- timing and reporting


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def measure(fn):
    """(fn(), process CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def machine() -> dict:
    load = os.getloadavg()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = cpu_model() or "cpu"
    return {"date": time.strftime("%Y-%m-%d"), "commit": commit, "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg_1m_start": round(load[0], 2)}


def rounded(value):
    """JSON-friendly: floats to 4 significant digits, recursively."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(cells[0], widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"
