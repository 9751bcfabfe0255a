"""Interoperability (issue 14): teacher heads padded past the student's, and Qwen2.5-shaped models.

A padded teacher (its head has TINY_PADDING more rows than the tokenizer, as Qwen2.5-7B's has over 3B's)
is dumped and an unpadded student trained from its cache; compat compares tokenizers, not heads. Then
tiny Qwen2 LLMs with the Qwen2.5 family's config traits go the presets' way: compose -> save -> dump ->
train (dft) -> reload with transformers. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration, SiglipConfig, SiglipModel

from conftest import TINY_PADDING, TINY_VISION, TINY_VISUAL_LEN, TRAINED, write_toy_dataset
from kdcache import compat, models, presets
from kdcache.errors import CacheError, KdcacheError
from kdcache.reader import CacheReader
from kdcache.audit import verify_cache
from kdcache.toy import models as toy_models
from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump

TOKENS = toy_models.VOCAB_SIZE     # len(toy tokenizer), <image> included


def run_dump(teacher, data, images, out, **overrides) -> dict:
    return dump(DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), device="cpu",
                           dtype="float32", progress=False, batch_size=2, **overrides))


def run_train(student, cache, out, stage="dft"):
    return train(TrainConfig(stage=stage, student=str(student), cache=str(cache), out=str(out), device="cpu",
                             num_workers=0, progress=False, batch_size=2, global_batch=2, max_steps=2))


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def all_topk_ids(cache) -> np.ndarray:
    reader = CacheReader(cache)
    rows = [reader.read_sample(i) for i in range(len(reader))]
    return np.concatenate([row[f"{role}_topk_ids"].reshape(-1) for row in rows for role in ("response", "visual")])


@pytest.fixture(scope="module")
def padded_cache(tiny_padded_teacher_dir, tmp_path_factory):
    """The padded teacher's cache of 4 samples (3 with an image), k = 32 for both roles."""
    root = tmp_path_factory.mktemp("padded")
    data, images = write_toy_dataset(root, count=4, text_only=1)
    run_dump(tiny_padded_teacher_dir, data, images, root / "cache", topk_response=32, topk_visual=32)
    return root / "cache"


# --- part 1: padded heads


def test_the_manifest_records_the_teachers_head_rows_and_its_tokenizer_size_apart(padded_cache):
    manifest = json.loads((padded_cache / "manifest.json").read_text())
    assert manifest["vocab_size"] == TOKENS + TINY_PADDING and manifest["tokenizer_size"] == TOKENS
    ids = all_topk_ids(padded_cache)
    assert (ids >= TOKENS).any() and ids.max() < TOKENS + TINY_PADDING     # padding rows won places here
    assert verify_cache(padded_cache) == []


@pytest.mark.parametrize("stage", ["dpt", "dft"])
def test_an_unpadded_student_trains_from_a_padded_teachers_cache(stage, padded_cache, tiny_student_dir, tmp_path):
    assert models.lm_head_weight(models.load_bundle(str(tiny_student_dir)).model).shape[0] == TOKENS
    final = run_train(tiny_student_dir, padded_cache, tmp_path / "run", stage=stage)
    steps = metrics(tmp_path / "run")
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        assert all(math.isfinite(m[key]) for key in ("loss", "ce", "kl_response", "kl_visual", "relation"))
        assert m["kl_response"] > 0 and m["kl_visual"] > 0
    assert LlavaForConditionalGeneration.from_pretrained(final).lm_head.weight.shape[0] == TOKENS


