"""The toy world's data: a synthetic shapes dataset in LLaVA JSON, for `kdcache quickstart` on a CPU.

Each image shows 1-3 shapes (circle, square, triangle) in distinct columns (left, middle, right)
on a plain white or black background. `generate` writes

    OUT/images/{train,eval}-NNNNNN.png
    OUT/captions.json   plain stage: "<image>\\nDescribe the image." -> systematic caption
    OUT/train.json      qwen2_base stage: 1-3 question/answer turns per train image
    OUT/eval.json       the same on held-out images (no image bytes shared with train)
    OUT/teacher.json    train.json and captions.json together: the toy teacher's SFT data

Every sample is ordinary LLaVA JSON (`id`, `image`, `conversations`) plus two extra keys that
loaders ignore: top-level `scene` (background and per-object shape, color, size, position, x, y,
r) and `qtype` on every gpt turn (one of `question_types()`, or "caption"). Answers are lowercase
words from a closed set, so exact match is a meaningful accuracy.
"""

import itertools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from kdcache.errors import SampleError

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 230),
          "yellow": (245, 215, 20), "purple": (150, 50, 200), "orange": (250, 140, 10)}
SIZES = {"small": 0.075, "large": 0.14}  # radius as a fraction of image_size (5 / 9 px at 64)
POSITIONS = ("left", "middle", "right")  # one column each, so positions never overlap
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
NUMBERS = ("zero", "one", "two", "three")
CAPTION_PROMPT = "Describe the image."
_QTYPES = ("color", "shape", "size", "count", "position")
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}


def question_types() -> list[str]:
    """The question types tagged in `qtype` on gpt turns of train/eval samples, in a fixed order."""
    return list(_QTYPES)


# --- scenes


def _random_scene(rng: random.Random, image_size: int) -> dict:
    """A scene dict: background name and 1-3 objects sorted left to right, pixel geometry included."""
    columns = sorted(rng.sample(range(3), rng.randint(1, 3)))
    objects = []
    for col in columns:
        size = rng.choice(list(SIZES))
        r = round(SIZES[size] * image_size)
        half = image_size / 6
        jitter = max(0, int(half - r - 1))  # large shapes fill their column; small ones wander
        x = round((col + 0.5) * image_size / 3) + rng.randint(-jitter, jitter)
        y = rng.randint(r + 2, image_size - r - 3)
        objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
                        "size": size, "position": POSITIONS[col], "x": x, "y": y, "r": r})
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": objects}


def render(scene: dict, image_size: int) -> Image.Image:
    """Draw `scene` as an RGB image_size x image_size image (no anti-aliasing: exact, deterministic)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        x, y, r, fill = obj["x"], obj["y"], obj["r"], COLORS[obj["color"]]
        box = (x - r, y - r, x + r, y + r)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=fill)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def caption(scene: dict) -> str:
    """'a large red circle on the left, a small blue square in the middle and ... on the right.'"""
    parts = [f"a {o['size']} {o['color']} {o['shape']} "
             + ("in the middle" if o["position"] == "middle" else f"on the {o['position']}")
             for o in scene["objects"]]
    text = parts[-1] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


# --- questions


def _references(objects: list[dict], index: int, exclude: set[str]) -> list[str]:
    """Noun phrases that pick out objects[index] alone, using no attribute in `exclude`.

    Uses any of size / color / shape / position, e.g. "the circle", "the red object",
    "the large square", "the object on the left"; "the object" when it is the only one.
    """
    target = objects[index]
    attrs = [a for a in ("size", "color", "shape", "position") if a not in exclude]
    phrases = []
    for n in range(len(attrs) + 1):
        for combo in itertools.combinations(attrs, n):
            matches = [o for o in objects if all(o[a] == target[a] for a in combo)]
            if len(matches) != 1:
                continue
            words = [target[a] for a in ("size", "color") if a in combo]
            noun = target["shape"] if "shape" in combo else "object"
            phrase = " ".join(["the", *words, noun])
            if "position" in combo:
                phrase += " in the middle" if target["position"] == "middle" else \
                    f" on the {target['position']}"
            phrases.append(phrase)
    return phrases


def _attribute_question(rng: random.Random, objects: list[dict], qtype: str):
    """A (question, answer) about one object's color / shape / size, or None if no unique reference."""
    choices = [(i, ref) for i in range(len(objects)) for ref in _references(objects, i, {qtype})]
    if not choices:
        return None
    i, ref = rng.choice(choices)
    if qtype == "size" and rng.random() < 0.5:
        return f"Is {ref} small or large?", objects[i]["size"]
    return f"What {qtype} is {ref}?", objects[i][qtype]


