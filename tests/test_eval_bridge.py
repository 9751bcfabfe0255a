"""The evaluation bridge (issue 14 part 2): chat templates that give the training ids, template versions,
and `kdcache eval --export lmms-eval`.

The chat templates are applied by the real transformers classes (the tokenizer, and the LlavaProcessor
loaded from a saved checkpoint, which expands the image placeholder itself) to HF-format messages as
lmms-eval and VLMEvalKit build them, and compared id for id with `templates.build_sequence` /
`build_prompt`. Version 1 caches are made by the dump with the version 1 builder of tests/template_v1.py.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml
from transformers import AutoProcessor, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from typer.testing import CliRunner

from conftest import TINY_VISION, TINY_VISUAL_LEN, TRAINED, draw_toy_image, write_toy_dataset
from kdcache import export, models, samples, templates
from kdcache.cli import app
from kdcache.errors import KdcacheError
from kdcache.evaluate import evaluate_bundle
from kdcache.reader import CacheReader
from kdcache.toy import models as toy_models
from local_tokenizers import qwen_style_tokenizer
from student_train.config import TrainConfig
from student_train.train import train
from teacher_dump.config import DumpConfig
from teacher_dump.dump import dump
from template_v1 import v1_build_sequence

CONVERSATIONS = {
    "one turn": [("human", "<image>\nWhat color is the star?"), ("gpt", "red")],
    "three turns": [("human", "What color is the star?\n<image>"), ("gpt", "The star is red."),
                    ("human", "How many circles are there?"), ("gpt", "3"), ("human", "Is it small?"), ("gpt", "yes")],
    "image in the second question": [("human", "Describe it."), ("gpt", "A small blue square."),
                                     ("human", "<image>\nWhich object is in the middle?"), ("gpt", " two  spaces ")],
    "text only": [("human", "How many sides has a square?"), ("gpt", "four"), ("human", "And a triangle?"),
                  ("gpt", "three")],
}


def llava(conversation) -> list[dict]:
    return [{"from": role, "value": text} for role, text in conversation]


def has_image(conversation) -> bool:
    return any(templates.IMAGE_TOKEN in text for _, text in conversation)


def hf_messages(conversation, *, parts: bool, image=None) -> list[dict]:
    """The conversation as HF chat messages. `parts`: content parts, where the message whose text held the
    placeholder gets an image part and the text without it (as lmms-eval builds them: image, then question);
    else string content, placeholder kept."""
    messages = []
    for role, text in conversation:
        role = "user" if role == "human" else "assistant"
        if not parts:
            messages.append({"role": role, "content": text})
            continue
        if templates.IMAGE_TOKEN in text:
            content = [{"type": "image", **({"image": image} if image is not None else {})},
                       {"type": "text", "text": text.replace(templates.IMAGE_TOKEN, "").strip()}]
        else:
            content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
    return messages


def sequence(tokenizer, conversation, template, visual_len=TINY_VISUAL_LEN):
    return templates.build_sequence(llava(conversation), tokenizer, template=template,
                                    image_token_id=tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN),
                                    visual_len=visual_len, has_image=has_image(conversation), sample_id="s")


def prompt(tokenizer, conversation, k, template, visual_len=TINY_VISUAL_LEN):
    """build_prompt of answer k."""
    turns = llava(conversation)
    return templates.build_prompt(turns[: 2 * k], turns[2 * k]["value"], tokenizer, template=template,
                                  image_token_id=tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN),
                                  visual_len=visual_len, has_image=has_image(conversation))


def expand(ids, tokenizer, values=None, visual_len=TINY_VISUAL_LEN) -> list[int]:
    """`values` (default: `ids` themselves) per token, the image token's repeated visual_len times."""
    image = tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN)
    return [v for i, value in zip(ids, values or ids) for v in [value] * (visual_len if i == image else 1)]