def test_a_cache_of_another_tokenizer_is_still_refused_when_the_head_is_padded(padded_cache, tiny_student_dir,
                                                                               tmp_path):
    other = models.load_bundle(str(tiny_student_dir))
    other.tokenizer.add_tokens(["<zebra>"])
    other.model.resize_token_embeddings(len(other.tokenizer))
    models.save_bundle(other, tmp_path / "other-student", stages=other.stages)
    with pytest.raises(KdcacheError, match="tokenizer fingerprint is 'sha256:.*' in the cache but 'sha256:"):
        run_train(tmp_path / "other-student", padded_cache, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def student_manifest(bundle, **changes) -> dict:
    """What compat reads of a manifest, matching `bundle`, with `changes` applied."""
    manifest = {
        "tokenizer": {"fingerprint": models.tokenizer_fingerprint(bundle.tokenizer)}, "tokenizer_size": TOKENS,
        "image_token_id": int(bundle.model.config.image_token_id), "visual_len": TINY_VISUAL_LEN,
        "vocab_size": TOKENS + TINY_PADDING, "image_processor": compat.processor_settings(bundle.image_processor),
    }
    return {**manifest, **changes}


def test_compat_accepts_a_larger_teacher_head_and_refuses_another_tokenizer_size(tiny_student_dir):
    bundle = models.load_bundle(str(tiny_student_dir))
    compat.check_student_matches_cache(student_manifest(bundle), bundle, "c")
    with pytest.raises(KdcacheError, match=f"tokenizer_size is {TOKENS + 1} in the cache but {TOKENS} in the student"):
        compat.check_student_matches_cache(student_manifest(bundle, tokenizer_size=TOKENS + 1), bundle, "c")
    with pytest.raises(CacheError, match="'tokenizer_size' must be an integer, got '600'"):
        compat.check_student_matches_cache(student_manifest(bundle, tokenizer_size="600"), bundle, "c")


def test_compat_refuses_a_student_without_a_row_for_every_token(tiny_student_dir):
    bundle = models.load_bundle(str(tiny_student_dir))
    bundle.model.resize_token_embeddings(TOKENS - 8)                   # a head (tied) shorter than the tokenizer
    with pytest.raises(KdcacheError, match=f"has a tokenizer of {TOKENS} tokens but student .* has only "
                                           f"{TOKENS - 8} rows in its LM head"):
        compat.check_student_matches_cache(student_manifest(bundle), bundle, "c")


def test_compat_keeps_the_old_rule_for_a_cache_without_tokenizer_size(tiny_student_dir):
    """Its rows bound input ids by the teacher's head only: a smaller student head could meet an id it lacks."""
    bundle = models.load_bundle(str(tiny_student_dir))
    old = student_manifest(bundle)
    del old["tokenizer_size"]
    with pytest.raises(KdcacheError, match=f"holds token ids up to {TOKENS + TINY_PADDING - 1} .*no tokenizer_size, "
                                           f"so dump it again.* only {TOKENS} rows in its LM head"):
        compat.check_student_matches_cache(old, bundle, "c")
    compat.check_student_matches_cache({**old, "vocab_size": TOKENS}, bundle, "c")


def test_dump_refuses_a_teacher_whose_head_is_shorter_than_its_tokenizer(tiny_teacher_dir, tmp_path):
    bundle = models.load_bundle(str(tiny_teacher_dir))
    bundle.model.resize_token_embeddings(TOKENS - 8)
    models.save_bundle(bundle, tmp_path / "short", stages=TRAINED)
    data, images = write_toy_dataset(tmp_path, count=1)
    with pytest.raises(KdcacheError, match=f"has {TOKENS - 8} LM-head rows but its tokenizer has {TOKENS} tokens"):
        run_dump(tmp_path / "short", data, images, tmp_path / "cache")


# --- part 4: Qwen2.5 shapes

# Public config.json fields of Qwen/Qwen2.5-{0.5B,1.5B,3B} that set the family apart, kept as the hub
# has them (transformers 4.x names: `rope_theta` at the top level, `torch_dtype`); only sizes shrink.
QWEN25 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "use_sliding_window": False, "sliding_window": 32768, "use_mrope": False,
    "tie_word_embeddings": True, "max_position_embeddings": 32768, "attention_dropout": 0.0,
    "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16", "transformers_version": "4.43.1",
}
# The toy tokenizer without <image> has 600 tokens (+ <image> from compose = 601); the heads are padded past
# it as Qwen2.5's are past its 151,665 tokens: 151,936 rows (0.5B-3B), 152,064 (7B).
QWEN25_SHAPES = {
    "0.5b": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, vocab_size=640),
    "3b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=640),
    "7b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=704, tie_word_embeddings=False),
}


