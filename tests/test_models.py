import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import (AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM,
                          SiglipConfig, SiglipModel, SiglipVisionConfig)

from conftest import TINY_STUDENT, TINY_TEACHER, TINY_VISION, TINY_VISUAL_LEN, draw_toy_image
from kdcache import models, presets, samples
from kdcache.errors import KdcacheError
from kdcache.toy import data as toy_data
from kdcache.toy import models as toy_models
from kdcache.templates import IMAGE_TOKEN, build_sequence


def tiny_bundle(text=TINY_STUDENT, seed=0):
    return toy_models.build_toy_bundle(text, seed=seed, source="tiny", vision_config=TINY_VISION)


def safetensors_keys(directory) -> list[str]:
    with safe_open(directory / "model.safetensors", "pt") as f:
        return list(f.keys())


def image_batch(bundle, count=2):
    """(input_ids, attention_mask, pixel_values): an image sample, a shorter padded one, and a text-only one."""
    image_id = bundle.model.config.image_token_id
    rows = [[5, 6] + [image_id] * TINY_VISUAL_LEN + [7, 8, 9], [10] + [image_id] * TINY_VISUAL_LEN + [11], [12, 13, 14]]
    length = max(map(len, rows))
    input_ids = torch.full((3, length), bundle.tokenizer.pad_token_id)
    attention_mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    pixels = samples.pixel_values([draw_toy_image(i)[0] for i in range(2)], bundle.image_processor)
    return input_ids, attention_mask, pixels


def test_compose_adds_the_image_token_and_its_id_is_the_config_image_token_id():
    tokenizer = toy_models.build_toy_tokenizer(image_token=False)
    assert IMAGE_TOKEN not in tokenizer.get_vocab()
    language_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **TINY_STUDENT))
    bundle = models.compose(toy_models.toy_vision_tower(**TINY_VISION), language_model, tokenizer,
                            models.siglip_image_processor(32), source="test")
    image_id = bundle.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == bundle.model.config.image_token_id == len(tokenizer) - 1
    assert IMAGE_TOKEN in bundle.tokenizer.all_special_tokens
    assert bundle.tokenizer.encode("a <image> b", add_special_tokens=False).count(image_id) == 1
    assert models.lm_head_weight(bundle.model).shape[0] == len(tokenizer)       # resized by one row
    assert bundle.model.config.image_seq_length == TINY_VISUAL_LEN
    assert bundle.projector_trained is False and bundle.stages == []


def test_compose_keeps_the_embeddings_when_the_vocabulary_has_room_and_sets_a_pad_token():
    tokenizer = toy_models.build_toy_tokenizer(image_token=False)
    tokenizer.pad_token = None
    language_model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer) + 64, **TINY_STUDENT))
    embed = language_model.get_input_embeddings().weight
    bundle = models.compose(toy_models.toy_vision_tower(**TINY_VISION), language_model, tokenizer,
                            models.siglip_image_processor(32), source="test")
    assert bundle.model.get_input_embeddings().weight is embed
    assert bundle.model.config.text_config.vocab_size == len(tokenizer) + 63
    assert bundle.tokenizer.pad_token_id == bundle.tokenizer.eos_token_id


