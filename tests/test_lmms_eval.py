"""lmms-eval 0.7.3 on a kdcache student (optional: `pip install 'kdcache[eval]'`; skipped without lmms-eval).

A toy student trained by `kdcache train` is loaded through lmms-eval's own ``llava_hf`` model class, the
one ``--model llava_hf`` resolves to, on the CPU, and its requests run through lmms-eval's code: the
prompt it feeds ``generate`` must be `templates.build_prompt`'s ids and its answer the one kdcache's own
greedy evaluation gives. The exported task names must be lmms-eval tasks.

Not tested: lmms-eval's loglikelihood path. In 0.7.3 it calls the processor on the prompt text without the
images, which transformers 5 refuses ("Found 1 <image> tokens in the text but no images were passed"),
whatever the chat template; the paper's benchmarks are all generate_until tasks.
"""

from __future__ import annotations

import pytest
import torch

from conftest import draw_toy_image, write_toy_dataset
from kdcache import export, models, templates
from kdcache.evaluate import Question, generate_answers
from student_train.config import TrainConfig
from student_train.train import train

pytest.importorskip("lmms_eval")
llava_hf = pytest.importorskip("lmms_eval.models.chat.llava_hf")
from lmms_eval.api.instance import Instance  # noqa: E402  (after the skip: lmms-eval is optional)
from lmms_eval.models import get_model  # noqa: E402

CONVERSATION = [("human", "What color is the shape?"), ("gpt", "red"), ("human", "What shape is it?")]


@pytest.fixture(scope="module")
def student(tiny_student_dir, tmp_path_factory):
    """A toy student after `kdcache train --stage sft` (two steps) from a LLaVA JSON: RUN/final."""
    root = tmp_path_factory.mktemp("lmms")
    data, images = write_toy_dataset(root, count=4)
    return train(TrainConfig(stage="sft", student=str(tiny_student_dir), data=str(data), images=str(images),
                             out=str(root / "run"), device="cpu", num_workers=0, progress=False, batch_size=2,
                             global_batch=2, max_steps=2))


@pytest.fixture(scope="module")
def lmms(student):
    cls = get_model("llava_hf")
    assert cls is llava_hf.LlavaHf                       # what `lmms_eval --model llava_hf` runs
    return cls(pretrained=str(student), device="cpu", device_map="cpu")


def request(lm, kind: str, arguments: tuple, doc: dict) -> Instance:
    lm.task_dict = {"toy": {"test": [doc]}}
    return Instance(request_type=kind, arguments=arguments, idx=0, metadata={"task": "toy", "doc_id": 0, "repeats": 1})


def recording(monkeypatch, module, method: str) -> list[dict]:
    """Record the keyword arguments of every call of `module.method`, then run it."""
    calls, original = [], getattr(module, method)

    def record(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, method, record)
    return calls


@pytest.mark.parametrize("k", [0, 1], ids=["first answer", "second answer"])
def test_llava_hf_prompts_the_student_with_its_training_prompt_and_answers_as_kdcache_does(lmms, student, k,
                                                                                           monkeypatch):
    assert lmms.tokenizer.chat_template == templates.chat_template("qwen2_base")   # not lmms-eval's Vicuna default
    image = draw_toy_image(0, 32)[0]
    turns = CONVERSATION[: 2 * k + 1]
    messages = [{"role": "user" if role == "human" else "assistant", "content": [{"type": "text", "text": text}]}
                for role, text in turns]
    messages[0]["content"].insert(0, {"type": "image", "url": image})       # as lmms-eval builds a user turn
    calls = recording(monkeypatch, lmms._model, "generate")
    [result] = lmms.generate_until([request(lmms, "generate_until", (
        "ctx", lambda doc: doc["messages"], {"max_new_tokens": 4}, 0, "toy", "test"), {"messages": messages})])

    bundle = models.load_bundle(str(student))
    llava = [{"from": role, "value": ("<image>\n" if i == 0 else "") + text} for i, (role, text) in enumerate(turns)]
    expected = templates.build_prompt(llava[:-1], llava[-1]["value"], bundle.tokenizer, template="qwen2_base",
                                      image_token_id=bundle.model.config.image_token_id,
                                      visual_len=models.visual_len_of(bundle.model.config), has_image=True)
    assert calls[0]["input_ids"][0].tolist() == expected
    ours = generate_answers(bundle, [Question("s", expected, "", "all", image)], max_new_tokens=4, batch_size=1,
                            device=torch.device("cpu"), progress=False)
    assert result.text == ours[0]


def test_the_exported_tasks_are_lmms_eval_tasks():
    pytest.importorskip("tenacity")              # lmms_eval.tasks needs more of lmms-eval's dependencies
    pytest.importorskip("sacrebleu")
    from lmms_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    assert [t for t in export.PAPER_TASKS.values() if t not in known] == []