# --- the chat template, applied by the tokenizer


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("parts", [True, False], ids=["content parts", "string content"])
@pytest.mark.parametrize("template", ["qwen2_base", "plain"])
def test_the_tokenizer_chat_template_gives_the_training_ids_and_prompts(tokenizer, name, parts, template):
    conversation = CONVERSATIONS[name]
    if template == "plain" and not has_image(conversation):
        pytest.skip("plain trains on captions of images")
    seq = sequence(tokenizer, conversation, template)
    messages = hf_messages(conversation, parts=parts)
    chat = tokenizer.apply_chat_template(messages, chat_template=templates.chat_template(template),
                                         tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert expand(chat["input_ids"], tokenizer) == seq.input_ids             # one string, one tokenisation
    masked = [t for t, m in enumerate(expand(chat["input_ids"], tokenizer, chat["assistant_masks"])) if m]
    assert masked == [t + 1 for t in seq.response_rows]                      # {% generation %} = the supervision
    for k in range(len(conversation) // 2 if template == "qwen2_base" else 1):
        if has_image(conversation) != has_image(conversation[: 2 * k + 1]):
            continue                       # the messages so far lack the sample's image: a prompt for another sample
        text = tokenizer.apply_chat_template(messages[: 2 * k + 1], chat_template=templates.chat_template(template),
                                             tokenize=False, add_generation_prompt=True)
        ids = expand(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer)
        assert ids == prompt(tokenizer, conversation, k, template) == seq.input_ids[: len(ids)]


def test_the_rendered_text_is_templates_render(toy_tokenizer):
    conversation = CONVERSATIONS["three turns"]
    turns = templates._checked_turns(llava(conversation), "s", True, complete=True)
    for template in ("qwen2_base", "plain"):
        expected = templates.render(turns, template=template, has_image=True, eos_token=toy_tokenizer.eos_token).text
        for parts in (True, False):
            assert toy_tokenizer.apply_chat_template(hf_messages(conversation, parts=parts), tokenize=False,
                                                     chat_template=templates.chat_template(template)) == expected


def test_the_qwen2_base_chat_template_refuses_a_system_message_and_roles_out_of_turn(toy_tokenizer):
    template = templates.chat_template("qwen2_base")
    for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]):
        with pytest.raises(Exception, match="must alternate user/assistant, starting with user"):
            toy_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)


# --- saved checkpoints: tokenizer and LlavaProcessor carry it