def _count_question(rng: random.Random, objects: list[dict]):
    """How many shapes / circles / red shapes are there? Answers 'zero'..'three'."""
    kind = rng.choice(("all", "shape", "color"))
    if kind == "all":
        return "How many shapes are there?", NUMBERS[len(objects)]
    if kind == "shape":
        shape = rng.choice(SHAPES)
        n = sum(o["shape"] == shape for o in objects)
        return f"How many {_PLURAL[shape]} are there?", NUMBERS[n]
    color = rng.choice([o["color"] for o in objects] + [rng.choice(list(COLORS))])
    n = sum(o["color"] == color for o in objects)
    return f"How many {color} shapes are there?", NUMBERS[n]


def _position_question(rng: random.Random, objects: list[dict]):
    """'Where is X?' -> left/middle/right, or 'Is X left or right of Y?' -> left/right."""
    if len(objects) >= 2 and rng.random() < 0.7:
        i, j = rng.sample(range(len(objects)), 2)
        refs_i = _references(objects, i, {"position"})
        refs_j = _references(objects, j, {"position"})
        if refs_i and refs_j:
            answer = "left" if objects[i]["x"] < objects[j]["x"] else "right"
            return f"Is {rng.choice(refs_i)} left or right of {rng.choice(refs_j)}?", answer
    choices = [(i, ref) for i in range(len(objects)) for ref in _references(objects, i, {"position"})]
    if not choices:
        return None
    i, ref = rng.choice(choices)
    return f"Where is {ref}?", objects[i]["position"]


def _ask(rng: random.Random, scene: dict, qtype: str):
    """One (question, answer) of `qtype` with a single correct answer for `scene`, or None."""
    objects = scene["objects"]
    if qtype == "count":
        return _count_question(rng, objects)
    if qtype == "position":
        return _position_question(rng, objects)
    return _attribute_question(rng, objects, qtype)


def _conversations(rng: random.Random, scene: dict, num_turns: int) -> list[dict]:
    """1-3 human/gpt turns of distinct question types; `<image>\\n` opens the first question."""
    qtypes = list(_QTYPES)
    rng.shuffle(qtypes)
    turns = []
    for qtype in qtypes:
        qa = _ask(rng, scene, qtype)
        if qa is None:
            continue
        question, answer = qa
        prefix = "<image>\n" if not turns else ""
        turns += [{"from": "human", "value": prefix + question},
                  {"from": "gpt", "value": answer, "qtype": qtype}]
        if len(turns) == 2 * num_turns:
            break
    assert turns, f"no answerable question for scene {scene}"  # count always answers
    return turns


def answer_of(sample: dict) -> list[tuple[str, str, str | None]]:
    """(question, answer, qtype) per human/gpt pair of a LLaVA sample, in order.

    The question is the human turn's value verbatim (the first keeps its "<image>\\n"), so
    prompts built from it match training; qtype is the gpt turn's "qtype", None when untagged.
    Raises SampleError when the turns do not alternate human, gpt.
    """
    conversations = sample.get("conversations") or []
    sample_id = str(sample.get("id", "?"))
    if len(conversations) % 2:
        raise SampleError(sample_id, f"odd number of turns ({len(conversations)})")
    pairs = []
    for human, gpt in zip(conversations[::2], conversations[1::2]):
        if human.get("from") != "human" or gpt.get("from") != "gpt":
            raise SampleError(sample_id, f"turns {human.get('from')!r}, {gpt.get('from')!r} "
                                         "are not human, gpt")
        pairs.append((human["value"], gpt["value"], gpt.get("qtype")))
    return pairs


# --- files


def _scene_key(scene: dict) -> str:
    """Identity of a scene: equal keys draw equal images."""
    return json.dumps(scene, sort_keys=True)


