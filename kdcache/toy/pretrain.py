"""Text-only "pretraining" of the toy LMs, so that the toy recipe starts where the real one does.

The paper's teacher and student start from pretrained Qwen LLMs: PT / DPT align vision to a frozen
language model that already speaks, and SFT / DFT teach the task. Randomly initialised toy LMs
cannot be aligned to (a frozen random LM ignores any projector), so the toy world gives its LMs the
same start: each Qwen2 LM is trained, alone and on text only, on the toy language:

* captions of random scenes, one per line (the text the PT stage later conditions on an image);
* dialogues in the ``qwen2_base`` layout with the scene's caption where the image goes:
  ``SYSTEM USER: <caption>\\n<question> ASSISTANT: <answer><eos> USER: ...``, so that the LM
  learns to answer questions about a scene described in its context (reading comprehension, which
  real LLMs bring), not about an image.

Scenes are drawn from their own seeded stream (``toy-lm-*``), never rendered: no image, and no
scene of the quickstart's data is needed. The result is a plain `Qwen2ForCausalLM` state dict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kdcache.templates import END_TOKEN, SYSTEM_PROMPT


@dataclass(frozen=True)
class LMPlan:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0


def text_corpus(num_scenes: int, *, seed: int = 0, image_size: int = 64) -> list[str]:
    """Two texts per random scene: its caption line and a 1-3 turn dialogue about it (see module doc)."""
    from kdcache.toy import data as toy_data

    rng = random.Random(f"toy-lm-{seed}")
    texts = []
    for _ in range(num_scenes):
        scene = toy_data._random_scene(rng, image_size)
        caption = toy_data.caption(scene)
        texts.append(caption + "\n")
        turns = toy_data._conversations(rng, scene, 5)
        parts = [SYSTEM_PROMPT + "USER: " + caption + "\n"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            question = human["value"].replace("<image>\n", "")
            parts.append(question + " ASSISTANT: " + gpt["value"] + END_TOKEN)
            parts.append("USER: ")
        texts.append("".join(parts[:-1]))
    return texts


def pretrain_lm(language_model, tokenizer, plan: LMPlan = LMPlan(), *, progress: bool = True) -> list[float]:
    """Train `language_model` (a causal LM, in place) on `text_corpus`; returns the loss per step.

    Next-token cross-entropy on every token of every text (padding excluded), AdamW, linear warmup
    then cosine decay; deterministic for a given plan on a given machine.
    """
    texts = text_corpus(plan.steps * plan.batch_size // 2 + 1, seed=plan.seed)
    rng = random.Random(f"toy-lm-order-{plan.seed}")
    rng.shuffle(texts)
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=plan.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, plan))
    language_model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        for step in tqdm(range(plan.steps), desc="pretrain LM", unit="step", disable=not progress):
            batch = texts[step * plan.batch_size: (step + 1) * plan.batch_size]
            encoded = tokenizer(batch, add_special_tokens=False, padding=True, return_tensors="pt")
            labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
            loss = language_model(**encoded, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(language_model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    language_model.eval()
    return losses


def _lr_factor(step: int, plan: LMPlan) -> float:
    import math

    if step < plan.warmup:
        return (step + 1) / plan.warmup
    progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --- the tower

PATCH_ATTRIBUTES = ("color", "shape", "size")


@dataclass(frozen=True)
class TowerPlan:
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    min_pixels: int = 12          # a patch shows an object when at least this many of its pixels do


def patch_labels(scene: dict, image_size: int, patch: int, min_pixels: int) -> list[dict | None]:
    """Per patch (row-major): the object covering most of its pixels (at least `min_pixels`), else None."""
    import numpy as np

    from kdcache.toy import data as toy_data

    side = image_size // patch
    counts = []
    for obj in scene["objects"]:
        mask = toy_data.render({"background": "black", "objects": [{**obj, "color": "red"}]}, image_size)
        pixels = np.asarray(mask)[:, :, 0] > 0
        counts.append(pixels.reshape(side, patch, side, patch).sum(axis=(1, 3)).ravel())
    labels = []
    for p in range(side * side):
        best = max(range(len(counts)), key=lambda i: counts[i][p], default=None)
        labels.append(scene["objects"][best] if best is not None and counts[best][p] >= min_pixels else None)
    return labels


def pretrain_tower(tower, image_processor, plan: TowerPlan = TowerPlan(), *, feature_layer: int = -2,
                   progress: bool = True) -> list[float]:
    """Train `tower` (in place) so that each patch token of layer `feature_layer` names what the patch shows.

    A stand-in for SigLIP's pretraining: linear heads read, from every patch token alone, the colour,
    shape and size of the object covering that patch (or "none"); the heads are thrown away.
    """
    from kdcache.toy import data as toy_data

    values = {"color": list(toy_data.COLORS), "shape": list(toy_data.SHAPES), "size": list(toy_data.SIZES)}
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(hidden, len(v) + 1) for a, v in values.items()})
    image_size, patch = tower.config.image_size, tower.config.patch_size
    rng = random.Random(f"toy-tower-{plan.seed}")
    params = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.01)
    tower.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        for _ in tqdm(range(plan.steps), desc="pretrain tower", unit="step", disable=not progress):
            scenes = [toy_data._random_scene(rng, image_size) for _ in range(plan.batch_size)]
            pixels = image_processor(images=[toy_data.render(s, image_size) for s in scenes],
                                     return_tensors="pt")["pixel_values"]
            features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
            labels = [patch_labels(s, image_size, patch, plan.min_pixels) for s in scenes]
            loss = sum(torch.nn.functional.cross_entropy(
                heads[a](features).flatten(0, 1),
                torch.tensor([len(values[a]) if o is None else values[a].index(o[a]) for ls in labels for o in ls]))
                for a in values) / len(values)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    tower.eval()
    return losses