@pytest.mark.parametrize("text", [TINY_TEACHER, TINY_STUDENT], ids=["untied", "tied"])
def test_composed_model_saved_reloads_with_transformers_unchanged(tmp_path, text):
    bundle = tiny_bundle(text)
    models.save_bundle(bundle, tmp_path, stages=[])
    keys = safetensors_keys(tmp_path)
    vision_keys = [k for k in keys if k.startswith("vision_tower.")]
    assert vision_keys and all(k.startswith("vision_tower.vision_model.") for k in vision_keys)
    assert not any(".head." in k for k in vision_keys)
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["vision_use_head"] is False

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    before, after = bundle.model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    input_ids, attention_mask, pixels = image_batch(bundle)
    with torch.no_grad():
        expected = bundle.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
        actual = reloaded(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
    assert torch.equal(expected, actual)


def test_saved_checkpoint_works_with_the_llava_processor(tiny_teacher_dir):
    processor = AutoProcessor.from_pretrained(tiny_teacher_dir)
    batch = processor(images=[draw_toy_image(0)[0]], text=["<image>\nWhat color?"], return_tensors="pt")
    image_id = LlavaConfig.from_pretrained(tiny_teacher_dir).image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == TINY_VISUAL_LEN
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_projector_is_untrained_when_composed_and_the_history_survives_save_and_load(tmp_path):
    bundle = tiny_bundle()
    models.save_bundle(bundle, tmp_path / "fresh", stages=[])
    fresh = models.load_bundle(str(tmp_path / "fresh"))
    assert fresh.projector_trained is False and fresh.stages == []
    models.save_bundle(fresh, tmp_path / "dpt", stages=["dpt"])
    history = json.loads((tmp_path / "dpt" / "kdcache.json").read_text())
    assert history["projector_trained"] is True and history["stages"] == ["dpt"] and "kdcache_version" in history
    trained = models.load_bundle(str(tmp_path / "dpt"))
    assert trained.projector_trained is True and trained.stages == ["dpt"]


def test_a_checkpoint_without_history_is_assumed_trained(tmp_path, tiny_student_dir):
    bundle = models.load_bundle(str(tiny_student_dir))
    assert bundle.projector_trained is True and bundle.stages == ["pt", "sft"]
    bundle.model.save_pretrained(tmp_path)
    bundle.tokenizer.save_pretrained(tmp_path)
    bundle.image_processor.save_pretrained(tmp_path)
    external = models.load_bundle(str(tmp_path))
    assert external.projector_trained is True and external.stages == []


def test_load_bundle_of_a_preset_composes_tower_and_llm_with_a_fresh_projector(tmp_path, monkeypatch):
    # A full SigLIP checkpoint (text model and pooling head included) and a plain LLM without <image>.
    siglip = SiglipModel(SiglipConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2),
                                      vision_config=TINY_VISION))
    siglip.save_pretrained(tmp_path / "siglip")
    tokenizer = toy_models.build_toy_tokenizer(image_token=False)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), **TINY_TEACHER)).save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    monkeypatch.setitem(presets.PRESETS, "tiny-preset",
                        presets.hub_preset(str(tmp_path / "siglip"), str(tmp_path / "llm")))

    bundle = models.load_bundle("tiny-preset")
    assert bundle.source == "tiny-preset" and bundle.projector_trained is False
    assert bundle.model.config.image_token_id == bundle.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert bundle.model.config.vision_config.vision_use_head is False
    assert not hasattr(bundle.model.model.vision_tower, "head")
    tower = bundle.model.model.vision_tower.state_dict()
    source = {k: v for k, v in siglip.vision_model.state_dict().items() if not k.startswith("head.")}
    assert tower.keys() == source.keys() and all(torch.equal(tower[k], source[k]) for k in tower)
    assert bundle.image_processor.size == {"height": 32, "width": 32}
    with pytest.raises(KdcacheError, match="revision"):
        models.load_bundle("tiny-preset", revision="main")


def test_every_preset_resolves_to_its_loader_and_the_toy_ones_match_the_toy_models():
    for name, preset in presets.PRESETS.items():
        assert callable(presets.loader_of(preset)), name
    assert presets.loader_of(presets.PRESETS["qwen1.5-4b"]) is models.compose_preset
    assert presets.PRESETS["qwen1.5-4b"].repos == (presets.SIGLIP_SO400M, "Qwen/Qwen1.5-4B")
    toy_names = {name for name, p in presets.PRESETS.items() if p.loader == presets.TOY_LOADER}
    assert toy_names == set(toy_models.TOY_PRESETS)


def test_load_bundle_refuses_a_revision_for_any_preset():
    with pytest.raises(KdcacheError, match="--revision 'main' applies to a hub checkpoint, not to preset 'toy-"):
        models.load_bundle("toy-student", revision="main")


def test_importing_the_core_models_module_does_not_import_the_toy_world():
    code = "import sys, kdcache.models; print(sorted(m for m in sys.modules if m.startswith('kdcache.toy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_resolve_dtype_names_auto_and_refuses_unknown_names():
    assert models.resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert models.resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert models.resolve_dtype("float16", torch.device("cpu")) is torch.float16
    with pytest.raises(KdcacheError, match="unknown --dtype 'half'; choose one of auto, float32"):
        models.resolve_dtype("half", torch.device("cpu"))


