"""Text-only "pretraining" of the toy LMs, so that the toy recipe starts where the real one does.

The paper's teacher and student start from pretrained Qwen LLMs: PT / DPT align vision to a frozen
language model that already speaks and reads, and SFT / DFT teach the task. Randomly initialised toy
LMs cannot be aligned to (a frozen random LM ignores any projector), so the toy world gives its LMs
the same start: each Qwen2 LM is trained, alone and on text only, on dialogues of the toy language in
the ``qwen2_base`` layout with the scene's caption where the image goes:

    SYSTEM USER: <caption>\n<question> ASSISTANT: <answer><eos>USER: <question> ASSISTANT: ...

so that it learns to answer questions about a scene described in its context (reading comprehension,
which real LLMs bring), and, in a quarter of the dialogues, to answer "Describe the image." with the
caption (copying, which PT asks of it). What made reading emerge in a 2-layer toy LM within ~1,500
steps (docs/decisions.md, "Toy world"): a curriculum over scene sizes (`max_objects`) and the loss on
the answers only (on every token, the captions' own entropy dominates the loss and colour reading
stayed at chance, 0.11-0.17, against 0.61 with it).

Scenes are drawn from their own seeded stream (``toy-lm-*``), never rendered: no image, and no
scene of the quickstart's data is needed. The result is a plain `Qwen2ForCausalLM` state dict.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kdcache.templates import END_TOKEN


@dataclass(frozen=True)
class LMPlan:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    seed: int = 0
    turns: int = 5               # questions per dialogue
    describe: float = 0.25       # chance that a dialogue opens with "Describe the image." answered by the caption
    answers_only: bool = True    # loss on the answers only (as SFT), not on every token
    task: str = "curriculum"     # dialogues under `max_objects` | "scenes": of 1-3 objects | "binding": `binding_dialogue`
    decay: bool = True           # cosine decay over the last quarter of the steps (False: constant after warmup)
    stream: str = ""             # name of the random stream of dialogues ("" -> "toy-lm-{seed}")
    system_prompt: bool = True   # dialogues open with the template's system prompt


def max_objects(step: int, steps: int) -> int:
    """The curriculum: scenes of 1 object for the first third of the steps, up to 2 for the second, then 1-3.

    Without it the toy LMs learn the answers' priors but not to read them from the caption (colour 0.26
    after 1,200 steps against 0.83 with it; docs/decisions.md, "Toy world")."""
    return 1 + min(2, 3 * step // max(1, steps))


def dialogue(rng: random.Random, most: int, turns: int, describe: float = 0.0, image_size: int = 64):
    """One ``qwen2_base`` dialogue about a random scene of at most `most` objects, its caption where the
    image goes, rendered by `kdcache.templates.render` as the students' training text is; with chance
    `describe` it opens with the caption prompt answered by the caption itself (copying, which PT asks of
    the LM). Returns the `Rendered` text and answer spans."""
    from kdcache.templates import GPT, HUMAN
    from kdcache.toy import data as toy_data

    while True:
        scene = toy_data._random_scene(rng, image_size)
        if len(scene["objects"]) <= most:
            break
    conversation = toy_data._conversations(rng, scene, turns)
    pairs = [(HUMAN if t["from"] == "human" else GPT, t["value"].replace("<image>\n", "")) for t in conversation]
    return _captioned(rng, scene, pairs, describe)


def _captioned(rng: random.Random, scene: dict, pairs: list, describe: float):
    """`pairs` rendered in the ``qwen2_base`` layout with the scene's caption where the image goes, opened with
    chance `describe` by the caption prompt answered by the caption."""
    from kdcache.templates import GPT, HUMAN, render
    from kdcache.toy import data as toy_data

    caption = toy_data.caption(scene)
    if rng.random() < describe:
        pairs = [(HUMAN, toy_data.CAPTION_PROMPT), (GPT, caption), *pairs]
    pairs[0] = (HUMAN, caption + "\n" + pairs[0][1])
    return render(pairs, template="qwen2_base", has_image=False, eos_token=END_TOKEN)


BINDING_TYPES = ("color", "shape", "size")     # the attribute questions: each names an object by other attributes


def binding_scene(rng: random.Random, image_size: int = 64) -> dict:
    """A toy scene of 2-3 objects (one-object scenes need no binding), redrawn until it has them."""
    from kdcache.toy import data as toy_data

    scene = toy_data._random_scene(rng, image_size)
    while len(scene["objects"]) < 2:
        scene = toy_data._random_scene(rng, image_size)
    return scene


def binding_question(rng: random.Random, scene: dict) -> tuple[str, str, str]:
    """(question, answer, qtype): a colour / shape / size question about one object of `scene`, picked by its
    other attributes, with a unique answer (types redrawn until one has)."""
    from kdcache.toy import data as toy_data

    while True:
        qtype = rng.choice(BINDING_TYPES)
        qa = toy_data._ask(rng, scene, qtype)
        if qa:
            return qa[0], qa[1], qtype


def binding_dialogue(rng: random.Random, turns: int, describe: float = 0.0, image_size: int = 64):
    """A ``qwen2_base`` dialogue of `turns` `binding_question`s about a `binding_scene` (binding, which the
    curriculum of `dialogue` alone did not teach the toy teacher's LM; docs/decisions.md, "Visual binding"),
    the caption where the image goes."""
    from kdcache.templates import GPT, HUMAN

    scene = binding_scene(rng, image_size)
    pairs = []
    for _ in range(turns):
        question, answer, _ = binding_question(rng, scene)
        pairs += [(HUMAN, question), (GPT, answer)]
    return _captioned(rng, scene, pairs, describe)


def _batch(rng: random.Random, plan: LMPlan, step: int) -> list:
    """The step's dialogues under `plan.task`, with or without the system prompt."""
    if plan.task == "binding":
        batch = [binding_dialogue(rng, plan.turns, plan.describe) for _ in range(plan.batch_size)]
    else:
        most = max_objects(step, plan.steps) if plan.task == "curriculum" else 3
        batch = [dialogue(rng, most, plan.turns, plan.describe) for _ in range(plan.batch_size)]
    return batch if plan.system_prompt else [without_system_prompt(r) for r in batch]


def without_system_prompt(rendered):
    """`rendered` with the leading system prompt cut off, its answer spans moved with the text (also
    benchmarks/bench_binding.py)."""
    from kdcache.templates import SYSTEM_PROMPT, Rendered

    n = len(SYSTEM_PROMPT)
    assert rendered.text.startswith(SYSTEM_PROMPT)
    return Rendered(rendered.text[n:], [(start - n, end - n) for start, end in rendered.answers])


def _labels(tokenizer, rendered: list, answers_only: bool) -> dict:
    """The batch's encoding with `labels`: every real token, or only those inside an answer span."""
    encoded = tokenizer([r.text for r in rendered], add_special_tokens=False, padding=True, return_tensors="pt",
                        return_offsets_mapping=answers_only)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    if answers_only:
        offsets = encoded.pop("offset_mapping")
        keep = torch.zeros_like(labels, dtype=torch.bool)
        for row, r in enumerate(rendered):
            for start, end in r.answers:
                keep[row] |= (offsets[row, :, 0] >= start) & (offsets[row, :, 1] <= end) & (offsets[row, :, 1] > 0)
        labels = labels.masked_fill(~keep, -100)
    encoded["labels"] = labels
    return encoded


def pretrain_lm(language_model, tokenizer, plan: LMPlan = LMPlan(), *, progress: bool = True) -> list[float]:
    """Train `language_model` (a causal LM, in place) on toy dialogues (`plan.task`: `dialogue` under the
    `max_objects` curriculum, or of 1-3 objects, or `binding_dialogue`); returns the loss per step.

    Next-token cross-entropy on the answers (`plan.answers_only`) or on every token (padding excluded),
    AdamW, `_lr_factor`'s schedule; deterministic for a given plan, machine and thread count.
    """
    if plan.task not in ("curriculum", "scenes", "binding"):
        raise ValueError(f"LMPlan.task must be curriculum, scenes or binding, not {plan.task!r}")
    rng = random.Random(plan.stream or f"toy-lm-{plan.seed}")
    optimizer = torch.optim.AdamW(language_model.parameters(), lr=plan.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, plan))
    language_model.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)
        for step in tqdm(range(plan.steps), desc="pretrain LM", unit="step", disable=not progress):
            losses.append(train_step(language_model, tokenizer, _batch(rng, plan, step), optimizer, schedule,
                                     answers_only=plan.answers_only))
    language_model.eval()
    return losses