def save_qwen25_llm(directory, shape: str, seed: int) -> None:
    """A tiny random Qwen2.5-shaped LLM directory as the hub serves one: public-style config.json,
    safetensors weights, and the toy tokenizer without <image> (eos = pad = <|endoftext|>, no bos)."""
    tokenizer = toy_models.build_toy_tokenizer(image_token=False)
    config = {**QWEN25, **QWEN25_SHAPES[shape], "max_window_layers": QWEN25_SHAPES[shape]["num_hidden_layers"],
              "bos_token_id": tokenizer.eos_token_id, "eos_token_id": tokenizer.eos_token_id}
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory)).save_pretrained(directory)
    (directory / "config.json").write_text(json.dumps(config))      # the hub's file, not transformers 5's rewrite
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def qwen25_presets(tmp_path_factory):
    """Presets 'tiny-qwen2.5-{0.5b,3b,7b}': a tiny SigLIP + a tiny Qwen2.5-shaped LLM, joined as the hub presets are."""
    root = tmp_path_factory.mktemp("qwen25")
    siglip = SiglipModel(SiglipConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2),
                                      vision_config=TINY_VISION))
    siglip.save_pretrained(root / "siglip")
    names = {}
    for seed, shape in enumerate(QWEN25_SHAPES):
        save_qwen25_llm(root / shape, shape, seed)
        names[shape] = f"tiny-qwen2.5-{shape}"
    patch = pytest.MonkeyPatch()
    for shape, name in names.items():
        patch.setitem(presets.PRESETS, name, presets.hub_preset(str(root / "siglip"), str(root / shape)))
    yield names
    patch.undo()


def assert_qwen25_traits(model, shape: str) -> None:
    """The LLaVA model keeps the Qwen2.5 traits of its LLM: GQA, rope theta, no sliding window, q/k/v bias, ties."""
    text = model.config.text_config
    sizes = QWEN25_SHAPES[shape]
    assert text.num_key_value_heads == sizes["num_key_value_heads"] < text.num_attention_heads
    assert text.rope_parameters["rope_theta"] == 1e6 and text.use_sliding_window is False
    assert text.sliding_window is None and set(text.layer_types) == {"full_attention"}
    attention = model.model.language_model.layers[0].self_attn
    assert all(getattr(attention, p).bias is not None for p in ("q_proj", "k_proj", "v_proj"))
    assert attention.o_proj.bias is None
    tied = sizes.get("tie_word_embeddings", True)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert models.lm_head_weight(model).shape[0] == sizes["vocab_size"]


@pytest.mark.parametrize("teacher_shape", ["3b", "7b"])
def test_qwen25_shapes_compose_save_dump_train_and_reload(teacher_shape, qwen25_presets, tmp_path):
    """3B teaches 0.5B with one head size (both padded past the tokenizer); 7B's head is padded further."""
    bundles = {}
    for role, shape in (("teacher", teacher_shape), ("student", "0.5b")):
        bundle = models.load_bundle(qwen25_presets[shape])            # models.compose_preset -> models.compose
        assert bundle.model.config.image_token_id == len(bundle.tokenizer) - 1 == TOKENS   # added, no resize
        assert_qwen25_traits(bundle.model, shape)
        models.save_bundle(bundle, tmp_path / role, stages=TRAINED)
        bundles[role] = bundle
    data, images = write_toy_dataset(tmp_path, count=4, text_only=1)
    manifest = run_dump(tmp_path / "teacher", data, images, tmp_path / "cache", topk_response=16, topk_visual=16)
    assert manifest["vocab_size"] == QWEN25_SHAPES[teacher_shape]["vocab_size"]
    assert manifest["tokenizer_size"] == len(bundles["student"].tokenizer) == TOKENS + 1
    student_rows = QWEN25_SHAPES["0.5b"]["vocab_size"]
    ids = all_topk_ids(tmp_path / "cache")
    assert (ids > TOKENS).any() and ((ids >= student_rows).any() == (teacher_shape == "7b"))   # padding rows won

    final = run_train(tmp_path / "student", tmp_path / "cache", tmp_path / "run")
    assert all(math.isfinite(m["loss"]) and m["kl_response"] > 0 for m in metrics(tmp_path / "run"))
    reloaded = LlavaForConditionalGeneration.from_pretrained(final).eval()
    assert_qwen25_traits(reloaded, "0.5b")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape == (1, 4, QWEN25_SHAPES["0.5b"]["vocab_size"]) and torch.isfinite(logits).all()