def saved_qwen_style_student(directory) -> None:
    """A tiny LLaVA student composed as the hub presets are, from the Qwen-style tokenizer without <image>."""
    tokenizer = qwen_style_tokenizer(image_token=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        bundle = models.compose(toy_models.toy_vision_tower(**TINY_VISION), lm, tokenizer,
                                models.siglip_image_processor(TINY_VISION["image_size"]), source="qwen-style")
    models.save_bundle(bundle, directory, stages=TRAINED)


@pytest.fixture(scope="module")
def qwen_student_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen-student")
    saved_qwen_style_student(directory)
    return directory


@pytest.fixture(params=["toy", "qwen"])
def checkpoint(request, tiny_student_dir, qwen_student_dir):
    return tiny_student_dir if request.param == "toy" else qwen_student_dir


@pytest.mark.parametrize("name", ["one turn", "three turns", "image in the second question"])
def test_the_saved_processor_renders_and_expands_to_the_training_ids(checkpoint, name):
    processor = AutoProcessor.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert processor.chat_template == tokenizer.chat_template == templates.chat_template("qwen2_base")
    conversation = CONVERSATIONS[name]
    image = draw_toy_image(1, 32)[0]
    seq = sequence(tokenizer, conversation, "qwen2_base")
    messages = hf_messages(conversation, parts=True, image=image)
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["input_ids"][0].tolist() == seq.input_ids                 # the processor expanded <image> itself
    assert torch.equal(out["pixel_values"], samples.pixel_values([image], processor.image_processor))
    for k in range(len(conversation) // 2):
        if not has_image(conversation[: 2 * k + 1]):
            continue                       # the messages so far lack the sample's image: a prompt for another sample
        gen = processor.apply_chat_template(messages[: 2 * k + 1], tokenize=True, return_dict=True,
                                            add_generation_prompt=True, return_tensors="pt")
        assert gen["input_ids"][0].tolist() == prompt(tokenizer, conversation, k, "qwen2_base")


def test_a_plain_trained_checkpoint_carries_the_plain_template(tiny_student_dir, tmp_path):
    bundle = models.load_bundle(str(tiny_student_dir))
    models.note_stage_template(bundle, "plain", templates.TEMPLATE_VERSION, source="dataset d")
    models.save_bundle(bundle, tmp_path / "pt", stages=["pt"])
    processor = AutoProcessor.from_pretrained(tmp_path / "pt")
    image = draw_toy_image(2, 32)[0]
    conversation = [("human", "<image>\nDescribe the image briefly."), ("gpt", "A green square.")]
    out = processor.apply_chat_template(hf_messages(conversation, parts=True, image=image), tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert out["input_ids"][0].tolist() == sequence(processor.tokenizer, conversation, "plain").input_ids
    assert json.loads((tmp_path / "pt" / "kdcache.json").read_text())["template"] == "plain"


# --- training records the template; version 1 caches stay trainable and are not mixed


def run_dump(teacher, data, images, out, **overrides) -> dict:
    return dump(DumpConfig(teacher=str(teacher), data=str(data), images=str(images), out=str(out), device="cpu",
                           dtype="float32", progress=False, batch_size=2, topk_response=8, topk_visual=8,
                           **overrides))


def run_train(student, out, stage, **overrides):
    return train(TrainConfig(stage=stage, student=str(student), out=str(out), device="cpu", num_workers=0,
                             progress=False, batch_size=2, global_batch=2, max_steps=1, **overrides))


@pytest.fixture(scope="module")
def caches(tiny_teacher_dir, tmp_path_factory):
    """{"v2": a cache dumped now, "v1": the same data dumped with the version 1 builder and an old manifest}."""
    root = tmp_path_factory.mktemp("caches")
    data, images = write_toy_dataset(root, count=4, text_only=1)
    run_dump(tiny_teacher_dir, data, images, root / "v2")
    patch = pytest.MonkeyPatch()
    patch.setattr("teacher_dump.dump.templates.build_sequence", v1_build_sequence)
    run_dump(tiny_teacher_dir, data, images, root / "v1")
    patch.undo()
    manifest = json.loads((root / "v1" / "manifest.json").read_text())
    del manifest["template_version"]                     # what kdcache wrote before template versions
    (root / "v1" / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return {"v1": root / "v1", "v2": root / "v2", "data": data, "images": images}


def test_the_dump_records_the_template_version_and_a_version_1_cache_keeps_its_ids(caches, tiny_teacher_dir):
    assert json.loads((caches["v2"] / "manifest.json").read_text())["template_version"] == 2
    v1, v2 = CacheReader(caches["v1"], verify=True, for_training=True), CacheReader(caches["v2"])
    assert templates.cache_template_version(v1.manifest) == 1
    tokenizer = models.load_bundle(str(tiny_teacher_dir)).tokenizer
    records = {r["id"]: r for r in json.loads(caches["data"].read_text())}
    differ = 0
    for i in range(len(v1)):
        row, new = v1.read_sample(i), v2.read_sample(i)
        record = records[row["sample_id"]]
        old = v1_build_sequence(record["conversations"], tokenizer, template="qwen2_base",
                                image_token_id=tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN),
                                visual_len=TINY_VISUAL_LEN, has_image="image" in record, sample_id=record["id"])
        assert row["input_ids"].tolist() == old.input_ids and row["response_rows"].tolist() == old.response_rows
        differ += row["input_ids"].tolist() != new["input_ids"].tolist()
    assert differ == len(v1)                              # every qwen2_base answer starts differently


def test_a_version_1_cache_trains_and_its_student_is_pinned_to_version_1(caches, tiny_student_dir, tmp_path):
    final = run_train(tiny_student_dir, tmp_path / "dft", "dft", cache=str(caches["v1"]))
    history = json.loads((final / "kdcache.json").read_text())
    assert (history["template"], history["template_version"]) == ("qwen2_base", 1)
    assert AutoTokenizer.from_pretrained(final).chat_template is None    # none reproduces version 1 ids
    assert not (final / "chat_template.jinja").exists()
    with pytest.raises(KdcacheError, match="trained on template version 1 .* holds version 2 sequences; a model "
                                           "must not mix them"):
        run_train(final, tmp_path / "dft-again", "dft", cache=str(caches["v2"]))
    with pytest.raises(KdcacheError, match="trained on template version 1 .* dataset .* holds version 2"):
        run_train(final, tmp_path / "sft", "sft", data=str(caches["data"]), images=str(caches["images"]))
    with pytest.raises(KdcacheError, match="template version 1 sequences .* kdcache eval builds version 2 prompts"):
        evaluate_bundle(models.load_bundle(str(final)), caches["data"], caches["images"], template="qwen2_base",
                        progress=False)
    with pytest.raises(KdcacheError, match="trained on template version 1 sequences, which no chat template"):
        export.export("lmms-eval", str(final), str(tmp_path / "ev"))


def test_a_version_2_student_refuses_a_version_1_cache_and_carries_the_qwen2_base_template(caches, tiny_student_dir,
                                                                                           tmp_path):
    final = run_train(tiny_student_dir, tmp_path / "sft", "sft", data=str(caches["data"]), images=str(caches["images"]))
    history = json.loads((final / "kdcache.json").read_text())
    assert (history["template"], history["template_version"]) == ("qwen2_base", 2)
    assert AutoTokenizer.from_pretrained(final).chat_template == templates.chat_template("qwen2_base")
    with pytest.raises(KdcacheError, match="version 2 sequences .* cache .* holds version 1 sequences.*dump the cache "
                                           "again with this kdcache"):
        run_train(final, tmp_path / "dft", "dft", cache=str(caches["v1"]))
    assert run_train(final, tmp_path / "dft2", "dft", cache=str(caches["v2"])) is not None


def test_the_dump_refuses_a_teacher_trained_on_version_1_sequences(tiny_teacher_dir, tmp_path):
    teacher = models.load_bundle(str(tiny_teacher_dir))
    teacher.template, teacher.template_version = "qwen2_base", 1
    models.save_bundle(teacher, tmp_path / "old-teacher", stages=TRAINED)
    data, images = write_toy_dataset(tmp_path, count=2)
    with pytest.raises(KdcacheError, match="teacher .* trained on template version 1 .* this dump \\(qwen2_base\\) "
                                           "holds version 2 .* train the teacher's sft stage again"):
        run_dump(tmp_path / "old-teacher", data, images, tmp_path / "cache")
    captions, images = write_toy_dataset(tmp_path, count=2, template="plain")
    assert run_dump(tmp_path / "old-teacher", captions, images, tmp_path / "captions", template="plain")[
        "template_version"] == 2


# --- kdcache eval --export lmms-eval


def test_export_writes_an_lmms_eval_config_and_script_for_the_papers_benchmarks(tiny_student_dir, tmp_path):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_student_dir), "--export", "lmms-eval",
                                      "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((tmp_path / "ev" / "lmms_eval.yaml").read_text())
    assert config == [{"model": "llava_hf", "model_args": f"pretrained={tiny_student_dir.resolve()},dtype=bfloat16",
                       "tasks": "vqav2_test,gqa,vizwiz_vqa_test,scienceqa_img,textvqa_val,mme,mmbench_en_dev,"
                                "mmbench_cn_dev,pope,mmmu_val",
                       "batch_size": 1, "log_samples": True, "output_path": str((tmp_path / "ev" / "results"))}]
    script = tmp_path / "ev" / "run_lmms_eval.sh"
    assert script.stat().st_mode & 0o111
    assert 'accelerate launch --num_processes "${NUM_PROCESSES:-1}" -m lmms_eval --config lmms_eval.yaml "$@"' in \
        script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)                 # the script parses
    assert "OPENAI_API_KEY" in script.read_text() and "EvalAI" in script.read_text()


def test_export_takes_tasks_and_refuses_what_would_not_evaluate_as_trained(tiny_student_dir, tmp_path):
    files = export.export("lmms-eval", str(tiny_student_dir), str(tmp_path / "ev"), tasks="gqa, pope")
    assert yaml.safe_load(files[0].read_text())[0]["tasks"] == "gqa,pope"
    with pytest.raises(KdcacheError, match="--tasks must be comma-separated lmms-eval task names"):
        export.export("lmms-eval", str(tiny_student_dir), str(tmp_path / "ev"), tasks="gqa;rm -rf")
    with pytest.raises(KdcacheError, match="not a checkpoint directory"):
        export.export("lmms-eval", "toy-student", str(tmp_path / "ev"))
    bundle = models.load_bundle(str(tiny_student_dir))
    bundle.template = "plain"
    models.save_bundle(bundle, tmp_path / "pt", stages=["pt"])
    with pytest.raises(KdcacheError, match="plain template of a pt/dpt stage"):
        export.export("lmms-eval", str(tmp_path / "pt"), str(tmp_path / "ev"))
    (tmp_path / "pt" / "chat_template.jinja").write_text("{{ messages }}")
    with pytest.raises(KdcacheError, match="not kdcache's qwen2_base one"):
        export.export("lmms-eval", str(tmp_path / "pt"), str(tmp_path / "ev"))
    models.save_bundle(models.load_bundle(str(tiny_student_dir)), tmp_path / "a,b", stages=TRAINED)
    with pytest.raises(KdcacheError, match="may not hold ',', '=' or spaces"):
        export.export("lmms-eval", str(tmp_path / "a,b"), str(tmp_path / "ev"))


@pytest.mark.parametrize("args, message", [
    (["--export", "lmms-eval", "--data", "d.json"], "--data: --export writes an evaluator's run"),
    (["--tasks", "gqa", "--data", "d.json"], "--out and --tasks go with --export"),
    ([], "missing --data (or --export)"),
    (["--export", "vlmevalkit"], "unknown export 'vlmevalkit'; choose one of lmms-eval"),
])
def test_eval_flags_that_do_not_go_together_are_refused(args, message, tiny_student_dir):
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_student_dir), *args])
    assert result.exit_code in (1, 2) and message in result.output


def test_kdcache_eval_of_a_version_2_student_builds_prompts_that_generate(tiny_student_dir, toy_dataset):
    data, images = toy_dataset(count=2)
    report = evaluate_bundle(models.load_bundle(str(tiny_student_dir)), data, images, template="qwen2_base",
                             max_new_tokens=2, progress=False)
    assert report["num_questions"] == 4 and all(isinstance(e["generated"], str) for e in report["examples"])