def train_step(language_model, tokenizer, batch: list, optimizer, schedule, *, answers_only: bool = True) -> float:
    """One optimizer step of next-token cross-entropy on `batch` (rendered dialogues, labelled by `_labels`),
    gradient norm clipped at 1, then the schedule's step; returns the loss."""
    loss = language_model(**_labels(tokenizer, batch, answers_only)).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(language_model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _lr_factor(step: int, plan: LMPlan) -> float:
    """Linear warmup, constant, then a cosine decay over the last quarter of the steps (reading emerges late,
    in the last third of the curriculum: a decay over all steps starved it, colour 0.17 at 1,500 steps); without
    `plan.decay`, constant after the warmup."""
    import math

    if step < plan.warmup:
        return (step + 1) / plan.warmup
    start = 3 * plan.steps // 4
    if step < start or not plan.decay:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - start) / max(1, plan.steps - start))))


# --- the tower

PATCH_ATTRIBUTES = ("color", "shape", "size", "position")     # of the object covering the patch, or none


@dataclass(frozen=True)
class TowerPlan:
    steps: int = 3000
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


def centre_patches(scene: dict, image_size: int, patch: int) -> list[bool]:
    """Per patch (row-major): whether the centre of one of the scene's objects lies in it."""
    side = image_size // patch
    centres = {(min(obj["y"] // patch, side - 1), min(obj["x"] // patch, side - 1)) for obj in scene["objects"]}
    return [(row, col) in centres for row in range(side) for col in range(side)]


def pretrain_tower(tower, image_processor, plan: TowerPlan = TowerPlan(), *, feature_layer: int = -2,
                   progress: bool = True) -> list[float]:
    """Train `tower` (in place) so that each patch token of layer `feature_layer` names what the patch shows.

    A stand-in for SigLIP's pretraining: linear heads read, from every patch token alone, the colour,
    shape, size and column of the object covering that patch (or "none"), and whether an object's centre
    lies in the patch (objects, not only their pixels: with the first four heads alone the toy teacher
    counted and placed objects at 0.60 / 0.41 after SFT); the heads are thrown away.
    """
    from kdcache.toy import data as toy_data

    values = {"color": list(toy_data.COLORS), "shape": list(toy_data.SHAPES), "size": list(toy_data.SIZES),
              "position": list(toy_data.POSITIONS)}
    image_size, patch = tower.config.image_size, tower.config.patch_size
    rng = random.Random(f"toy-tower-{plan.seed}")
    tower.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(plan.seed)          # the heads' initialisation too (unseeded, two builds differed by 0.4)
        heads = torch.nn.ModuleDict({a: torch.nn.Linear(tower.config.hidden_size, len(v) + 1)
                                     for a, v in {**values, "centre": [True]}.items()})
        params = [*tower.parameters(), *heads.parameters()]
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.01)
        for _ in tqdm(range(plan.steps), desc="pretrain tower", unit="step", disable=not progress):
            scenes = [toy_data._random_scene(rng, image_size) for _ in range(plan.batch_size)]
            pixels = image_processor(images=[toy_data.render(s, image_size) for s in scenes],
                                     return_tensors="pt")["pixel_values"]
            features = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
            labels = [patch_labels(s, image_size, patch, plan.min_pixels) for s in scenes]
            targets = {a: [len(v) if o is None else v.index(o[a]) for ls in labels for o in ls] for a, v in values.items()}
            targets["centre"] = [int(c) for s in scenes for c in centre_patches(s, image_size, patch)]
            loss = sum(torch.nn.functional.cross_entropy(heads[a](features).flatten(0, 1), torch.tensor(t))
                       for a, t in targets.items()) / len(targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    tower.eval()
    return losses