def _split(rng: random.Random, split: str, count: int, image_size: int, images_dir: Path,
           taken: set[str], turns: int | None = None) -> tuple[list[dict], list[dict]]:
    """Draw `count` scenes whose keys are not in `taken`, save their PNGs; (question, caption) samples with
    `turns` questions each (1-3 at random when None)."""
    questions, captions = [], []
    while len(questions) < count:
        scene = _random_scene(rng, image_size)
        if _scene_key(scene) in taken:
            continue  # identical scene = identical image: keep the splits disjoint
        taken.add(_scene_key(scene))
        name = f"{split}-{len(questions):06d}"
        render(scene, image_size).save(images_dir / f"{name}.png", format="PNG")
        conversation = _conversations(rng, scene, turns or rng.choice((1, 1, 2, 3)))
        questions.append({"id": f"toy-{name}", "image": f"{name}.png", "conversations": conversation,
                          "scene": scene})
        captions.append({"id": f"toy-{name}-caption", "image": f"{name}.png", "scene": scene,
                         "conversations": [
                             {"from": "human", "value": f"<image>\n{CAPTION_PROMPT}"},
                             {"from": "gpt", "value": caption(scene), "qtype": "caption"}]})
    return questions, captions


def several_objects(data: Path, out: Path) -> Path:
    """Write the samples of `data` whose scene has two or more objects to `out` (the toy teacher's binding
    stage: every question there needs picking one object among several); returns `out`."""
    _write_json(out, [s for s in json.loads(Path(data).read_text()) if len(s["scene"]["objects"]) >= 2])
    return out


def _write_json(path: Path, samples: list[dict]) -> None:
    """A JSON list with one sample per line: diffable, and 5x faster than indent= (C encoder)."""
    lines = ",\n".join(json.dumps(sample) for sample in samples)
    path.write_text(f"[\n{lines}\n]\n", encoding="utf-8")


def generate(out_dir, *, num_train: int = 2000, num_eval: int = 200, image_size: int = 64,
             seed: int = 0, turns: int | None = None) -> dict:
    """Write the toy world under `out_dir`; the same arguments give byte-identical files.

    Train and eval draw from separate seeded streams, so the eval set does not change with
    num_train (unless a train scene collides with it); no eval image equals a train image.
    `turns` (1-5) fixes the number of questions per train scene, each of another type (the toy teacher's
    SFT data: 5, every answerable type); by default 1-3 at random. The eval split always draws 1-3.
    captions.json covers the train images only. teacher.json is train.json followed by captions.json:
    the captions' dense, image-determined words are what teach a from-scratch toy LM to look at the
    image (docs/decisions.md, "Toy world"). Returns {"out_dir", "images_dir", "captions", "train",
    "eval", "teacher": Path, "num_train", "num_eval", "num_train_turns", "num_eval_turns": int}.
    """
    if num_train < 1 or num_eval < 0 or image_size < 32 or turns not in (None, *range(1, len(_QTYPES) + 1)):
        raise ValueError(f"need num_train >= 1, num_eval >= 0, image_size >= 32, turns None or 1-{len(_QTYPES)}; "
                         f"got {num_train}, {num_eval}, {image_size}, {turns}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    # The stream names keep this module's former name (toyworld): renaming them would redraw every scene.
    train, captions = _split(random.Random(f"toyworld-{seed}-train"), "train", num_train,
                             image_size, images_dir, taken, turns)
    evaluation, _ = _split(random.Random(f"toyworld-{seed}-eval"), "eval", num_eval,
                           image_size, images_dir, taken)
    paths = {"captions": out_dir / "captions.json", "train": out_dir / "train.json",
             "eval": out_dir / "eval.json", "teacher": out_dir / "teacher.json"}
    _write_json(paths["captions"], captions)
    _write_json(paths["train"], train)
    _write_json(paths["eval"], evaluation)
    _write_json(paths["teacher"], train + captions)
    return {"out_dir": out_dir, "images_dir": images_dir, **paths,
            "num_train": num_train, "num_eval": num_eval,
            "num_train_turns": sum(len(s["conversations"]) // 2 for s in train),
            "num_eval_turns": sum(len(s["conversations"]) // 2 for s in evaluation)}