def test_load_bundle_refuses_what_is_not_a_llava_checkpoint(tmp_path):
    with pytest.raises(KdcacheError, match="no config.json"):
        models.load_bundle(str(tmp_path))
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, **TINY_STUDENT)).save_pretrained(tmp_path / "llm")
    with pytest.raises(KdcacheError, match="'qwen2' checkpoint"):
        models.load_bundle(str(tmp_path / "llm"))
    with pytest.raises(KdcacheError, match="not a checkpoint directory"):
        models.load_bundle(str(tmp_path / "missing"))


def test_load_bundle_respects_dtype(tiny_student_dir):
    for spec in (str(tiny_student_dir), "toy-student"):
        model = models.load_bundle(spec, dtype=torch.bfloat16).model
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_tokenizer_fingerprint_is_stable_across_save_and_load(tmp_path, toy_tokenizer, tiny_teacher_dir,
                                                               tiny_student_dir):
    fingerprint = models.tokenizer_fingerprint(toy_tokenizer)
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert models.tokenizer_fingerprint(models.load_bundle(str(tiny_teacher_dir)).tokenizer) == fingerprint
    assert models.tokenizer_fingerprint(models.load_bundle(str(tiny_student_dir)).tokenizer) == fingerprint
    assert models.tokenizer_fingerprint(toy_models.build_toy_tokenizer()) == fingerprint


def test_tokenizer_fingerprint_differs_for_a_different_vocabulary(toy_tokenizer):
    without_image = toy_models.build_toy_tokenizer(image_token=False)
    assert models.tokenizer_fingerprint(without_image) != models.tokenizer_fingerprint(toy_tokenizer)
    extended = toy_models.build_toy_tokenizer()
    extended.add_tokens(["zebra"])
    assert models.tokenizer_fingerprint(extended) != models.tokenizer_fingerprint(toy_tokenizer)


def test_toy_tokenizer_and_fingerprint_are_the_same_in_another_process(toy_tokenizer):
    code = ("from kdcache import models; from kdcache.toy import models as toy_models; "
            "print(models.tokenizer_fingerprint(toy_models.build_toy_tokenizer()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == models.tokenizer_fingerprint(toy_tokenizer)


def test_config_hash_is_stable_across_save_and_load_and_tells_models_apart(tiny_teacher_dir, tiny_student_dir):
    teacher = models.load_bundle(str(tiny_teacher_dir)).model.config
    assert models.config_hash(teacher) == models.config_hash(LlavaConfig.from_pretrained(tiny_teacher_dir))
    assert models.config_hash(teacher) != models.config_hash(models.load_bundle(str(tiny_student_dir)).model.config)


def test_visual_len_of_counts_patches_minus_the_first_under_default():
    vision = SiglipVisionConfig(image_size=56, patch_size=14)
    assert models.visual_len_of(LlavaConfig(vision_config=vision, vision_feature_select_strategy="default")) == 15
    assert models.visual_len_of(LlavaConfig(vision_config=vision, vision_feature_select_strategy="full")) == 16
    so400m = SiglipVisionConfig(image_size=384, patch_size=14)
    assert models.visual_len_of(LlavaConfig(vision_config=so400m)) == 728


@pytest.mark.parametrize("text", [TINY_TEACHER, TINY_STUDENT], ids=["untied", "tied"])
def test_final_hidden_states_times_lm_head_equals_the_model_logits(text):
    bundle = tiny_bundle(text)
    input_ids, attention_mask, pixels = image_batch(bundle)
    with torch.no_grad():
        hidden = models.final_hidden_states(bundle.model, input_ids, attention_mask, pixels)
        logits = bundle.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels).logits
        text_only = models.final_hidden_states(bundle.model, input_ids[2:, :3], attention_mask[2:, :3], None)
    assert hidden.shape == (3, input_ids.shape[1], text["hidden_size"])
    torch.testing.assert_close(hidden @ models.lm_head_weight(bundle.model).T, logits)
    torch.testing.assert_close(text_only, hidden[2:, :3])


