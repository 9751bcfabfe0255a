"""Held-out evaluation: greedy generation per question turn, exact-match accuracy per question type.

Every gpt turn of a sample is one question; its prompt is built with `templates.build_prompt` from
the earlier turns (with their reference answers) and the question, exactly as training formats it
(and as the checkpoint's chat template renders it for external evaluators; `kdcache.export`).
The question type is the gpt turn's "qtype" key when the dataset has one (the toy world does),
else "all".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kdcache import models, samples, templates
from kdcache.batches import pad_sequences
from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class Question:
    sample_id: str
    prompt: list[int]
    answer: str
    qtype: str
    image: object        # PIL image or None


def normalize(text: str) -> str:
    """Exact match ignores case, surrounding space and a final full stop."""
    return text.strip().lower().rstrip(".").strip()


def questions_of(records: list[samples.Record], images_dir: Path | None, bundle: models.Bundle,
                 template: str) -> list[Question]:
    """One Question per gpt turn (for `plain`, the first gpt turn: the caption)."""
    visual_len = models.visual_len_of(bundle.model.config)
    image_token_id = bundle.model.config.image_token_id
    out = []
    for record in records:
        image = samples.load_image(images_dir, record)[1] if record.image is not None else None
        turns = record.conversations
        for i in range(1, len(turns), 2):
            prompt = templates.build_prompt(turns[: i - 1], turns[i - 1]["value"], bundle.tokenizer,
                                            template=template, image_token_id=image_token_id,
                                            visual_len=visual_len, has_image=image is not None)
            out.append(Question(record.sample_id, prompt, turns[i]["value"], turns[i].get("qtype") or "all", image))
            if template == "plain":
                break
    return out


@torch.inference_mode()
def generate_answers(bundle: models.Bundle, questions: list[Question], *, max_new_tokens: int,
                     batch_size: int, device: torch.device, progress: bool = True) -> list[str]:
    """Greedy answers, batched with left padding; text up to the end token."""
    model = bundle.model.to(device).eval()
    tok = bundle.tokenizer
    answers = []
    for start in tqdm(range(0, len(questions), batch_size), desc="eval", unit="batch", disable=not progress):
        batch = questions[start: start + batch_size]
        input_ids, attention_mask = pad_sequences([q.prompt for q in batch], tok.pad_token_id, side="left")
        width = input_ids.shape[1]
        images = [q.image for q in batch if q.image is not None]
        pixels = samples.pixel_values(images, bundle.image_processor).to(device) if images else None
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   pixel_values=pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers += tok.batch_decode(generated[:, width:], skip_special_tokens=True)
    return answers


def correct(questions: list[Question], answers: list[str]) -> list[bool]:
    """Exact match (after `normalize`) per question, in question order."""
    return [normalize(a) == normalize(q.answer) for q, a in zip(questions, answers)]


def accuracy_report(questions: list[Question], answers: list[str]) -> dict:
    """{"accuracy", "num_questions", "per_type": {qtype: {"accuracy", "num_questions"}}}."""
    per_type: dict[str, list[bool]] = {}
    for q, hit in zip(questions, correct(questions, answers)):
        per_type.setdefault(q.qtype, []).append(hit)
    every = [hit for hits in per_type.values() for hit in hits]
    return {
        "accuracy": sum(every) / max(1, len(every)),
        "num_questions": len(every),
        "per_type": {t: {"accuracy": sum(h) / len(h), "num_questions": len(h)} for t, h in sorted(per_type.items())},
    }


def evaluate_bundle(bundle: models.Bundle, data: str | Path, images: str | Path | None, *, template: str,
                    max_samples: int | None = None, max_new_tokens: int = 8, batch_size: int = 32,
                    device: str | torch.device = "cpu", progress: bool = True, per_question: bool = False) -> dict:
    """Accuracy of `bundle` on the questions of `data` (with `per_question`, also "correct": exact match per
    question in the data's order, for paired comparisons of two models); refuses a model trained on template
    version 1 sequences, whose prompts this kdcache does not build (docs/decisions.md, template versions)."""
    if bundle.template_version not in (None, templates.TEMPLATE_VERSION):
        raise KdcacheError(f"{bundle.source} was trained on template version {bundle.template_version} sequences "
                           f"(each segment tokenised on its own); kdcache eval builds version "
                           f"{templates.TEMPLATE_VERSION} prompts, which it was not trained on: dump its caches "
                           "again and retrain it with this kdcache")
    records = samples.load_records(data)[:max_samples]
    questions = questions_of(records, Path(images) if images else None, bundle, template)
    answers = generate_answers(bundle, questions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               device=torch.device(device), progress=progress)
    report = accuracy_report(questions, answers)
    report["examples"] = [{"sample_id": q.sample_id, "answer": q.answer, "generated": a}
                          for q, a in list(zip(questions, answers))[:5]]
    if per_question:
        report["correct"] = correct(questions, answers)
    return report


def evaluate_checkpoint(spec: str, data: str, images: str | None, *, template: str = "qwen2_base",
                        max_samples: int | None = None, max_new_tokens: int = 8, device: str = "auto") -> dict:
    """`kdcache eval`: load any checkpoint (dir, preset or hub id) and evaluate it."""
    from kdcache.distributed import resolve_device, topology

    bundle = models.load_bundle(spec)
    return evaluate_bundle(bundle, data, images, template=template, max_samples=max_samples,
                           max_new_tokens=max_new_tokens, device=resolve_device(device, topology()))