def test_toy_presets_share_tokenizer_tower_and_lm_shape_and_only_the_teacher_is_trained():
    teacher, student = models.load_bundle("toy-teacher"), models.load_bundle("toy-student")
    assert models.tokenizer_fingerprint(teacher.tokenizer) == models.tokenizer_fingerprint(student.tokenizer)
    assert models.visual_len_of(teacher.model.config) == models.visual_len_of(student.model.config) == 15
    towers = teacher.model.model.vision_tower.state_dict(), student.model.model.vision_tower.state_dict()
    assert all(torch.equal(towers[0][k], towers[1][k]) for k in towers[0])
    again = models.load_bundle("toy-teacher").model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in teacher.model.state_dict().items())
    # the toy teacher is stronger by its training, not its size (kdcache/toy/models.py)
    assert teacher.model.config.text_config.to_dict() == student.model.config.text_config.to_dict()
    lms = teacher.model.model.language_model.state_dict(), student.model.model.language_model.state_dict()
    assert not all(torch.equal(lms[0][k], lms[1][k]) for k in lms[0])
    assert teacher.projector_trained and not student.projector_trained and teacher.source == "toy-teacher"


def test_toy_tower_patch_embedding_reads_each_sub_block_color():
    """The toy tower's initialisation: its first 48 patch channels are the per-channel means of each patch's
    4 x 4 sub-blocks (kdcache.toy.pretrain.pretrain_tower trains the stored tower from there)."""
    tower = toy_models.toy_vision_tower()
    image = torch.zeros(1, 3, 64, 64)
    image[0, :, 20:24, 36:40] = torch.tensor([0.5, -0.25, 1.0])[:, None, None]  # patch (1, 2), sub-block (1, 1)
    with torch.no_grad():
        patches = tower.embeddings.patch_embedding(image)                             # (1, 64, 4, 4)
    pooled = patches[0, :48].reshape(3, 4, 4, 4, 4)                                 # channel, sub-row, sub-col, patch
    expected = torch.zeros_like(pooled)
    expected[:, 1, 1, 1, 2] = torch.tensor([0.5, -0.25, 1.0])
    torch.testing.assert_close(pooled, expected)
    assert patches[0, 48:].abs().sum() > 0                                           # the rest stay random


def test_toy_teacher_runs_a_built_sequence_end_to_end():
    bundle = models.load_bundle("toy-teacher")
    seq = build_sequence([{"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "red"}],
                         bundle.tokenizer, template="qwen2_base", image_token_id=bundle.model.config.image_token_id,
                         visual_len=models.visual_len_of(bundle.model.config), has_image=True, sample_id="a")
    pixels = samples.pixel_values([draw_toy_image(0, size=80)[0]], bundle.image_processor)
    assert pixels.shape == (1, 3, 64, 64)
    ids = torch.tensor([seq.input_ids])
    with torch.no_grad():
        hidden = models.final_hidden_states(bundle.model, ids, torch.ones_like(ids), pixels)
    width = bundle.model.config.text_config.hidden_size
    assert hidden.shape == (1, len(seq.input_ids), width) and torch.isfinite(hidden).all()


def test_toy_tokenizer_keeps_toy_world_words_whole(toy_tokenizer):
    assert len(toy_tokenizer) == toy_models.VOCAB_SIZE
    assert toy_tokenizer.eos_token == toy_tokenizer.pad_token == "<|endoftext|>"
    for word in (*toy_models.COLORS, *toy_models.SHAPES, *toy_models.SIZES, *toy_models.POSITIONS, *toy_models.COUNTS):
        assert len(toy_tokenizer.tokenize(" " + word)) == 1, word
    for answer in (*toy_models.COLORS, *toy_models.SHAPES, *toy_models.COUNTS):
        assert len(toy_tokenizer.tokenize(answer)) == 1, answer


def test_toy_tokenizer_words_cover_every_word_the_toy_data_draws():
    """The tokenizer's word lists are a frozen superset of the dataset's (kdcache/toy/models.py says why)."""
    vocabulary = {*toy_models.COLORS, *toy_models.SHAPES, *toy_models.SIZES, *toy_models.POSITIONS,
                  *toy_models.COUNTS}
    drawn = {*toy_data.COLORS, *toy_data.BACKGROUNDS, *toy_data.SHAPES, *toy_data.SIZES, *toy_data.POSITIONS,
             *toy_data.NUMBERS}
    assert drawn <= vocabulary, drawn - vocabulary
